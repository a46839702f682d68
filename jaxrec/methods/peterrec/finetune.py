"""PeterRec's fine-tuning: a pretrained NextItNet, fine-tuned for a
downstream task by training small patches inside the frozen network.

`finetune(pretrained_dir, task, data_path, out_dir, preset=...)` is the
whole method; `jaxrec finetune` calls it. Steps:

1. Restore the pretrained run (causal next-item or masked pretraining) and
   its vocabulary; read the downstream file through that vocabulary
   (`jaxrec.data.transfer`).
2. Build the fine-tuning model: the same backbone plus CLS and UNK input
   tokens and, for the PeterRec presets, model patches
   (`methods.peterrec`, `patches.py`: zero-initialised, so the patched
   network computes what the pretrained one did); the pretrained softmax is dropped and a
   new head over the task's outputs added (`head.num_classes`).
3. Copy every pretrained leaf the new tree has (embedding, blocks, MASK);
   what is new (patches, tokens, head) starts as at init.
4. Trainability is data (`train.freeze`, `train.train_top_blocks`): frozen
   leaves get no gradient and no optimizer state, and a run that freezes
   pretrained leaves stores only its trainable ones (`train.frozen_from`),
   with the pretrained checkpoint and the fingerprint of its frozen leaves
   in the lineage.

Presets (the paper's arms; every preset trains the head and the CLS/UNK
vectors):

  peter       patches + each block's second LayerNorm (`train_ln1`: the
              first too), the official code's var_list
  fine_all    everything, no patches (FineAll)
  fine_cls    the head only (FineCLS)
  fine_last1  the head + the top block's second conv (FineLast1)
  fine_last2  the head + the top block's two convs (FineLast2)
  peter_zero  the patched architecture from scratch, all trainable
              (PeterZero: no pretraining)

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
import os
import sys
from typing import Any

import jax

from jaxrec import heads, models
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
  """One arm: patches or not, pretrained or fresh, what stays frozen."""
  patches: bool
  pretrained: bool
  frozen: tuple[str, ...]  # Regular expressions over leaf paths.
  top_blocks: int = 0  # > 0: only the top block's rows of trainable stacks.


_BACKBONE = ("item_embedding/.*", "tokens/mask")
PRESETS = {
    "peter": Preset(True, True, _BACKBONE + (
        "blocks/conv[12]/.*", "blocks/alpha", "blocks/ln1/.*")),
    "fine_all": Preset(False, True, ()),
    "fine_cls": Preset(False, True, _BACKBONE + ("blocks/.*",
                                                 "block_norms/.*")),
    "fine_last1": Preset(False, True, _BACKBONE + (
        "blocks/(conv1|ln1|ln2)/.*", "blocks/alpha"), top_blocks=1),
    "fine_last2": Preset(False, True, _BACKBONE + (
        "blocks/(ln1|ln2)/.*", "blocks/alpha"), top_blocks=1),
    "peter_zero": Preset(True, False, ()),
}


def frozen_patterns(preset: Preset, train_ln1: bool) -> tuple[str, ...]:
  if train_ln1:
    return tuple(p for p in preset.frozen if p != "blocks/ln1/.*")
  return preset.frozen


def check_source(cfg: Config, origin: str) -> None:
  """Refuses pretrained runs PeterRec cannot fine-tune, in one line."""
  if cfg.model.name != "nextitnet":
    raise JaxrecError(f"{origin}: a {cfg.model.name} model; PeterRec "
                      "fine-tunes NextItNet backbones")
  if cfg.methods:
    raise JaxrecError(f"{origin}: runs with methods "
                      f"{[m.NAME for m in cfg.methods]}; fine-tune a plain "
                      "backbone")
  state_lib.refuse_finetuning(cfg, origin, "PeterRec")


def finetune_config(src: Config, task: str, data_path: str, preset: str,
                    placement: str, num_outputs: int, pretrained_dir: str,
                    train: TrainConfig, data: DataConfig,
                    train_ln1: bool = False) -> Config:
  """The fine-tuning run's config (see the module docstring)."""
  if preset not in PRESETS:
    raise JaxrecError(f"--preset={preset!r}: expected one of "
                      f"{list(PRESETS)}")
  if placement not in PLACEMENTS:
    raise JaxrecError(f"--placement={placement!r}: expected one of "
                      f"{list(PLACEMENTS)}")
  arm = PRESETS[preset]
  tokens = tuple(dict.fromkeys((*src.model.special_tokens, "cls", "unk")))
  model = dataclasses.replace(src.model, special_tokens=tokens)
  frozen = frozen_patterns(arm, train_ln1)
  train = dataclasses.replace(
      train, task=task, freeze=frozen, train_top_blocks=arm.top_blocks,
      frozen_from=os.path.abspath(pretrained_dir)
      if arm.pretrained and frozen else "")
  data = dataclasses.replace(data, source=f"{task}:{data_path}",
                             max_len=src.data.max_len)
  head = heads.get("softmax").config(num_classes=num_outputs + 1)
  methods = (PeterRecConfig(placement=placement),) if arm.patches else ()
  return Config(model=model, head=head, data=data, train=train,
                methods=methods).validate()


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
             step_callback: Any = None) -> dict[str, Any]:
  """Fine-tunes `pretrained_dir` (its `kind` checkpoint, default best) on
  `task`; writes OUT/metrics.json (with `trainable_params`,
  `backbone_params` and the source ids the vocabulary did not know).
  `resume` continues a killed fine-tuning exactly; `step_callback` as in
  `jaxrec.training.loop.train`."""
  train = train or TrainConfig()
  data = data or DataConfig()
  kind = kind or checkpoints.default_kind(pretrained_dir)
  src_params, src_cfg, meta = state_lib.load_params(pretrained_dir, kind)
  check_source(src_cfg, pretrained_dir)
  vocab = vocabulary.of_run(pretrained_dir)
  downstream = transfer_data.load(
      data_path, task, vocab, data, src_cfg.data.max_len,
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
                        train, data, train_ln1)
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
