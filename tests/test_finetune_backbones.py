"""`jaxrec finetune`'s presets written in what a backbone declares
(`SurgeryRules.layers`), not in NextItNet's leaf names: NextItNet's frozen
sets are what they were, SASRec fine-tunes, a backbone that declares too
little is refused in one line."""
import dataclasses
import fnmatch
import inspect

import chex
import jax
import numpy as np
import pytest

from jaxrec import config, models
from jaxrec.errors import JaxrecError
from jaxrec.methods.cprec.config import CpRecConfig
from jaxrec.methods.peterrec import finetune as peterrec
from jaxrec.methods.skiprec.config import SkipRecConfig
from jaxrec.training import loop, optim
from jaxrec.training import state as state_lib

from transfer_helpers import pretrained_tiny_world

# The presets as jaxrec wrote them for NextItNet before they were derived
# from the backbone's declarations (regular expressions over leaf paths;
# `train_ln1` dropped "blocks/ln1/.*").
_BACKBONE = ("item_embedding/.*", "tokens/mask")
NEXTITNET_BEFORE = {
    "peter": (_BACKBONE + ("blocks/conv[12]/.*", "blocks/alpha",
                           "blocks/ln1/.*"), 0),
    "fine_all": ((), 0),
    "fine_cls": (_BACKBONE + ("blocks/.*", "block_norms/.*"), 0),
    "fine_last1": (_BACKBONE + ("blocks/(conv1|ln1|ln2)/.*",
                                "blocks/alpha"), 1),
    "fine_last2": (_BACKBONE + ("blocks/(ln1|ln2)/.*", "blocks/alpha"), 1),
    "peter_zero": ((), 0),
}


def source(name="nextitnet", **kw):
  """A pretraining run's config, its sizes taken from data."""
  base = dict(num_items=30, embed_dim=8, num_blocks=2)
  if name == "sasrec":
    base["num_positions"] = 12
  model = config.model_config_class(name)(**{**base, **kw})
  return config.Config(model=model, data=config.DataConfig(max_len=12))


def tuning(src, preset, train_ln1=False, **train):
  return peterrec.finetune_config(
      src, "profile", "profile.txt", preset, "serial", 4, "/pretrained",
      config.TrainConfig(**train), config.DataConfig(), train_ln1)


def frozen_paths(params, freeze):
  labels = optim.trainable_labels(params, freeze)
  return {optim.path_name(p) for p, label in
          jax.tree_util.tree_leaves_with_path(labels)
          if label == optim.FROZEN}


@pytest.mark.parametrize("train_ln1", [False, True])
@pytest.mark.parametrize("model", [
    dict(), dict(causal=False), dict(residual="plain")],
    ids=["causal", "masked", "plain"])
def test_nextitnet_presets_freeze_exactly_what_they_froze_before(model,
                                                                 train_ln1):
  src = source(**model)
  for preset, (before, top_blocks) in NEXTITNET_BEFORE.items():
    if train_ln1:
      before = tuple(p for p in before if p != "blocks/ln1/.*")
    cfg = tuning(src, preset, train_ln1)
    params = models.init_params(cfg, jax.random.key(0))
    want = frozen_paths(params, before)
    assert frozen_paths(params, cfg.train.freeze) == want, preset
    assert cfg.train.train_top_blocks == top_blocks
    assert bool(cfg.train.frozen_from) == bool(want)
  # And the sets are what each preset says (not empty by accident).
  peter = frozen_paths(params, tuning(src, "peter", train_ln1).train.freeze)
  assert "blocks/ln2/scale" not in peter and "blocks/conv2/kernel" in peter
  assert ("blocks/ln1/scale" in peter) != train_ln1


@pytest.mark.parametrize("name", ["nextitnet", "sasrec"])
def test_each_declared_layer_names_real_block_leaves(name):
  rules = models.get(name).surgery
  cfg = config.Config(model=source(name).model)
  blocks = models.init_params(cfg, jax.random.key(0))["blocks"]
  leaves = [optim.path_name(p)
            for p, _ in jax.tree_util.tree_leaves_with_path(blocks)]

  def matched(patterns):
    return {leaf for leaf in leaves
            if any(fnmatch.fnmatchcase(leaf, p) for p in patterns)}

  assert len(rules.layers) == 2
  seen = set()
  for layer in rules.layers:
    weights, norm = matched(layer.weights), matched(layer.norm)
    assert weights and norm
    assert norm <= matched(rules.norms)  # A layer's norm is a norm ...
    assert not weights & matched(rules.norms + rules.gates)  # ... weights not.
    assert not (weights | norm) & seen  # No leaf in two layers.
    seen |= weights | norm
  # NextItNet's layer pairs (CpRec's second -> first) are these layers.
  pairs = cfg.model.layer_pairs()
  if pairs:
    first, second = rules.layers

    def top(layer_patterns):
      return layer_patterns[0].split("/")[0]

    assert pairs == {top(second.weights): top(first.weights),
                     top(second.norm): top(first.norm)}


def test_sasrec_presets_name_its_layers():
  src = source("sasrec", residual="alpha")
  params = None
  frozen = {}
  for preset in ("peter", "fine_cls", "fine_last1", "fine_last2"):
    cfg = tuning(src, preset)
    params = models.init_params(cfg, jax.random.key(0))
    frozen[preset] = frozen_paths(params, cfg.train.freeze)
  every = {optim.path_name(p)
           for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  outside = {p for p in every if p.startswith(("item_embedding/",
                                               "position_embedding/",
                                               "final_norm/"))}
  assert outside and all(outside <= f for f in frozen.values())
  trained = {k: every - f - outside for k, f in frozen.items()}
  own = {"head/kernel", "head/bias", "tokens/cls", "tokens/unk"}
  assert trained["fine_cls"] == own
  assert trained["fine_last1"] == own | {
      "blocks/ffn_in/kernel", "blocks/ffn_in/bias", "blocks/ffn_out/kernel",
      "blocks/ffn_out/bias"}
  assert {p for p in trained["fine_last2"] - trained["fine_last1"]} == {
      p for p in every if p.startswith("blocks/attention/")}
  assert {p for p in trained["peter"] if p.startswith("blocks/")} == {
      "blocks/ln_ffn/scale", "blocks/ln_ffn/bias"}
  ln1 = frozen_paths(params, tuning(src, "peter", True).train.freeze)
  assert frozen["peter"] - ln1 == {"blocks/ln_attn/scale",
                                   "blocks/ln_attn/bias"}


def test_a_backbone_that_declares_too_little_is_refused_in_one_line(
    monkeypatch):
  sasrec = models.get("sasrec")
  registry = models._BACKBONES  # pylint: disable=protected-access
  one_layer = dataclasses.replace(sasrec.surgery,
                                  layers=sasrec.surgery.layers[-1:])
  monkeypatch.setitem(registry, "sasrec",
                      dataclasses.replace(sasrec, surgery=one_layer))
  src = source("sasrec")
  tuning(src, "fine_last1")
  with pytest.raises(JaxrecError, match=r"^--preset=fine_last2: trains the "
                     r"top block's last 2 layer\(s\), but backbone 'sasrec' "
                     r"declares 1 \(SurgeryRules.layers\)$"):
    tuning(src, "fine_last2")
  bare = dataclasses.replace(sasrec.surgery, layers=())
  monkeypatch.setitem(registry, "sasrec",
                      dataclasses.replace(sasrec, surgery=bare))
  with pytest.raises(JaxrecError, match="^--preset=peter: trains the norm "
                     "of each block's last layer, but backbone 'sasrec' "
                     "declares none"):
    peterrec.check_source(src, "runs/pre", "peter")
  for preset in ("fine_all", "fine_cls", "peter_zero"):
    tuning(src, preset)  # Nothing layer-wise needed.


def test_a_source_with_a_policy_is_refused_in_one_line():
  src = source("sasrec", residual="alpha").with_method(SkipRecConfig())
  with pytest.raises(JaxrecError, match=r"runs/pre: runs methods "
                     r"\['skiprec'\], which a fine-tuning does not carry "
                     r"over .*fine-tune the run they were added to"):
    peterrec.check_source(src, "runs/pre", "peter")


def test_a_compressed_source_keeps_its_sharing_under_the_patches():
  src = source("nextitnet", num_blocks=4).with_method(CpRecConfig())
  peterrec.check_source(src, "runs/pre", "peter")
  cfg = tuning(src, "peter")
  assert [m.NAME for m in cfg.methods] == ["cprec", "peterrec"]
  params = models.abstract_params(cfg)
  chex.assert_tree_shape_prefix(params["blocks"], (2,))  # Stored blocks.
  chex.assert_tree_shape_prefix(params["peterrec"], (4,))  # Positions.



@pytest.mark.parametrize("preset", ["peter", "fine_cls"])
def test_a_compressed_source_norms_beside_shared_blocks_freeze_as_the_blocks(
    preset):
  # CpRec sharing convs only keeps each position's norms and gates in
  # `block_norms`: a preset freezes them exactly as it freezes the blocks'.
  src = source("nextitnet", num_blocks=4).with_method(
      CpRecConfig(share="cross_layer", leaves="convs"))
  cfg = tuning(src, preset)
  params = models.init_params(cfg, jax.random.key(0))
  frozen = frozen_paths(params, cfg.train.freeze)
  norms = {"block_norms/" + optim.path_name(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(params["block_norms"])}
  assert norms, "the source keeps no per-position norms"
  unshared = tuning(source("nextitnet", num_blocks=4), preset)
  frozen_unshared = frozen_paths(
      models.init_params(unshared, jax.random.key(0)), unshared.train.freeze)
  for name in norms:
    as_block = "blocks/" + name.partition("/")[2]
    assert (name in frozen) == (as_block in frozen_unshared), name


# ------------------------------------------------- SASRec, end to end


@pytest.fixture(scope="module")
def sasrec_world(tmp_path_factory):
  """A tiny two-domain world and a SASRec pretrained on its source."""
  root = tmp_path_factory.mktemp("sasrec_finetune")
  paths = pretrained_tiny_world(root, "sasrec")
  return root, paths


def finetune_live(monkeypatch, root, paths, out, preset):
  """Fine-tunes; returns (the live frozen leaves at the end of training,
  as the loop hands them to its final test, the run's params and
  config, the tree it started from)."""
  seen = {}
  finish = loop._finish  # pylint: disable=protected-access

  def spy(*args, **kwargs):
    bound = inspect.signature(finish).bind(*args, **kwargs)
    seen["frozen"] = jax.device_get(bound.arguments["frozen"])
    return finish(*args, **kwargs)

  monkeypatch.setattr(loop, "_finish", spy)
  peterrec.finetune(str(root / "pre"), "profile", paths["profile"], out,
                    preset, train=config.TrainConfig(
                        steps=4, eval_every=4, batch_size=16,
                        learning_rate=0.01),
                    progress_bar=False)
  tuned, cfg, _ = state_lib.load_params(out)
  pretrained, _, _ = state_lib.load_params(str(root / "pre"))
  start = peterrec.transfer_params(pretrained, cfg,
                                   jax.random.key(cfg.train.seed))
  return seen["frozen"], tuned, cfg, start


def test_a_longer_window_than_sasrec_pretrained_on_is_refused_in_one_line(
    sasrec_world, tmp_path):
  root, paths = sasrec_world
  pre_len = state_lib.load_params(str(root / "pre"))[1].data.max_len
  with pytest.raises(JaxrecError, match=(
      f"--max-len={pre_len + 1}: .* pretrained at max_len {pre_len}, with "
      "position vectors for no more")):
    peterrec.finetune(str(root / "pre"), "profile", paths["profile"],
                      str(tmp_path / "x"), "peter", progress_bar=False,
                      max_len=pre_len + 1)
  assert not (tmp_path / "x").exists()


def changed(a, b):
  return not np.array_equal(np.asarray(a), np.asarray(b))


def test_peter_on_sasrec_trains_patches_norms_and_head_only(
    sasrec_world, tmp_path, monkeypatch):
  root, paths = sasrec_world
  live, tuned, cfg, start = finetune_live(monkeypatch, root, paths,
                                          str(tmp_path / "peter"), "peter")
  assert cfg.model.name == "sasrec" and cfg.train.frozen_from
  # Every frozen leaf, as training left it, is the pretrained one.
  assert frozen_paths(start, cfg.train.freeze) == {
      optim.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(
          live)}
  chex.assert_trees_all_equal(live, state_lib.frozen_params(start, cfg))
  for name in ("attention", "ffn_in", "ffn_out", "ln_attn"):
    assert name in live["blocks"]
  assert "position_embedding" in live and "final_norm" in live
  # What the preset trains moved.
  assert changed(tuned["blocks"]["ln_ffn"]["scale"],
                 start["blocks"]["ln_ffn"]["scale"])
  assert any(changed(a, b) for a, b in zip(
      jax.tree.leaves(tuned["peterrec"]), jax.tree.leaves(start["peterrec"])))
  assert changed(tuned["head"]["kernel"], start["head"]["kernel"])


def test_fine_cls_on_sasrec_trains_only_the_head(sasrec_world, tmp_path,
                                                 monkeypatch):
  root, paths = sasrec_world
  live, tuned, cfg, start = finetune_live(monkeypatch, root, paths,
                                          str(tmp_path / "cls"), "fine_cls")
  labels = optim.trainable_labels(start, cfg.train.freeze)
  trainable = {optim.path_name(p) for p, label in
               jax.tree_util.tree_leaves_with_path(labels)
               if label == optim.TRAIN}
  assert trainable == {"head/kernel", "head/bias", "tokens/cls",
                       "tokens/unk"}
  chex.assert_trees_all_equal(live, state_lib.frozen_params(start, cfg))
  assert set(live) == {"item_embedding", "position_embedding", "blocks",
                       "final_norm"}
  assert changed(tuned["head"]["kernel"], start["head"]["kernel"])
