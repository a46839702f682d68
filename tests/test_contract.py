"""The backbone contract, checked for every registered backbone.

A new backbone gets these tests by registering in `jaxrec.models`. Each
test builds the backbone's config from its defaults at a tiny size (with
residual="alpha" where the backbone has that option, the gated form that
growth and skipping rely on) and perturbs every leaf off its init, so a
leaf the code ignores cannot pass by being zero or one.
"""
import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrec import heads, models
from jaxrec.config import Config, TrainConfig
from plan_helpers import gate_plan
from jaxrec.methods.stackrec import growth
from jaxrec.training import loop, optim
from jaxrec.training import checkpoint_meta
from jaxrec.training import orbax_io
from jaxrec.training import state as state_lib

BACKBONES = models.names()
V, T, L, U = 30, 12, 4, 7  # U: user indices (SSE-PT's table).


def tiny(name, max_len=T, **train_kw):
  model = models.get(name).config(num_items=V, embed_dim=8, num_blocks=L)
  model = model.fit_data(V, max_len).fit_users(U)
  if "residual" in {f.name for f in dataclasses.fields(model)}:
    model = dataclasses.replace(model, residual="alpha")
  return Config(model=model, train=TrainConfig(**train_kw))


@functools.partial(jax.jit, static_argnums=0)
def trained_like(cfg, seed=0):
  params = models.init_params(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.partial(jax.jit, static_argnames=("cfg", "unroll"))
def hidden(params, ids, gates=None, *, cfg, unroll=False):
  if gates is None:
    return models.hidden_states(params, cfg, ids, unroll=unroll)
  return models.get(cfg.model.name).apply(params, cfg.model, ids,
                                          plan=gate_plan(gates),
                                          unroll=unroll)


@functools.partial(jax.jit, static_argnames="cfg")
def all_scores(params, ids, *, cfg):
  h = models.hidden_states(params, cfg, ids)
  flat = h.reshape(-1, h.shape[-1])
  return heads.get(cfg.head.name).tile_scores(params, cfg, flat, 0, V)


def ids(seed=0, batch=3):
  rows = np.random.default_rng(seed).integers(1, V, (batch, T))
  rows[0, :4] = 0  # A left-padded row.
  return jnp.asarray(rows, jnp.int32)


def block_leaves(params, cfg):
  for stack in models.get(cfg.model.name).surgery.stacks:
    if stack in params:  # A stack may exist only in some configs.
      yield from jax.tree_util.tree_leaves_with_path(params[stack])


@pytest.mark.parametrize("name", BACKBONES)
def test_param_tree_is_plain_float32_dicts_with_a_block_axis(name):
  cfg = tiny(name)
  params = models.init_params(cfg, jax.random.key(0))
  models.check_params(params, cfg)
  assert "head" in params
  for _, leaf in block_leaves(params, cfg):
    assert leaf.shape[0] == L
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {
      np.dtype(np.float32)}
  is_dict = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: not isinstance(x, dict))[0]
  assert all(isinstance(leaf, jax.Array) for _, leaf in is_dict)


@pytest.mark.parametrize("name", BACKBONES)
def test_output_is_float32_hidden_states(name):
  cfg = tiny(name)
  h = hidden(trained_like(cfg), ids(), cfg=cfg)
  assert h.shape == (3, T, 8) and h.dtype == jnp.float32


@pytest.mark.parametrize("name", BACKBONES)
def test_output_at_t_ignores_items_after_t_iff_causal(name):
  """A causal backbone's position t never reads later items; a
  bidirectional one (trained masked) does, and says so."""
  cfg = tiny(name)
  params = trained_like(cfg)
  x = ids()
  changed = x.at[:, 7:].set((x[:, 7:] % (V - 2)) + 1)
  a, b = hidden(params, x, cfg=cfg), hidden(params, changed, cfg=cfg)
  assert not np.allclose(a[:, 7:], b[:, 7:])
  causal = cfg.model.is_causal()
  assert causal == ("causal" in cfg.model.capabilities())
  if causal:
    np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=1e-5, atol=1e-6)
  else:
    assert not np.allclose(a[:, 4:7], b[:, 4:7], atol=1e-4)


@pytest.mark.parametrize("name", BACKBONES)
def test_any_length_iff_no_parameter_depends_on_the_window(name):
  """`any_length` (a fine-tuning may read a longer window than the
  pretraining did): the tree is the same at any max_len, and a model
  made for T reads 3T; without it, the tree grows with the window."""
  def shapes(cfg):
    return jax.tree.map(lambda a: a.shape, jax.eval_shape(
        lambda: models.init_params(cfg, jax.random.key(0))))

  cfg = tiny(name)
  same = shapes(cfg) == shapes(tiny(name, max_len=3 * T))
  assert same == ("any_length" in cfg.model.capabilities())
  if same:
    longer = jnp.concatenate([ids(1), ids(2), ids(3)], axis=1)
    h = hidden(trained_like(cfg), longer, cfg=cfg)
    assert h.shape[:2] == (3, 3 * T) and np.isfinite(h).all()


@pytest.mark.parametrize("name", BACKBONES)
def test_scanned_stack_equals_unrolled(name):
  cfg = tiny(name)
  params = trained_like(cfg)
  np.testing.assert_allclose(hidden(params, ids(), cfg=cfg),
                             hidden(params, ids(), cfg=cfg, unroll=True),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_branch_slot_gates_of_one_change_nothing_and_zero_skip_blocks(name):
  """The `residual_gate` capability (every backbone here has it with
  residual="alpha"): a zero at the branch slot is a zero residual gate."""
  cfg = tiny(name)
  assert "residual_gate" in cfg.model.capabilities()
  params = trained_like(cfg)
  x = ids()
  ones, zeros = jnp.ones((L, 3)), jnp.zeros((L, 3))
  np.testing.assert_allclose(hidden(params, x, ones, cfg=cfg),
                             hidden(params, x, cfg=cfg), rtol=1e-5,
                             atol=1e-5)
  # A zero gate must act as a zero residual gate leaf: the block is skipped.
  rules = models.get(name).surgery
  gated_off = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.zeros_like(a) if growth._matches(  # pylint: disable=protected-access
          optim.path_name(p), rules.gates) else a, params["blocks"])
  np.testing.assert_allclose(
      hidden(params, x, zeros, cfg=cfg),
      hidden(dict(params, blocks=gated_off), x, cfg=cfg),
      rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("method", ["adjacent", "cross", "random_top"])
def test_preserve_growth_keeps_every_score(name, method):
  cfg = tiny(name)
  params = trained_like(cfg)
  deep, deep_cfg = growth.stack(params, cfg, method, "preserve",
                                rng=jax.random.key(3))
  assert deep_cfg.model.num_blocks == 2 * L
  np.testing.assert_allclose(all_scores(deep, ids(), cfg=deep_cfg),
                             all_scores(params, ids(), cfg=cfg),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", BACKBONES)
def test_checkpoint_round_trip(name, tmp_path):
  cfg = tiny(name)
  params = trained_like(cfg)
  mngr = orbax_io.manager(str(tmp_path), "best")
  orbax_io.save(mngr, 3, {"params": params},
                checkpoint_meta.make_meta(cfg, "fp", 3, []))
  mngr.wait_until_finished()
  restored, restored_cfg, meta = state_lib.load_params(str(tmp_path))
  assert restored_cfg == cfg and meta["backbone"] == name
  chex.assert_trees_all_equal(restored, params)


def run_steps(cfg, steps=3):
  params = trained_like(cfg)
  opt, labels = state_lib.optimizer_for(cfg, params)
  masks = optim.row_masks(params, models.get(cfg.model.name).surgery.stacks,
                          cfg.train.train_top_blocks)
  step = jax.jit(loop.make_train_step(cfg, opt, labels, None, row_masks=masks))
  state = state_lib.init_state(params, opt)
  rows = np.random.default_rng(0).integers(1, V, (8, T + 1)).astype(np.int32)
  batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
  for _ in range(steps):
    state, out = step(state, batch)
    assert np.isfinite(float(out["loss"]))
  return params, state


@pytest.mark.parametrize("name", BACKBONES)
def test_frozen_leaves_stay_bit_identical_and_hold_no_adam_state(name):
  cfg = tiny(name, freeze=("item_embedding/.*", "blocks/.*"),
             weight_decay=0.1)
  before, state = run_steps(cfg)
  after = state["params"]
  for part in ("item_embedding", "blocks"):
    chex.assert_trees_all_equal(after[part], before[part])
  assert not np.array_equal(after["head"]["kernel"], before["head"]["kernel"])
  mu = optax.tree_utils.tree_get(state["opt_state"], "mu")
  assert set(mu["head"]) == {"kernel", "bias"}
  for part in ("item_embedding", "blocks"):
    assert all(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
        mu[part], is_leaf=lambda x: isinstance(x, optax.MaskedNode)))


@pytest.mark.parametrize("name", BACKBONES)
def test_training_the_top_blocks_keeps_the_lower_rows(name):
  cfg = tiny(name, train_top_blocks=1, weight_decay=0.1)
  before, state = run_steps(cfg)
  for stack in models.get(name).surgery.stacks:  # Every stack, by its name.
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        state["params"][stack]):
      old = before[stack]
      for key in path:
        old = old[key.key]
      np.testing.assert_array_equal(leaf[:L - 1], old[:L - 1])
  kernels = [leaf for path, leaf in block_leaves(state["params"], cfg)
             if optim.path_name(path).endswith("kernel")]
  olds = [leaf for path, leaf in block_leaves(before, cfg)
          if optim.path_name(path).endswith("kernel")]
  assert any(not np.array_equal(k[L - 1], o[L - 1])
             for k, o in zip(kernels, olds))
