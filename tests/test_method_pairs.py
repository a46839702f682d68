"""Each method on each backbone where the paper's idea applies: a few
training steps and the method's defining property; a one-line refusal
where it cannot apply."""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import config as config_lib
from jaxrec import models
from jaxrec.errors import JaxrecError
from jaxrec.methods.cprec.config import CpRecConfig
from jaxrec.methods.cprec import sharing
from jaxrec.methods.peterrec.config import PLACEMENTS, PeterRecConfig
from jaxrec.methods.skiprec import skipping
from jaxrec.methods.skiprec.config import SkipRecConfig
from jaxrec.methods.stackrec import growth
from jaxrec.training import loop, optim
from jaxrec.training import state as state_lib

V, T, L, B = 30, 10, 3, 8


def sasrec(residual="alpha", methods=(), **train):
  model = config_lib.model_config_class("sasrec")(
      embed_dim=8, num_blocks=L, residual=residual, dropout=0.0)
  cfg = config_lib.Config(model=model, methods=methods,
                          train=config_lib.TrainConfig(**train))
  return cfg.fit_data(V, T).validate()


def ids(seed=0):
  rows = np.random.default_rng(seed).integers(1, V, (B, T))
  rows[0, :4] = 0
  return jnp.asarray(rows, jnp.int32)


def batch(seed=0):
  rows = np.random.default_rng(seed).integers(1, V, (B, T + 1))
  return {"inputs": rows[:, :-1].astype(np.int32),
          "targets": rows[:, 1:].astype(np.int32)}


def train_steps(cfg, params, steps=3):
  opt, labels = state_lib.optimizer_for(cfg, params)
  step = jax.jit(loop.make_train_step(cfg, opt, labels))
  state = state_lib.init_state(params, opt)
  for s in range(steps):
    state, out = step(state, batch(s))
    assert np.isfinite(float(out["loss"]))
  return state["params"]


def with_alphas(params, value=0.7):
  return {**params, "blocks": {**params["blocks"], **{
      k: jnp.full_like(v, value) for k, v in params["blocks"].items()
      if k.startswith("alpha")}}}


# ----------------------------------------------------------- SkipRec


def test_skiprec_on_sasrec_trains_policy_and_backbone_together():
  cfg = sasrec(methods=(SkipRecConfig(lam=0.5),))
  params = with_alphas(models.init_params(cfg, jax.random.key(0)))
  after = train_steps(cfg, params)
  for part in ("skiprec", "blocks"):
    assert not np.array_equal(after[part]["head" if part == "skiprec"
                                          else "ffn_in"]["kernel"],
                              params[part]["head" if part == "skiprec"
                                           else "ffn_in"]["kernel"])


def test_skiprec_on_sasrec_a_gated_off_block_is_skipped_exactly():
  cfg = sasrec(methods=(SkipRecConfig(),))
  params = with_alphas(models.init_params(cfg, jax.random.key(0)))
  gates = jnp.ones((L, B)).at[1].set(0.0)
  got = skipping.hidden_states(params, cfg, ids(), "cond", gates)
  without = {**params, "blocks": jax.tree.map(
      lambda a: a[np.array([0, 2])], params["blocks"]),
             "skiprec": jax.tree.map(lambda a: a, params["skiprec"])}
  two = dataclasses.replace(cfg.model, num_blocks=2)
  plain = cfg.without_method("skiprec").replace(model=two)
  want = models.hidden_states(without, plain, ids())
  chex.assert_trees_all_close(got, want, atol=1e-5)


def test_skiprec_on_official_sasrec_is_refused_naming_residual_alpha():
  with pytest.raises(JaxrecError, match="methods.skiprec: backbone 'sasrec'"
                     ".*lacks residual_gate.*--residual alpha"):
    sasrec(residual="official", methods=(SkipRecConfig(),))


def test_compaction_on_sasrec_is_refused_in_one_line():
  cfg = sasrec(methods=(SkipRecConfig(),))
  params = models.init_params(cfg, jax.random.key(0))
  with pytest.raises(JaxrecError, match="skipping='compact'.*sasrec.*"
                     "row_local_blocks"):
    skipping.hidden_states(params, cfg, ids(), "compact")


# ---------------------------------------------------------- PeterRec


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_patched_sasrec_starts_as_the_pretrained_sasrec(placement):
  plain = sasrec()
  pretrained = with_alphas(models.init_params(plain, jax.random.key(0)))
  cfg = sasrec(methods=(PeterRecConfig(placement=placement),))
  patched = models.init_params(cfg, jax.random.key(1))
  params = {**pretrained, "peterrec": patched["peterrec"]}
  # Two programs (the patched one adds zero branches) fuse and round apart:
  # 1.1e-6 on a state of 0.074 on one machine. A patch that did not start
  # at zero moves states by 1e-2 or more.
  chex.assert_trees_all_close(models.hidden_states(params, cfg, ids()),
                              models.hidden_states(pretrained, plain, ids()),
                              rtol=1e-5, atol=1e-5)


def test_patches_train_inside_a_frozen_sasrec_and_the_rest_stays_put():
  frozen = ("item_embedding/.*", "position_embedding/.*", "blocks/.*",
            "final_norm/.*")
  cfg = sasrec(methods=(PeterRecConfig(),), freeze=frozen)
  params = with_alphas(models.init_params(cfg, jax.random.key(0)))
  after = train_steps(cfg, params)
  labels = optim.trainable_labels(params, frozen)
  kept = state_lib.select(after, labels, optim.FROZEN)
  chex.assert_trees_all_equal(kept, state_lib.select(params, labels,
                                                     optim.FROZEN))
  assert not np.array_equal(after["peterrec"]["patch1"]["up"]["kernel"],
                            params["peterrec"]["patch1"]["up"]["kernel"])


# ------------------------------------- composition on a model that shares


def shared_nextitnet(*methods):
  """NextItNet of 4 blocks storing 2 (position i runs block i mod 2)."""
  model = config_lib.model_config_class("nextitnet")(
      embed_dim=8, num_blocks=4, dropout=0.0)
  cfg = config_lib.Config(model=model, methods=(CpRecConfig(), *methods))
  return cfg.fit_data(V, T).validate()


def random_leaves(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)])


def test_patches_on_a_shared_model_belong_to_run_positions():
  cfg = shared_nextitnet(PeterRecConfig())
  params = with_alphas(models.init_params(cfg, jax.random.key(0)))
  chex.assert_tree_shape_prefix(params["blocks"], (2,))  # Stored blocks.
  chex.assert_tree_shape_prefix(params["peterrec"], (4,))  # Run positions.
  params["peterrec"] = random_leaves(params["peterrec"], 1)
  # The shared model computes what its untied copy with the same patches
  # computes: a patch adapts one run of a block, not the stored block.
  untied, untied_cfg = sharing.untie(params, cfg)
  chex.assert_tree_shape_prefix(untied["blocks"], (4,))
  chex.assert_trees_all_close(models.hidden_states(params, cfg, ids()),
                              models.hidden_states(untied, untied_cfg, ids()),
                              atol=1e-6)
  # Positions 0 and 2 run one stored block; their patches differ apart.
  other = jax.tree.map(lambda a: a.at[2].set(a[0]), params["peterrec"])
  assert not np.allclose(
      models.hidden_states(params, cfg, ids()),
      models.hidden_states({**params, "peterrec": other}, cfg, ids()))


def test_patches_train_beside_frozen_shared_blocks():
  cfg = shared_nextitnet(PeterRecConfig()).replace(
      train=config_lib.TrainConfig(freeze=("item_embedding/.*",
                                           "blocks/.*")))
  params = with_alphas(models.init_params(cfg, jax.random.key(0)))
  after = train_steps(cfg, params)
  chex.assert_trees_all_equal(after["blocks"], params["blocks"])
  assert not np.array_equal(after["peterrec"]["patch1"]["up"]["kernel"],
                            params["peterrec"]["patch1"]["up"]["kernel"])


@pytest.mark.parametrize("mode", ["cond", "compact"])
def test_skipping_a_shared_block_skips_one_run_of_it(mode):
  cfg = shared_nextitnet(SkipRecConfig())
  params = with_alphas(models.init_params(cfg, jax.random.key(0)))
  chex.assert_tree_shape_prefix(params["skiprec"]["head"], (4,))
  gates = jnp.ones((4, B)).at[2, ::2].set(0.0)  # Position 2, half the rows.
  masked = skipping.hidden_states(params, cfg, ids(), "masked", gates)
  untied, untied_cfg = sharing.untie(params, cfg)
  chex.assert_trees_all_close(
      masked, skipping.hidden_states(untied, untied_cfg, ids(), "masked",
                                     gates), atol=1e-6)
  chex.assert_trees_all_close(
      skipping.hidden_states(params, cfg, ids(), mode, gates), masked,
      atol=1e-6)
  # Position 0 runs the same stored block and was not skipped.
  assert not np.allclose(masked, skipping.hidden_states(
      params, cfg, ids(), "masked", gates.at[0, ::2].set(0.0)))


def test_a_shared_model_with_a_policy_trains_and_grows():
  cfg = shared_nextitnet(SkipRecConfig(lam=0.5))
  params = train_steps(cfg, models.init_params(cfg, jax.random.key(0)))
  deep, deep_cfg = growth.stack(params, cfg, "adjacent", "paper",
                                rng=jax.random.key(1))
  assert deep_cfg.method("cprec").block_source == (0, 0, 1, 1, 0, 0, 1, 1)
  chex.assert_tree_shape_prefix(deep["blocks"], (2,))  # No new arrays.
  np.testing.assert_array_equal(
      deep["skiprec"]["head"]["kernel"],
      params["skiprec"]["head"]["kernel"][np.array([0, 0, 1, 1, 2, 2, 3,
                                                    3])])


# ------------------------------------------------------------- CpRec


def test_block_sharing_on_sasrec_stores_one_copy_and_trains_it():
  cfg = sasrec(methods=(CpRecConfig(share="cross_block", period=1),))
  params = with_alphas(models.init_params(cfg, jax.random.key(0)))
  chex.assert_tree_shape_prefix(params["blocks"], (1,))  # One stored block.
  after = train_steps(cfg, params)
  chex.assert_tree_shape_prefix(after["blocks"], (1,))
  assert not np.array_equal(after["blocks"]["ffn_in"]["kernel"],
                            params["blocks"]["ffn_in"]["kernel"])
  untied, untied_cfg = sharing.untie(after, cfg)
  chex.assert_trees_all_close(models.hidden_states(after, cfg, ids()),
                              models.hidden_states(untied, untied_cfg, ids()),
                              atol=1e-6)


def test_bands_and_the_tree_softmax_train_on_sasrec():
  model = config_lib.model_config_class("sasrec")(
      embed_dim=8, num_blocks=2, residual="alpha", dropout=0.0,
      embedding="adaptive", num_bands=3, band_cutoffs=(8, 16))
  head = config_lib.head_config_class("tree_softmax")()
  cfg = config_lib.Config(model=model, head=head).fit_data(V, T).validate()
  params = models.init_params(cfg, jax.random.key(0))
  assert "band_2" in params["item_embedding"] and "band_2" in params["head"]
  after = train_steps(cfg, params)
  assert not np.array_equal(after["head"]["band_1"]["kernel"],
                            params["head"]["band_1"]["kernel"])


def test_layer_sharing_on_sasrec_is_refused_in_one_line():
  with pytest.raises(JaxrecError, match="methods.cprec: backbone 'sasrec'"
                     ".*lacks layer_pair"):
    sasrec(methods=(CpRecConfig(share="adjacent_layer"),))
