"""NextItNet: the conv, the block, the param tree (backbone specifics; the
properties every backbone shares are in test_contract.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import models
from jaxrec.config import Config
from jaxrec.models import nextitnet
from jaxrec.models.nextitnet import NextItNetConfig
from jaxrec.nn import conv
from jaxrec.nn.stack import repeat_period


def small_config(**kw):
  base = dict(num_items=30, embed_dim=8, num_blocks=4, kernel_size=3)
  base.update(kw)
  return Config(model=NextItNetConfig(**base))


def params_with_nonzero_alpha(cfg, seed=0):
  """Fresh params have alpha = 0 (identity blocks); tests need real blocks."""
  params = models.init_params(cfg, jax.random.key(seed))
  if "alpha" in params["blocks"]:
    params["blocks"]["alpha"] = jnp.linspace(0.5, 1.5, cfg.model.num_blocks)
  return params


def perturbed(params, seed=1):
  """Every leaf moved off its init (LN scale 1 / bias 0, zero conv bias,
  alpha 0), so an oracle that ignores a leaf cannot agree by accident."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def oracle_ln(v, p):
  mu = v.mean(-1, keepdims=True)
  var = ((v - mu) ** 2).mean(-1, keepdims=True)
  return (v - mu) / jnp.sqrt(var + 1e-8) * p["scale"] + p["bias"]


def oracle_block(block, x, d, residual="alpha"):
  """The official order, written out with lax.conv as the conv."""
  h = conv.causal_conv_reference(x, block["conv1"]["kernel"],
                                 block["conv1"]["bias"], d)
  h = jax.nn.relu(oracle_ln(h, block["ln1"]))
  h = conv.causal_conv_reference(h, block["conv2"]["kernel"],
                                 block["conv2"]["bias"], 2 * d)
  h = jax.nn.relu(oracle_ln(h, block["ln2"]))
  return x + (block["alpha"] * h if residual == "alpha" else h)


@pytest.mark.parametrize("k,d", [(1, 1), (2, 1), (3, 1), (3, 2), (3, 8),
                                 (5, 3)])
def test_shifted_conv_equals_lax_conv(k, d):
  rng = np.random.default_rng(k * 10 + d)
  x = jnp.asarray(rng.normal(size=(2, 17, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, 5, 6)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(6,)), jnp.float32)
  np.testing.assert_allclose(conv.causal_conv(x, kernel, bias, d),
                             conv.causal_conv_reference(x, kernel, bias, d),
                             rtol=1e-5, atol=1e-5)


def test_conv_output_at_t_ignores_inputs_after_t():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 12, 4)).astype(np.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 4, 4)), jnp.float32)
  y = conv.causal_conv(jnp.asarray(x), kernel, jnp.zeros(4), 2)
  x2 = x.copy()
  x2[:, 7:] = 100.0
  y2 = conv.causal_conv(jnp.asarray(x2), kernel, jnp.zeros(4), 2)
  np.testing.assert_array_equal(y[:, :7], y2[:, :7])
  assert not np.allclose(y[:, 7:], y2[:, 7:])


def test_model_output_at_t_ignores_items_after_t():
  cfg = small_config()
  params = params_with_nonzero_alpha(cfg)
  seq = np.array([[3, 7, 1, 9, 4, 4, 12, 5, 8, 2]], np.int32)
  changed = seq.copy()
  changed[0, 6:] = [20, 21, 22, 23]
  h = models.hidden_states(params, cfg, jnp.asarray(seq))
  h2 = models.hidden_states(params, cfg, jnp.asarray(changed))
  np.testing.assert_array_equal(h[:, :6], h2[:, :6])
  assert not np.allclose(h[:, 6:], h2[:, 6:])


@pytest.mark.parametrize("dilations", [(1, 4), (1, 2, 4), (1,),
                                       (1, 1, 4, 4, 2, 8)])
def test_scanned_stack_equals_unrolled(dilations):
  cfg = small_config(num_blocks=6, dilations=dilations)
  params = params_with_nonzero_alpha(cfg)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 30, (2, 11)))
  scanned = models.hidden_states(params, cfg, ids)
  unrolled = models.hidden_states(params, cfg, ids, unroll=True)
  np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("residual", ["alpha", "plain"])
def test_block_matches_official_order(residual):
  """conv(d) -> LN -> ReLU -> conv(2d) -> LN -> ReLU -> x + alpha*h, with
  every leaf (LN scale and bias, conv biases, alpha) away from its init."""
  cfg = small_config(num_blocks=1, dilations=(2,), residual=residual)
  params = perturbed(models.init_params(cfg, jax.random.key(0)))
  block = jax.tree.map(lambda a: a[0], params["blocks"])
  x = jax.random.normal(jax.random.key(2), (1, 9, 8))
  got = nextitnet.NextItNetBlock(cfg.model, 2).apply({"params": block}, x)
  np.testing.assert_allclose(got, oracle_block(block, x, 2, residual),
                             rtol=1e-4, atol=1e-5)


def test_every_block_leaf_has_leading_block_axis():
  cfg = small_config(num_blocks=5)
  params = models.init_params(cfg, jax.random.key(0))
  for leaf in jax.tree.leaves(params["blocks"]):
    assert leaf.shape[0] == 5
  assert params["item_embedding"]["embedding"].shape == (30, 8)
  assert params["head"]["kernel"].shape == (30, 8)
  assert params["head"]["bias"].shape == (30,)


def test_fresh_alpha_blocks_are_identity():
  cfg = small_config()
  params = models.init_params(cfg, jax.random.key(0))
  seq = jnp.array([[0, 0, 4, 5, 6]])
  h = models.hidden_states(params, cfg, seq)
  emb = params["item_embedding"]["embedding"][seq] * (seq != 0)[..., None]
  np.testing.assert_allclose(h, emb, atol=1e-7)


def test_plain_residual_has_no_alpha_and_adds_the_branch():
  """residual=plain is NextItNet's x + h: the whole model equals an
  unrolled stack of the oracle block over the (padding-zeroed) embedding."""
  cfg = small_config(residual="plain")
  params = perturbed(models.init_params(cfg, jax.random.key(0)))
  assert "alpha" not in params["blocks"]
  seq = jnp.array([[0, 1, 2, 3, 4]])
  x = params["item_embedding"]["embedding"][seq] * (seq != 0)[..., None]
  for i, d in enumerate(cfg.model.block_dilations()):
    x = oracle_block(jax.tree.map(lambda a, i=i: a[i], params["blocks"]), x,
                     d, "plain")
  np.testing.assert_allclose(models.hidden_states(params, cfg, seq), x,
                             rtol=1e-4, atol=1e-5)


def test_tied_output_layer_is_the_item_embedding():
  from jaxrec.heads import softmax  # pylint: disable=import-outside-toplevel
  cfg = small_config().replace(head=softmax.SoftmaxConfig(
      tie_embeddings=True))
  params = models.init_params(cfg, jax.random.key(0))
  assert "kernel" not in params["head"]
  w, b = softmax.weights(params, cfg)
  assert w is params["item_embedding"]["embedding"]
  assert b.shape == (30,)


def test_padding_input_contributes_nothing():
  """A left-padded sequence equals the unpadded one at its real positions."""
  cfg = small_config()
  params = params_with_nonzero_alpha(cfg)
  short = jnp.array([[5, 6, 7]])
  padded = jnp.array([[0, 0, 0, 5, 6, 7]])
  np.testing.assert_allclose(models.hidden_states(params, cfg, short),
                             models.hidden_states(params, cfg, padded)[:, 3:],
                             rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
  cfg = small_config()
  params = params_with_nonzero_alpha(cfg)
  seq = jnp.array([[1, 2, 3, 4, 5, 6]])
  h32 = models.hidden_states(params, cfg, seq)
  h16 = models.hidden_states(params, small_config(dtype="bfloat16"), seq)
  assert h16.dtype == jnp.float32  # The residual stream stays float32.
  # bf16 keeps 8 bits of mantissa (0.4%); over 8 convs and LayerNorms the
  # error compounds to about 1% of the stream's norm, element-wise more
  # where LayerNorm divides by a small variance.
  relative = np.linalg.norm(h16 - h32) / np.linalg.norm(h32)
  assert 0 < relative < 2e-2, relative


def test_bfloat16_setting_runs_the_convs_in_bfloat16():
  cfg = small_config(dtype="bfloat16")
  params = models.init_params(cfg, jax.random.key(0))
  jaxpr = jax.make_jaxpr(lambda p: models.hidden_states(
      p, cfg, jnp.ones((1, 4), jnp.int32)))(params)

  def dots(eqns):
    for eqn in eqns:
      if eqn.primitive.name == "dot_general":
        yield eqn
      for value in eqn.params.values():  # scan / pjit bodies
        sub = getattr(value, "jaxpr", value)
        if hasattr(sub, "eqns"):
          yield from dots(sub.eqns)

  operand_dtypes = {v.aval.dtype for e in dots(jaxpr.jaxpr.eqns)
                    for v in e.invars}
  assert operand_dtypes == {jnp.dtype(jnp.bfloat16)}


def test_params_are_float32_plain_dicts():
  cfg = small_config(dtype="bfloat16")
  params = models.init_params(cfg, jax.random.key(0))
  assert type(params) is dict and type(params["blocks"]) is dict
  assert type(params["blocks"]["conv1"]) is dict
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_program_size_does_not_grow_with_depth():
  """The stack is one scan: 128 blocks trace to the same program as 8."""
  def num_equations(blocks):
    cfg = small_config(num_blocks=blocks)
    params = models.abstract_params(cfg)
    jaxpr = jax.make_jaxpr(
        lambda p: models.hidden_states(p, cfg, jnp.ones((1, 4), jnp.int32)))
    return len(jaxpr(params).jaxpr.eqns)
  assert num_equations(8) == num_equations(128)


def test_dilation_period_is_the_smallest_repeating_group():
  assert repeat_period((1, 4, 1, 4)) == 2
  assert repeat_period((1, 1, 4, 4, 1, 1, 4, 4)) == 4
  assert repeat_period((2, 2, 2)) == 1
  assert repeat_period((1, 2, 3)) == 3


def test_check_params_rejects_another_config():
  params = models.init_params(small_config(), jax.random.key(0))
  with pytest.raises(AssertionError):
    models.check_params(params, small_config(num_blocks=8))


def test_dropout_acts_only_in_training_and_follows_the_key():
  cfg = small_config(dropout=0.3)
  params = params_with_nonzero_alpha(cfg)
  seq = jnp.array([[1, 2, 3, 4, 5, 6]])
  plain = models.hidden_states(params, cfg, seq)
  np.testing.assert_array_equal(
      plain, models.hidden_states(params, small_config(), seq))
  a = models.hidden_states(params, cfg, seq, train=True,
                           rng=jax.random.key(1))
  b = models.hidden_states(params, cfg, seq, train=True,
                           rng=jax.random.key(1))
  c = models.hidden_states(params, cfg, seq, train=True,
                           rng=jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, plain) and not np.allclose(a, c)
  with pytest.raises(ValueError, match="rng"):
    models.hidden_states(params, cfg, seq, train=True)
