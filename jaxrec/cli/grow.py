"""`jaxrec grow`: stack a trained model into a deeper one (StackRec)."""
from __future__ import annotations

import argparse
import os
from typing import Any

from jaxrec import models
from jaxrec.errors import JaxrecError
from jaxrec.methods.stackrec import growth
from jaxrec.training import checkpoints
from jaxrec.training import checkpoint_meta


def add_parser(sub: Any) -> argparse.ArgumentParser:
  p = sub.add_parser(
      "grow", help="stack a trained model into a deeper one (StackRec)",
      description="Grow a run's checkpoint into a deeper model in --out; "
      "continue training it with `jaxrec train --init-from NEW_DIR`.")
  p.add_argument("--from", dest="src", required=True, metavar="DIR",
                 help="run directory to grow (see --source)")
  p.add_argument("--out", required=True, metavar="NEW_DIR",
                 help="directory for the grown checkpoint (must hold none)")
  p.add_argument("--method", required=True, choices=growth.METHODS,
                 help="adjacent: deep i <- i//2 (stackA); cross: i mod L "
                      "(stackC); random_top: bottom copied, top fresh "
                      "(StackR); embed_only: only the item embedding (StackE)")
  p.add_argument("--preset", default="paper", choices=growth.PRESETS,
                 help="paper: copy convs + embedding, reset LayerNorm, alpha "
                      "and softmax (official); preserve: copy all, duplicates "
                      "get alpha 0 (same outputs); full: copy all "
                      "(default: paper)")
  p.add_argument("--times", type=int, default=1, metavar="N",
                 help="grow N times: 4 -> 8 -> 16 ... (default: 1)")
  p.add_argument("--dilations", default=None, choices=growth.DILATION_POLICIES,
                 help="position: dilation follows the new position "
                      "(official); carry: a copy keeps its source's dilation "
                      "(default: carry for preserve, else position)")
  p.add_argument("--top", type=int, default=None, metavar="K",
                 help="duplicate only the top K blocks (deep depth L+K)")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the re-initialised parts (default: 0)")
  p.add_argument("--source", choices=("best", "latest"), default=None,
                 help="which checkpoint of --from to grow (default: best, "
                      "else latest)")
  p.add_argument("--map-opt-state", action="store_true",
                 help="also grow the Adam moments of the latest checkpoint "
                      "(used by `train --init-from NEW_DIR "
                      "--init-opt-state`; without it the optimizer starts "
                      "fresh, as the paper)")
  return p


def run(args: argparse.Namespace) -> None:
  """Grows, then prints a one-line summary."""
  _, meta = checkpoints.read_meta(args.src, args.source)
  src = checkpoint_meta.config_from_meta(meta, args.src)
  check_fits_memory(src, args.times, args.top, args.map_opt_state)
  cfg = growth.grow_checkpoint(
      args.src, args.out, args.method, args.preset, times=args.times,
      dilations=args.dilations, top=args.top, seed=args.seed,
      map_opt_state=args.map_opt_state, kind=args.source)
  derived = cfg.model.derived()
  dilations = (f", dilations {derived['dilations']}"
               if "dilations" in derived else "")
  print(f"grew {args.src} -> {args.out}: {src.model.num_blocks} -> "
        f"{cfg.model.num_blocks} blocks, {_count(src):,} -> "
        f"{_count(cfg):,} params ({args.method}, {args.preset}{dilations})")


def _count(cfg: Any) -> int:
  return models.count_params(models.abstract_params(cfg))


def check_fits_memory(src: Any, times: int, top: int | None,
                      with_opt_state: bool) -> None:
  """Refuses a growth whose result cannot fit in this machine's memory
  (`--times 40` doubles 40 times: it used to eat all memory, then die)."""
  if not isinstance(times, int) or times < 1:
    return  # growth.check_options names it.
  depth = src.model.num_blocks
  deep = depth * 2 ** times if top is None else depth + top * times
  # The blocks dominate: scaling every param by the depth is an upper bound.
  count = _count(src) * deep // depth
  copies = 3 if with_opt_state else 1  # Params, and Adam's two moments.
  need = 4 * count * copies
  have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if need > have:
    raise JaxrecError(f"--times={times}: the grown model would have {deep:,} "
                      f"blocks, about {need / 2**30:,.1f} GiB, more than this "
                      f"machine's {have / 2**30:,.1f} GiB of memory")
