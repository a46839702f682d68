"""GRU4Rec's recurrence: one GRU step per real item, padding inert. The
contract (causality, scan = unroll, gates, growth, checkpoints, freezing)
is tests/test_contract.py's."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.models import gru4rec

V, C = 20, 6


def model(**kw):
  options = dict(num_items=V, embed_dim=C, num_blocks=2, dropout_hidden=0.0)
  options.update(kw)
  cfg = gru4rec.GRU4RecConfig(**options)
  return cfg, gru4rec.init(cfg, jax.random.key(0))


def python_loop(cell_params, x):
  """The GRU as a Python loop over time with flax's own cell."""
  cell = nn.GRUCell(features=C)
  h = jnp.zeros((C,))
  out = []
  for x_t in x:
    h, _ = cell.apply({"params": cell_params}, h, x_t)
    out.append(h)
  return np.stack(out)


def test_layers_match_a_python_loop_over_time():
  cfg, params = model()
  ids = jnp.array([[3, 7, 1, 9, 4]], jnp.int32)
  got = gru4rec.apply(params, cfg, ids)
  x = params["item_embedding"]["embedding"][ids[0]]
  for layer in range(cfg.num_blocks):
    cell = jax.tree.map(lambda a: a[layer], params["blocks"]["gru"])
    x = python_loop(cell, x)
  np.testing.assert_allclose(got[0], x, rtol=1e-5, atol=1e-5)


def test_left_padding_changes_no_real_position():
  cfg, params = model()
  ids = jnp.array([[3, 7, 1, 9]], jnp.int32)
  padded = jnp.array([[0, 0, 0, 3, 7, 1, 9]], jnp.int32)
  a = gru4rec.apply(params, cfg, ids)
  b = gru4rec.apply(params, cfg, padded)
  np.testing.assert_allclose(b[0, 3:], a[0], rtol=1e-6, atol=1e-6)
  assert not np.asarray(b[0, :3]).any()


def test_official_residual_promises_no_gate():
  cfg, _ = model(residual="official")
  assert "residual_gate" not in cfg.capabilities()
  assert "--residual alpha" in cfg.capability_hint(["residual_gate"])


@pytest.mark.parametrize("name", ["dropout_embed", "dropout_hidden"])
def test_dropout_rates_are_checked(name):
  cfg, _ = model(**{name: 1.0})
  with pytest.raises(Exception, match=f"model.{name}"):
    cfg.validate()
