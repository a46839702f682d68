"""BERT4Rec: a bidirectional backbone that trains by cloze and answers from
an appended MASK. The contract (growth, gates with residual alpha,
checkpoints, freezing) is tests/test_contract.py's."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import models, tasks
from jaxrec.config import Config
from jaxrec.models import bert4rec
from jaxrec.tasks import masked_item

V, T = 20, 6


def model(**kw):
  options = dict(num_items=V, embed_dim=8, num_positions=T, dropout=0.0)
  options.update(kw)
  cfg = Config(model=bert4rec.BERT4RecConfig(**options))
  return cfg, models.init_params(cfg, jax.random.key(0))


def test_trains_by_cloze_with_a_learned_mask_token():
  cfg, params = model()
  assert tasks.for_config(cfg) is masked_item
  assert not cfg.model.is_causal() and "causal" not in cfg.model.capabilities()
  assert params["tokens"]["mask"].shape == (8,)


def test_next_item_is_read_at_an_appended_mask():
  cfg, params = model()
  history = jnp.array([[0, 4, 7, 1, 9, 3]], jnp.int32)
  query = masked_item.mask_last(cfg, history)
  np.testing.assert_array_equal(query, [[4, 7, 1, 9, 3, V]])
  h = models.hidden_states(params, cfg, query)
  np.testing.assert_allclose(masked_item.represent(params, cfg, history),
                             h[:, -1], rtol=1e-6)


def test_post_ln_blocks_promise_no_gate_and_say_how_to_get_one():
  cfg, _ = model()
  assert "residual_gate" not in cfg.model.capabilities()
  assert "--residual alpha" in cfg.model.capability_hint(["residual_gate"])
  gated, _ = model(residual="alpha")
  assert "residual_gate" in gated.model.capabilities()


def test_left_padding_changes_no_real_position():
  cfg, params = model()
  a = models.hidden_states(params, cfg, jnp.array([[4, 7, 1, V]], jnp.int32))
  b = models.hidden_states(params, cfg,
                           jnp.array([[0, 0, 4, 7, 1, V]], jnp.int32))
  np.testing.assert_allclose(b[0, 2:], a[0], rtol=1e-5, atol=1e-5)
