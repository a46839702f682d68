"""`jaxrec export`: the top-k scoring function as a jax.export file."""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
  p = sub.add_parser(
      "export", help="serialize the top-k scoring function (jax.export)",
      description="Write a zip holding the checkpoint's top-k function as "
      "a jax.export serialization (params baked in as constants, batch "
      "dimension symbolic; inputs int32 [batch, max_len] left-padded model "
      "ids), vocabulary.json and serving.json (a fine-tuning's also "
      "outputs.json, its outputs' names). Serving needs only jax: "
      "see the README's Serving section for the loader.")
  p.add_argument("--ckpt", required=True, metavar="DIR",
                 help="run directory (its best checkpoint, else latest)")
  p.add_argument("--out", required=True, metavar="FILE",
                 help="the zip to write")
  p.add_argument("--topk", type=int, default=10, metavar="K",
                 help="items per history, fixed in the export (default: 10)")
  p.add_argument("--exclude-seen", action="store_true",
                 help="never recommend an item of the input history "
                      "(refused for a fine-tuning)")
  p.add_argument("--platforms", default=None, metavar="P,P",
                 help="platforms to lower for, e.g. cpu,cuda (default: "
                      "this machine's)")
  return p


def run(args: argparse.Namespace) -> None:
  from jaxrec import serving  # pylint: disable=import-outside-toplevel
  platforms = args.platforms.split(",") if args.platforms else None
  spec = serving.export_topk(args.ckpt, args.out, args.topk,
                             args.exclude_seen, platforms=platforms)
  over = (f"{spec['num_outputs'] - 1} {spec['task']} outputs"
          if "task" in spec else f"{spec['num_items'] - 1} items")
  print(f"exported {args.ckpt} -> {args.out}: top-{spec['k']} over {over}, "
        f"inputs [batch, {spec['max_len']}], "
        f"platforms {','.join(spec['platforms'])}")
