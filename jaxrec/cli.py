"""The `jaxrec` command: train, eval, inspect, grow.

Options come from three layers, later ones winning: the dataclass defaults in
`jaxrec.config`, a `--config FILE` (YAML or JSON with sections model, data,
train), and flags. Every config field has a flag (`--num-blocks`,
`--learning-rate`, ...). A user mistake prints one line,
`jaxrec: error: ...`, and exits with status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any, Sequence

from jaxrec import config as config_lib
from jaxrec.errors import JaxrecError

HELP = {
    # model
    "embed_dim": "embedding size = conv channels C",
    "num_blocks": "residual blocks (two dilated convs each)",
    "kernel_size": "conv kernel width k",
    "dilations": "cycle of first-conv dilations, e.g. '1,4' (second conv "
                 "uses 2d); as long as --num-blocks to pin every block",
    "residual": "alpha: x + a*h with learned a (init 0, StackRec); plain: "
                "x + h (NextItNet)",
    "tie_embeddings": "use the item embedding as the output softmax matrix",
    "dtype": "compute dtype (params stay float32); bfloat16 on GPU/TPU",
    "layer_norm_eps": "LayerNorm epsilon (official code: 1e-8)",
    "num_items": "number of item ids incl. padding; taken from the data",
    # data
    "source": "synthetic[:SIZE] | movielens:PATH | csv:PATH | "
              "recbole:PATH.inter | tfds:NAME",
    "protocol": "loo: leave-one-out (valid = 2nd-to-last, test = last); "
                "paper: 80/20 split by sequence plus a valid slice",
    "max_len": "items a model sees before each prediction",
    "min_user_count": "k-core: drop users with fewer interactions",
    "min_item_count": "k-core: drop items with fewer interactions",
    "window": "split long training histories into windows of this length "
              "(0: keep only the last max_len items)",
    "test_fraction": "paper protocol: share of sequences held out for test",
    "valid_fraction": "paper protocol: share of sequences for validation",
    "split_seed": "paper protocol: shuffle seed",
    "cache_dir": "processed-data cache (default ~/.cache/jaxrec or "
                 "$JAXREC_CACHE)",
    "user_col": "csv: user column name",
    "item_col": "csv: item column name",
    "time_col": "csv: timestamp column name",
    "delimiter": "csv: field delimiter (default: tab for .tsv, else comma)",
    # train
    "batch_size": "sequences per step (a multiple of the device count)",
    "steps": "optimiser steps",
    "learning_rate": "Adam learning rate",
    "schedule": "constant | cosine | warmup_cosine",
    "warmup_steps": "warmup steps for warmup_cosine",
    "weight_decay": "> 0 switches Adam to AdamW",
    "clip_norm": "> 0 clips the global gradient norm",
    "loss": "full: chunked full softmax; sampled: sampled softmax with logQ "
            "correction",
    "loss_chunk": "items per tile of the full softmax and of evaluation",
    "num_samples": "negatives per step for the sampled softmax",
    "sampler": "uniform | log_uniform | unigram (sampled softmax)",
    "eval_every": "steps between validations and checkpoints",
    "eval_batch_size": "sequences per evaluation batch",
    "select_metric": "validation metric for early stopping and the best "
                     "checkpoint",
    "patience": "validations without improvement before stopping (0: off)",
    "mask_history": "evaluation: never rank items already in the input",
    "keep_checkpoints": "latest checkpoints kept for --resume",
    "seed": "seed of init, batch order and sampling",
    "tensorboard": "also write TensorBoard events to DIR/tb (pip install -e .[tensorboard])",
}
FLAG_ALIASES = {"source": "--data"}


def flag_for(field_name: str) -> str:
  """The command-line flag of a config field: num_blocks -> --num-blocks."""
  return FLAG_ALIASES.get(field_name, "--" + field_name.replace("_", "-"))


class Parser(argparse.ArgumentParser):
  """argparse that raises JaxrecError instead of printing usage and exiting."""

  def error(self, message: str):
    raise JaxrecError(f"{self.prog}: {message}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
  """One flag per config field, default None (= keep file/default value)."""
  for section, cls in config_lib.SECTIONS.items():
    group = parser.add_argument_group(f"{section} options")
    for field in dataclasses.fields(cls):
      flag = flag_for(field.name)
      default = field.default
      if isinstance(default, tuple):
        default = ",".join(map(str, default))
      group.add_argument(flag, dest=f"{section}.{field.name}", default=None,
                         metavar=field.name.upper(),
                         help=f"{HELP.get(field.name, '')} "
                              f"(default: {default!r})")


def config_from_args(args: argparse.Namespace) -> config_lib.Config:
  raw: dict[str, Any] = {}
  if getattr(args, "config", None):
    raw = config_lib.load_file(args.config)
  cfg = config_lib.from_dict(raw, origin=args.config or "config")
  parts = {}
  for section, cls in config_lib.SECTIONS.items():
    current = getattr(cfg, section)
    updates = {}
    for field in dataclasses.fields(cls):
      value = getattr(args, f"{section}.{field.name}", None)
      if value is not None:
        updates[field.name] = config_lib.coerce(field, value,
                                                flag_for(field.name))
    parts[section] = dataclasses.replace(current, **updates)
  return config_lib.Config(**parts)


def build_parser() -> Parser:
  parser = Parser(prog="jaxrec", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True,
                              parser_class=Parser)

  p = sub.add_parser("train", help="train a model and write DIR/metrics.json",
                     description="Train NextItNet; writes DIR/config.json, "
                     "DIR/metrics.json, DIR/metrics.jsonl and Orbax "
                     "checkpoints under DIR/checkpoints.")
  p.add_argument("--out", required=True, metavar="DIR",
                 help="run directory")
  p.add_argument("--config", metavar="FILE",
                 help="YAML or JSON config (sections model, data, train); "
                      "flags override it")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in --out from its latest checkpoint")
  p.add_argument("--init-from", metavar="DIR",
                 help="start from the params of another run or grown "
                      "checkpoint (its model config is used)")
  p.add_argument("--init-opt-state", action="store_true",
                 help="with --init-from: also take its optimizer state (e.g. "
                      "Adam moments grown by `jaxrec grow --map-opt-state`); "
                      "default: a fresh optimizer, as the paper")
  p.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (multi-host)")
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  add_config_flags(p)

  p = sub.add_parser("eval", help="evaluate a run's best checkpoint",
                     description="Full-ranking metrics of a checkpoint on "
                     "its data (or --data), printed as JSON.")
  p.add_argument("--ckpt", required=True, metavar="DIR",
                 help="run directory (uses its best checkpoint)")
  p.add_argument("--data", dest="source", metavar="SOURCE",
                 help="evaluate on another source (same item ids needed)")
  p.add_argument("--protocol", choices=("loo", "paper"))
  p.add_argument("--split", choices=("valid", "test", "both"),
                 default="both")
  p.add_argument("--mask-history", action="store_true",
                 help="never rank items already in the input")
  p.add_argument("--sampled", type=int, default=0, metavar="N",
                 help="rank against N random negatives instead of all "
                      "items (reported as sampled:N)")

  p = sub.add_parser("inspect", help="show a checkpoint's param tree and "
                     "lineage")
  p.add_argument("dir", metavar="DIR")
  p.add_argument("--kind", choices=("best", "latest"), default=None,
                 help="which checkpoint (default: best if present)")

  from jaxrec import growth  # pylint: disable=import-outside-toplevel
  growth.add_grow_parser(sub)
  return parser


def cmd_train(args: argparse.Namespace) -> None:
  cfg = config_from_args(args).validate()
  if args.distributed:
    import jax  # pylint: disable=import-outside-toplevel
    jax.distributed.initialize()
  from jaxrec import train  # pylint: disable=import-outside-toplevel
  result = train.train(cfg, args.out, resume=args.resume,
                       init_from=args.init_from,
                       init_opt_state=args.init_opt_state,
                       progress_bar=not args.quiet)
  print(format_summary(result))


def format_summary(result: dict[str, Any]) -> str:
  """Test metrics of the model next to the popularity baseline."""
  rows = [f"{'metric':<10}{'model':>10}{'popularity':>12}"]
  for name in config_lib.METRIC_NAMES:
    rows.append(f"{name:<10}{result['test'][name]:>10.4f}"
                f"{result['popularity'][name]:>12.4f}")
  head = (f"test ({result['test']['count']} users, full ranking, "
          f"best step {result['best_step']}, "
          f"{result['train_time_s']:.0f}s training)")
  return "\n".join([head] + rows)


def cmd_eval(args: argparse.Namespace) -> None:
  from jaxrec import evaluation  # pylint: disable=import-outside-toplevel
  out = evaluation.evaluate_checkpoint(
      args.ckpt, source=args.source, protocol=args.protocol,
      split=args.split, mask_history=args.mask_history,
      sampled=args.sampled)
  print(json.dumps(out, indent=2, sort_keys=True))


def cmd_inspect(args: argparse.Namespace) -> None:
  from jaxrec import evaluation  # pylint: disable=import-outside-toplevel
  print(evaluation.describe_checkpoint(args.dir, args.kind))


def cmd_grow(args: argparse.Namespace) -> None:
  from jaxrec import growth  # pylint: disable=import-outside-toplevel
  growth.cmd_grow(args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "inspect": cmd_inspect,
            "grow": cmd_grow}


def main(argv: Sequence[str] | None = None) -> int:
  # Orbax logs every read-only open through absl; keep the terminal clean.
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    args = build_parser().parse_args(argv)
    COMMANDS[args.command](args)
  except JaxrecError as e:
    print(f"jaxrec: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxrec: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
