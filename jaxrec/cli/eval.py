"""`jaxrec eval`: metrics of a run's checkpoint, printed as JSON."""
from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
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
  return p


def run(args: argparse.Namespace) -> None:
  from jaxrec import evaluation  # pylint: disable=import-outside-toplevel
  out = evaluation.evaluate_checkpoint(
      args.ckpt, source=args.source, protocol=args.protocol,
      split=args.split, mask_history=args.mask_history,
      sampled=args.sampled)
  print(json.dumps(out, indent=2, sort_keys=True))
