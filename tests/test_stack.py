"""scan_blocks: the one scan over blocks (statics, source maps, per-position
inputs, remat)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec.nn.stack import gather_blocks, repeat_period, scan_blocks

L, C = 6, 4


def stored(depth=L, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {"w": jax.random.normal(keys[0], (depth, C, C)) * 0.5,
          "b": jax.random.normal(keys[1], (depth, C))}


def block(p, x, static, xs):
  """A block whose result depends on its static, its params and its xs."""
  h = jnp.tanh(x @ p["w"] + p["b"]) * static
  return x + (h if xs is None else xs[:, None] * h)


def run(params, x, **kw):
  return scan_blocks(block, params, x, statics=kw.pop("statics", (1.0, 2.0) *
                                                      (L // 2)), **kw)


def test_repeat_period_is_the_smallest_repeating_group():
  assert repeat_period((1, 4, 1, 4)) == 2
  assert repeat_period((1, 1, 4, 4, 1, 1, 4, 4)) == 4
  assert repeat_period((2, 2, 2)) == 1
  assert repeat_period((1, 2, 3)) == 3
  assert repeat_period((None,) * 5) == 1


def test_scan_applies_position_i_with_stored_block_i_and_static_i():
  params, x = stored(), jnp.ones((2, C))
  expected = x
  for i, s in enumerate((1.0, 2.0) * (L // 2)):
    expected = block(jax.tree.map(lambda a, i=i: a[i], params), expected, s,
                     None)
  # Eager ops against one compiled scan: XLA may fuse tanh differently
  # (measured up to 1.4e-6 relative on this CPU), so not bit for bit.
  np.testing.assert_allclose(run(params, x), expected, rtol=1e-5)
  np.testing.assert_allclose(run(params, x, unroll=True), expected,
                             rtol=1e-5)


def test_source_map_runs_the_gathered_blocks():
  params, x = stored(depth=2), jnp.ones((2, C))
  source = (0, 1, 1, 0, 0, 1)
  np.testing.assert_allclose(run(params, x, source=source),
                             run(gather_blocks(params, source), x),
                             rtol=1e-6)


def test_a_shared_block_gets_the_sum_of_its_positions_gradients():
  params, x = stored(depth=1), jnp.ones((2, C))
  loss = lambda p, src: jnp.sum(run(p, x, source=src) ** 2)  # pylint: disable=unnecessary-lambda-assignment
  shared = jax.grad(loss)(params, (0,) * L)
  untied = jax.grad(lambda p: jnp.sum(run(p, x) ** 2))(
      gather_blocks(params, (0,) * L))
  jax.tree.map(lambda s, u: np.testing.assert_allclose(
      s[0], u.sum(0), rtol=1e-5, atol=1e-6), shared, untied)


def test_per_position_inputs_reach_their_block():
  params, x = stored(), jnp.ones((2, C))
  gates = jnp.ones((L, 2)).at[3].set(0.0)  # Position 3 skipped.
  out = run(params, x, xs=gates)
  expected = x
  for i, s in enumerate((1.0, 2.0) * (L // 2)):
    if i != 3:
      expected = block(jax.tree.map(lambda a, i=i: a[i], params), expected,
                       s, None)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert not np.allclose(run(params, x), expected)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_neither_values_nor_gradients(remat):
  params, x = stored(), jnp.ones((2, C))
  loss = lambda p, r: jnp.sum(run(p, x, remat=r) ** 2)  # pylint: disable=unnecessary-lambda-assignment
  np.testing.assert_allclose(loss(params, remat), loss(params, "none"),
                             rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               jax.grad(loss)(params, remat), jax.grad(loss)(params, "none"))


def test_remat_really_rematerialises():
  params, x = stored(), jnp.ones((2, C))
  text = jax.jit(jax.grad(lambda p: jnp.sum(run(p, x, remat="full") ** 2))
                 ).lower(params).as_text()
  plain = jax.jit(jax.grad(lambda p: jnp.sum(run(p, x) ** 2))
                  ).lower(params).as_text()
  assert text.count("tanh") > plain.count("tanh")


@pytest.mark.parametrize("kw,match", [
    (dict(source=(0, 1)), "source map"),
    (dict(source=(0, 1, 2, 3, 4, 9)), "source map"),
    (dict(statics=(1.0,) * 4), "4 run positions"),
    (dict(remat="some"), "remat='some'"),
])
def test_bad_stack_arguments_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    run(stored(), jnp.ones((2, C)), **kw)
