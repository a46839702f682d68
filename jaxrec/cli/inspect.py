"""`jaxrec inspect`: a checkpoint's param tree, counts and lineage."""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
  p = sub.add_parser("inspect", help="show a checkpoint's param tree and "
                     "lineage")
  p.add_argument("dir", metavar="DIR")
  p.add_argument("--kind", choices=("best", "latest"), default=None,
                 help="which checkpoint (default: best if present)")
  return p


def run(args: argparse.Namespace) -> None:
  from jaxrec import evaluation  # pylint: disable=import-outside-toplevel
  print(evaluation.describe_checkpoint(args.dir, args.kind))
