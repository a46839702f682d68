"""`jaxrec extract`: a network inside a trained backbone saved as a run of
its own (GRec's encoder as a bidirectional NextItNet)."""
from __future__ import annotations

import argparse
from typing import Any

from jaxrec import models


def add_parser(sub: Any) -> argparse.ArgumentParser:
  p = sub.add_parser(
      "extract", help="save a part of a trained model as a run of its own",
      description="Save a network inside a run's backbone (Backbone.parts; "
      "GRec: encoder, a bidirectional NextItNet trained by gap filling) as "
      "step 0 of a new run in --out, with a fresh output head, its "
      "vocabulary and the lineage. Fine-tune it with `jaxrec finetune "
      "--from NEW_DIR` (PeterRec on GRec's encoder) or train it on with "
      "`jaxrec train --init-from NEW_DIR`.")
  p.add_argument("--from", dest="src", required=True, metavar="DIR",
                 help="the trained run")
  p.add_argument("--part", required=True, metavar="NAME",
                 help="which part (grec: encoder)")
  p.add_argument("--out", required=True, metavar="NEW_DIR",
                 help="directory for the part's run (must hold none)")
  p.add_argument("--source", choices=("best", "latest"), default=None,
                 help="which checkpoint of --from (default: best, else "
                      "latest)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the fresh output head (default: 0)")
  return p


def run(args: argparse.Namespace) -> None:
  """Extracts, then prints a one-line summary."""
  from jaxrec.surgery import parts  # pylint: disable=import-outside-toplevel
  cfg = parts.extract_checkpoint(args.src, args.out, args.part,
                                 seed=args.seed, kind=args.source)
  count = models.count_params(models.abstract_params(cfg))
  causal = "" if cfg.model.is_causal() else " (bidirectional)"
  print(f"extracted the {args.part} of {args.src} -> {args.out}: "
        f"{cfg.model.name}{causal}, {cfg.model.num_blocks} blocks, "
        f"{count:,} params with a fresh head; fine-tune it with "
        f"`jaxrec finetune --from {args.out}`")
