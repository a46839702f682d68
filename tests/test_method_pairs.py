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
  chex.assert_trees_all_close(models.hidden_states(params, cfg, ids()),
                              models.hidden_states(pretrained, plain, ids()),
                              atol=1e-6)


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


def test_patches_on_a_model_sharing_blocks_are_refused_in_one_line():
  model = config_lib.model_config_class("nextitnet")(
      num_items=V, embed_dim=8, num_blocks=4)
  cfg = config_lib.Config(model=model,
                          methods=(PeterRecConfig(), CpRecConfig()))
  with pytest.raises(JaxrecError, match="methods.peterrec: backbone "
                     "'nextitnet'.*lacks own_blocks: methods.cprec shares "
                     "blocks"):
    cfg.validate()


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
