"""HSTU's block against a NumPy transcription of the paper's equations,
and what sets it apart from softmax attention. The contract (causality,
scan = unroll, gates, growth, checkpoints, freezing) is tests/test_contract.py's.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.errors import JaxrecError
from jaxrec.models import hstu

B, T, C, P = 2, 5, 8, 7


def cfg(**kw):
  options = dict(num_items=20, embed_dim=C, num_heads=2, num_positions=P,
                 dropout=0.0)
  options.update(kw)
  return hstu.HSTUConfig(**options)


def block_params(c, seed=0):
  x = jnp.zeros((1, 1, C))
  params = hstu.HSTUBlock(c).init(jax.random.key(seed), x,
                                  jnp.ones((1, 1), bool))["params"]
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [
      a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def numpy_block(p, x, real, c):
  """The module docstring's equations, one position at a time."""
  silu = lambda z: z / (1 + np.exp(-z))  # pylint: disable=unnecessary-lambda-assignment

  def norm(z):
    mu = z.mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True)
                              + c.layer_norm_eps)

  h, dqk, dv = c.num_heads, c.qk_width, c.v_width
  w = {k: np.asarray(v, np.float64) for k, v in jax.tree_util.tree_map(
      np.asarray, p).items() if not isinstance(v, dict)}
  out = np.zeros_like(x)
  uvqk = silu(norm(x) @ np.asarray(p["uvqk"]["kernel"], np.float64))
  u, v = uvqk[..., :h * dv], uvqk[..., h * dv:2 * h * dv]
  q = uvqk[..., 2 * h * dv:2 * h * dv + h * dqk]
  k = uvqk[..., 2 * h * dv + h * dqk:]
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      attended = np.zeros(h * dv)
      for s in range(t + 1):
        if not real[b, s]:
          continue
        for head in range(h):
          logit = (q[b, t, head * dqk:(head + 1) * dqk]
                   @ k[b, s, head * dqk:(head + 1) * dqk]
                   + w["rel_bias"][P - 1 + s - t])
          attended[head * dv:(head + 1) * dv] += (
              silu(logit) / P * v[b, s, head * dv:(head + 1) * dv])
      y = (u[b, t] * norm(attended)) @ np.asarray(p["out"]["kernel"]) + \
          np.asarray(p["out"]["bias"])
      if c.residual == "alpha":
        y = w["alpha"] * y
      out[b, t] = (x[b, t] + y) * real[b, t]
  return out


@pytest.mark.parametrize("residual", ["official", "alpha"])
def test_block_matches_the_equations(residual):
  c = cfg(residual=residual)
  p = block_params(c)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, T, C))
  real = np.ones((B, T), bool)
  real[0, :2] = False  # A left-padded row.
  x[~real] = 0.0
  got = hstu.HSTUBlock(c).apply({"params": p}, jnp.asarray(x, jnp.float32),
                                jnp.asarray(real))
  np.testing.assert_allclose(got, numpy_block(p, x, real, c), rtol=2e-4,
                             atol=2e-4)


def test_attention_weights_are_not_normalised_to_one():
  """Pointwise SiLU attention: doubling a history's matching items doubles
  their pull (a softmax would average them away)."""
  c = cfg(num_heads=1)
  p = block_params(c)
  x = np.zeros((1, T, C), np.float32)
  x[0, :] = np.random.default_rng(1).normal(size=C)  # One item, repeated.
  real_one = np.zeros((1, T), bool)
  real_one[0, -1] = True
  real_all = np.ones((1, T), bool)
  apply = lambda r: hstu.HSTUBlock(c).apply(  # pylint: disable=unnecessary-lambda-assignment
      {"params": p}, jnp.asarray(x * r[..., None]), jnp.asarray(r))
  # Identical keys and values: with softmax the last output would not
  # change; here the attended sum grows with the number of copies.
  assert not np.allclose(apply(real_one)[0, -1], apply(real_all)[0, -1],
                         atol=1e-4)


def test_relative_bias_reads_the_offset():
  table = jnp.arange(2 * P - 1, dtype=jnp.float32)
  bias = hstu.relative_bias(table, 4)
  assert bias[3, 1] == table[P - 1 - 2] and bias[2, 2] == table[P - 1]


def test_inputs_longer_than_the_position_table_are_refused():
  c = cfg()
  params = hstu.init(c, jax.random.key(0))
  with pytest.raises(ValueError, match="num_positions=7"):
    hstu.apply(params, c, jnp.ones((1, P + 1), jnp.int32))


def test_set_position_table_shorter_than_max_len_is_one_line():
  with pytest.raises(JaxrecError, match="model.num_positions=5"):
    cfg(num_positions=5).fit_data(20, 9)
