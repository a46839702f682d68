"""`jaxrec finetune`: PeterRec and its baselines on a downstream task."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from jaxrec import config as config_lib
from jaxrec.cli import flags
from jaxrec.cli.train import format_summary

# Options the presets decide, and the downstream split's.
PRESET_FIELDS = ("task", "freeze", "train_top_blocks", "frozen_from")
DATA_FIELDS = ("valid_fraction", "test_fraction", "split_seed")


def add_parser(sub: Any) -> argparse.ArgumentParser:
  from jaxrec.methods.peterrec.config import PLACEMENTS  # pylint: disable=import-outside-toplevel
  from jaxrec.methods.peterrec import finetune as peterrec  # pylint: disable=import-outside-toplevel
  p = sub.add_parser(
      "finetune", help="fine-tune a pretrained run on a downstream task "
      "(PeterRec)", description="Fine-tune a pretrained backbone "
      "(NextItNet, causal or masked; SASRec) on cold-start recommendation "
      "(lines 's1,...,sn,,t1,...,tm') "
      "or user profiles (lines 's1,...,sn,,label'): PeterRec's patches or a "
      "baseline preset. Writes DIR/metrics.json (with trainable_params and "
      "backbone_params) and checkpoints that hold only the trainable leaves "
      "when the pretrained ones stay frozen.")
  p.add_argument("--from", dest="pretrained", required=True, metavar="RUN",
                 help="the pretraining run directory")
  p.add_argument("--kind", choices=("best", "latest"), default=None,
                 help="which of its checkpoints (default: best)")
  p.add_argument("--task", required=True, choices=("cold_start", "profile"))
  p.add_argument("--data", dest="data_path", required=True, metavar="PATH",
                 help="the downstream file")
  p.add_argument("--out", required=True, metavar="DIR", help="run directory")
  p.add_argument("--preset", default="peter", choices=list(peterrec.PRESETS),
                 help="what trains (see jaxrec/methods/peterrec/finetune.py)")
  p.add_argument("--placement", default="serial", choices=PLACEMENTS,
                 help="where PeterRec's patches go (peter, peter_zero)")
  p.add_argument("--train-ln1", action="store_true",
                 help="peter: also train the norms of each block's lower "
                      "layers (NextItNet: ln1; SASRec: ln_attn), not only "
                      "the last layer's")
  p.add_argument("--max-len", type=int, default=None, metavar="N",
                 help="inputs of N slots (the source's last N-1 or N-2 "
                      "items and CLS); default: the pretraining's max_len. "
                      "Longer only on backbones without a position table "
                      "(NextItNet, GRU4Rec, GRec)")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in --out from its latest checkpoint")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  train_fields = {f.name for f in dataclasses.fields(config_lib.TrainConfig)}
  flags.add_config_flags(p, {("train", n) for n in train_fields
                             if n not in PRESET_FIELDS}
                         | {("data", n) for n in DATA_FIELDS})
  return p


def run(args: argparse.Namespace) -> None:
  from jaxrec.methods.peterrec import finetune as peterrec  # pylint: disable=import-outside-toplevel
  cfg = flags.config_from_args(args)
  result = peterrec.finetune(
      args.pretrained, args.task, args.data_path, args.out, args.preset,
      args.placement, train=cfg.train, data=cfg.data,
      train_ln1=args.train_ln1, resume=args.resume,
      progress_bar=not args.quiet, kind=args.kind, max_len=args.max_len)
  print(format_summary(result))
  print(json.dumps({k: result[k] for k in ("trainable_params",
                                           "backbone_params",
                                           "unknown_source_tokens")}))
