"""PeterRec's fine-tuning: a pretrained backbone (NextItNet or SASRec),
fine-tuned for a downstream task by training small patches inside the
frozen network.

`finetune(pretrained_dir, task, data_path, out_dir, preset=...)` is the
whole method; `jaxrec finetune` calls it. Steps:

1. Restore the pretrained run (causal next-item or masked pretraining) and
   its vocabulary; read the downstream file through that vocabulary
   (`jaxrec.data.transfer`).
2. Build the fine-tuning model: the same backbone plus CLS and UNK input
   tokens and, for the PeterRec presets, model patches
   (`methods.peterrec`, `patches.py`: zero-initialised, so the patched
   network computes what the pretrained one did); the pretrained softmax
   is dropped and a new head over the task's outputs added
   (`head.num_classes`).
3. Copy every pretrained leaf the new tree has (embedding, blocks, MASK);
   what is new (patches, tokens, head) starts as at init.
4. Trainability is data (`train.freeze`, `train.train_top_blocks`): frozen
   leaves get no gradient and no optimizer state, and a run that freezes
   pretrained leaves stores only its trainable ones (`train.frozen_from`),
   with the pretrained checkpoint and the fingerprint of its frozen leaves
   in the lineage. The training loop keeps the head's outputs by name in
   OUT/outputs.json, so `jaxrec predict`/`export` serve the fine-tuning.

Presets (the paper's arms; every preset trains the head and the CLS/UNK
vectors). They are written in what the backbone declares
(`SurgeryRules.layers`: each block's layers, bottom to top, each with its
norm), not in its leaf names, so they hold for any backbone that declares
its layers; one that does not is refused in one line by the presets that
need them. Every preset but fine_all and peter_zero freezes the
backbone's leaves outside its block stacks (embeddings; SASRec's final
norm) and the pretraining's special tokens (MASK); in the blocks:

  peter       patches + the norm of each block's last layer (NextItNet:
              ln2, the official code's var_list; SASRec: ln_ffn, the
              pre-norm of the feed-forward); `train_ln1` also trains the
              norms of the layers below (NextItNet: ln1; SASRec: ln_attn)
  fine_all    everything, no patches (FineAll)
  fine_cls    the head only (FineCLS)
  fine_last1  the head + the top block's last layer's weights (FineLast1:
              NextItNet's second conv, SASRec's feed-forward)
  fine_last2  the head + the top block's last two layers' weights
              (FineLast2: both convs; attention and feed-forward)
  peter_zero  the patched architecture from scratch, all trainable
              (PeterZero: no pretraining)

Gates (alpha) and norms a preset does not name stay frozen. For NextItNet
these are the leaves the presets named before they were written in layers
(tests/test_finetune_backbones.py checks the sets on a real tree).

Where jaxrec differs from the official code: `up` starts at zero (the
official draws it from N(0, 0.02)); the parallel placement adds the bare
branch beside a conv (the official adds the whole patch, identity
included, so its parallel net does not start at the pretrained one); CLS
and UNK are learned vectors (the official reuses id 0, which jaxrec keeps
as zero padding); the loss is the full softmax over the target items (the
paper's BCE with one sampled negative is not offered); evaluation ranks
every target item (the official samples 99, and tests on a few batches).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import sys
from typing import Any

import jax

from jaxrec import heads, method_api, models
from jaxrec.config import Config, DataConfig, TrainConfig
from jaxrec.data import transfer as transfer_data
from jaxrec.data import vocabulary
from jaxrec.errors import JaxrecError
from jaxrec.methods.peterrec.config import PLACEMENTS, PeterRecConfig
from jaxrec.tasks import transfer as transfer_task
from jaxrec.training import checkpoints, loop, optim
from jaxrec.training import state as state_lib


@dataclasses.dataclass(frozen=True)
class Preset:
  """One arm: patches or not, pretrained or fresh, and what of the
  backbone's block stacks trains (`trains`, one of the names below)."""
  patches: bool
  pretrained: bool
  trains: str
  layers: int = 0  # trains=LAYERS: how many of the block's top layers.
  top_blocks: int = 0  # > 0: only the top block's rows of trainable stacks.


# What of the block stacks a preset trains (the rest of the backbone is
# frozen unless it trains ALL):
ALL = "all"  # every leaf, nothing frozen
NOTHING = "nothing"  # no block leaf
NORMS = "norms"  # the last layer's norm (train_ln1: every layer's norm)
LAYERS = "layers"  # the weights of the block's top `layers` layers

PRESETS = {
    "peter": Preset(True, True, NORMS),
    "fine_all": Preset(False, True, ALL),
    "fine_cls": Preset(False, True, NOTHING),
    "fine_last1": Preset(False, True, LAYERS, layers=1, top_blocks=1),
    "fine_last2": Preset(False, True, LAYERS, layers=2, top_blocks=1),
    "peter_zero": Preset(True, False, ALL),
}
# Special tokens a fine-tuning adds and trains; the pretraining's (MASK)
# belong to the frozen backbone.
OWN_TOKENS = ("cls", "unk")


def check_preset(model_name: str, preset: str) -> None:
  """Refuses, in one line, a backbone that does not declare the layers
  (`SurgeryRules.layers`) `preset` is written in."""
  if preset not in PRESETS:
    raise JaxrecError(f"--preset={preset!r}: expected one of "
                      f"{list(PRESETS)}")
  arm = PRESETS[preset]
  layers = models.get(model_name).surgery.layers
  if arm.trains == LAYERS and len(layers) < arm.layers:
    raise JaxrecError(f"--preset={preset}: trains the top block's last "
                      f"{arm.layers} layer(s), but backbone {model_name!r} "
                      f"declares {len(layers)} (SurgeryRules.layers)")
  if arm.trains == NORMS and not (layers and layers[-1].norm):
    raise JaxrecError(f"--preset={preset}: trains the norm of each block's "
                      f"last layer, but backbone {model_name!r} declares "
                      "none (SurgeryRules.layers)")


def trained_block_leaves(model_name: str, preset: str,
                         train_ln1: bool = False) -> tuple[str, ...]:
  """fnmatch patterns of the block leaves `preset` trains (ALL: every)."""
  check_preset(model_name, preset)
  arm = PRESETS[preset]
  layers = models.get(model_name).surgery.layers
  if arm.trains == ALL:
    return ("*",)
  if arm.trains == NORMS:
    normed = layers if train_ln1 else layers[-1:]
    return tuple(p for layer in normed for p in layer.norm)
  if arm.trains == LAYERS:
    return tuple(p for layer in layers[-arm.layers:] for p in layer.weights)
  return ()


def frozen_leaves(cfg: Config, preset: str,
                  train_ln1: bool = False) -> set[str]:
  """Paths of the leaves `preset` freezes in the tree of `cfg` (a
  fine-tuning's config): in the block stacks every leaf it does not train;
  outside them the backbone's own leaves and the special tokens the
  pretraining had. The head, CLS/UNK and the methods' subtrees (the
  patches) always train."""
  trained = trained_block_leaves(cfg.model.name, preset, train_ln1)
  if PRESETS[preset].trains == ALL:
    return set()
  backbone = models.get(cfg.model.name)
  own = set(jax.eval_shape(
      lambda: backbone.init(cfg.model, jax.random.key(0))))
  # A method may keep block leaves per position outside the backbone's
  # stacks (CpRec's norms beside shared blocks, `block_norms`): the preset
  # decides them as it decides the blocks'. Without this they trained under
  # every preset, FineCLS included.
  stacks = set(backbone.surgery.stacks) | (
      set(method_api.stacks(cfg)) - set(method_api.get(PeterRecConfig.NAME).stacks(cfg)))
  out = set()
  for path, _ in jax.tree_util.tree_leaves_with_path(
      models.abstract_params(cfg)):
    name = optim.path_name(path)
    top, _, inner = name.partition("/")
    if top == "tokens":
      frozen = inner not in OWN_TOKENS
    elif top in stacks:
      frozen = not any(fnmatch.fnmatchcase(inner, p) for p in trained)
    else:
      frozen = top in own
    if frozen:
      out.add(name)
  return out


def frozen_patterns(cfg: Config, preset: str,
                    train_ln1: bool = False) -> tuple[str, ...]:
  """`train.freeze` for `preset` on the tree of `cfg` (a fine-tuning's
  config): `frozen_leaves` as regular expressions, a subtree whose leaves
  are all frozen as one (`item_embedding/.*`), so config.json reads as the
  preset."""
  frozen = frozen_leaves(cfg, preset, train_ln1)

  def walk(tree, prefix):
    if not isinstance(tree, dict):
      return [re.escape(prefix)] if prefix in frozen else []
    leaves = [f"{prefix}/{optim.path_name(p)}" if prefix else
              optim.path_name(p)
              for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    if prefix and leaves and all(leaf in frozen for leaf in leaves):
      return [re.escape(prefix) + "/.*"]
    return [pattern for key in sorted(tree) for pattern in
            walk(tree[key], f"{prefix}/{key}" if prefix else key)]

  return tuple(walk(models.abstract_params(cfg), ""))


def check_source(cfg: Config, origin: str, preset: str | None = None
                 ) -> None:
  """Refuses pretrained runs PeterRec cannot fine-tune, in one line: runs
  with methods other than compressions, fine-tunings, and (given
  `preset`) a backbone that does not declare what the preset needs.

  A compression (CpRec's sharing: `MethodConfig.COMPRESSES`) only stores
  the backbone otherwise, so patches per run position compose with it. A
  method with its own trained params (SkipRec's policy, fitted to
  next-item prediction) would have to be frozen or retrained for another
  task; fine-tune the run it was added to instead."""
  other = [m.NAME for m in cfg.methods if not m.COMPRESSES]
  if other:
    raise JaxrecError(f"{origin}: runs methods {other}, which a "
                      "fine-tuning does not carry over (only compressions "
                      "such as cprec do); fine-tune the run they were "
                      "added to (see its lineage)")
  state_lib.refuse_finetuning(cfg, origin, "PeterRec")
  if preset is not None:
    check_preset(cfg.model.name, preset)


def finetune_config(src: Config, task: str, data_path: str, preset: str,
                    placement: str, num_outputs: int, pretrained_dir: str,
                    train: TrainConfig, data: DataConfig,
                    train_ln1: bool = False, max_len: int | None = None
                    ) -> Config:
  """The fine-tuning run's config (see the module docstring). `max_len`
  (default: the pretraining's) is the downstream input's length."""
  check_preset(src.model.name, preset)
  if placement not in PLACEMENTS:
    raise JaxrecError(f"--placement={placement!r}: expected one of "
                      f"{list(PLACEMENTS)}")
  arm = PRESETS[preset]
  tokens = tuple(dict.fromkeys((*src.model.special_tokens, *OWN_TOKENS)))
  model = dataclasses.replace(src.model, special_tokens=tokens)
  data = dataclasses.replace(data, source=f"{task}:{data_path}",
                             max_len=max_len or src.data.max_len)
  head = heads.get("softmax").config(num_classes=num_outputs + 1)
  patches = (PeterRecConfig(placement=placement),) if arm.patches else ()
  methods = (*(m for m in src.methods if m.COMPRESSES), *patches)
  cfg = Config(model=model, head=head, data=data,
               train=dataclasses.replace(train, task=task, freeze=()),
               methods=methods)
  check_max_len(cfg, src, pretrained_dir)
  frozen = frozen_patterns(cfg.validate(), preset, train_ln1)
  train = dataclasses.replace(
      train, task=task, freeze=frozen, train_top_blocks=arm.top_blocks,
      frozen_from=os.path.abspath(pretrained_dir)
      if arm.pretrained and frozen else "")
  return cfg.replace(train=train).validate()


def check_max_len(cfg: Config, src: Config, pretrained_dir: str) -> None:
  """Refuses, in one line, a window longer than the pretraining's on a
  backbone whose parameters are tied to positions.

  A convolutional or recurrent backbone (the `any_length` capability)
  reads any length, so a fine-tuning may see more of each history than
  the pretraining did (profile labels live in old items too). A backbone
  with a position table (SASRec, HSTU, BERT4Rec) learned vectors for the
  pretraining's slots only: without this guard the fine-tuning would fail
  at its first batch, or read untrained rows of a larger table."""
  if (cfg.data.max_len > src.data.max_len
      and "any_length" not in src.model.capabilities()):
    raise JaxrecError(
        f"--max-len={cfg.data.max_len}: {pretrained_dir} is a "
        f"{cfg.model.name} pretrained at max_len {src.data.max_len}, with "
        "position vectors for no more; fine-tune it at that length or less")


def transfer_params(pretrained: models.Params, cfg: Config,
                    rng: jax.Array) -> models.Params:
  """A fresh tree of `cfg` with every pretrained leaf it shares copied in
  (the pretrained head is dropped: the new one has other outputs)."""
  fresh = models.init_params(cfg, rng)

  def take(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[0] == "head":
      return leaf
    old: Any = pretrained
    for name in names:
      if not isinstance(old, dict) or name not in old:
        return leaf
      old = old[name]
    if old.shape != leaf.shape:
      raise JaxrecError(f"{optim.path_name(path)}: pretrained shape "
                        f"{old.shape} but the fine-tuning model needs "
                        f"{leaf.shape}")
    return old

  return jax.tree_util.tree_map_with_path(take, fresh)


def finetune(pretrained_dir: str, task: str, data_path: str, out_dir: str,
             preset: str = "peter", placement: str = "serial",
             train: TrainConfig | None = None,
             data: DataConfig | None = None, train_ln1: bool = False,
             resume: bool = False, progress_bar: bool = True,
             kind: str | None = None,
             step_callback: Any = None,
             max_len: int | None = None) -> dict[str, Any]:
  """Fine-tunes `pretrained_dir` (its `kind` checkpoint, default best) on
  `task`; writes OUT/metrics.json (with `trainable_params`,
  `backbone_params` and the source ids the vocabulary did not know).
  `resume` continues a killed fine-tuning exactly; `step_callback` as in
  `jaxrec.training.loop.train`; `max_len` reads a longer (or shorter)
  window of each history than the pretraining did, where the backbone
  allows it (`check_max_len`)."""
  train = train or TrainConfig()
  data = data or DataConfig()
  kind = kind or checkpoints.default_kind(pretrained_dir)
  src_params, src_cfg, meta = state_lib.load_params(pretrained_dir, kind)
  check_source(src_cfg, pretrained_dir, preset)
  vocab = vocabulary.of_run(pretrained_dir)
  downstream = transfer_data.load(
      data_path, task, vocab, data, max_len or src_cfg.data.max_len,
      src_cfg.model.is_causal(), src_cfg.model.token_id("cls"),
      src_cfg.model.token_id("unk"))
  unknown = downstream.meta["unknown_source_tokens"]
  if unknown:
    print(f"jaxrec: warning: {data_path}: {unknown} of "
          f"{downstream.meta['source_tokens']} source ids are not in "
          f"{pretrained_dir}'s vocabulary; they read as the UNK token",
          file=sys.stderr)
  cfg = finetune_config(src_cfg, task, data_path, preset, placement,
                        downstream.meta["num_outputs"], pretrained_dir,
                        train, data, train_ln1, max_len)
  rng = jax.random.key(cfg.train.seed)
  params = (transfer_params(src_params, cfg, rng)
            if PRESETS[preset].pretrained else models.init_params(cfg, rng))
  frozen = state_lib.frozen_params(params, cfg)
  lineage = meta["lineage"] + [{
      "op": state_lib.FINETUNE_OP, "dir": os.path.abspath(pretrained_dir),
      "kind": kind, "step": meta["step"],
      "task": task, "preset": preset,
      "placement": placement if PRESETS[preset].patches else "none",
      "frozen_fingerprint": state_lib.tree_fingerprint(frozen)}]
  return loop.train(cfg, out_dir, data=downstream, resume=resume,
                    progress_bar=progress_bar, task=transfer_task,
                    params=params, lineage=lineage,
                    step_callback=step_callback)
