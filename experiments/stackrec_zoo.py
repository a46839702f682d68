"""StackRec TS on every stacked backbone, through the harness: a model grown
2 -> 4 -> 8 blocks against the same 8-block model trained from scratch, at
an equal budget of optimiser steps and identical final architecture.

  python experiments/stackrec_zoo.py --data movielens-100k --min-count 1 \\
      --out results/stackrec_zoo_ml100k
  python experiments/stackrec_zoo.py --data synthetic:small \\
      --out results/stackrec_zoo_synthetic

Per backbone (`--models`) and seed (`--seeds`): `scratch` trains the final
depth for `--steps`; each grown arm (`--methods`, `--presets`) trains the
first depth for its share of the steps (`--shares`), grows 2x
(`jaxrec.methods.stackrec.growth`, from the latest checkpoint, as
progressive stacking does; dilations by position, so the grown model's are
scratch's), trains, grows again and trains the final depth for the rest.
Every arm keeps its best validation checkpoint; the harness tests the
arms once, after training. The paper's TS claim is a speed-up at equal
accuracy, so each grown arm also reports, per seed, the training time (its
own clock: every stage and growth) at which its validation first reaches
scratch's best, against scratch's own time to it.

Writes OUT/MODEL/results.json (the harness's, plus `time_to_scratch_best`
per arm), table.md and results.png, and OUT/summary.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np
from absl import logging as absl_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=wrong-import-position
from jaxrec import config as config_lib  # pylint: disable=wrong-import-position
from jaxrec.data import pipeline  # pylint: disable=wrong-import-position
from jaxrec.methods.stackrec import growth  # pylint: disable=wrong-import-position

absl_logging.set_verbosity(absl_logging.ERROR)
# The backbones whose blocks form a stack StackRec can grow (GRU4Rec and
# BERT4Rec grow too, but the paper's TS claim is about these four + HSTU).
MODELS = ("nextitnet", "sasrec", "ssept", "grec", "hstu")
# StackRec's TS headline (../shared/SEEDS.md): comparable accuracy with
# 40% less total training time on ML-20M (280 vs 490 min) and 35% less on
# Kuaibao, NextItNet 8 -> 16 -> 32 blocks; the paper says stacking also
# applies to GRec, SASRec and SSE-PT.
PAPER_CLAIM = ("TS: comparable accuracy, total training time 0.60x (ML-20M) "
               "and 0.65x (Kuaibao) of scratch")


def stage_config(base: config_lib.Config, depth: int, steps: int,
                 eval_every: int, seed: int) -> config_lib.Config:
  """One stage: depth and a fixed step budget (no early stopping)."""
  return base.replace(
      model=dataclasses.replace(base.model, num_blocks=depth),
      train=dataclasses.replace(base.train, steps=steps, seed=seed,
                                eval_every=eval_every, patience=0))


def stage_steps(total: int, shares: tuple[float, ...]) -> list[int]:
  """Steps per stage: the shares of `total`, the last stage the rest."""
  steps = [int(round(total * s)) for s in shares[:-1]]
  return steps + [total - sum(steps)]


def scratch_arm(base, data, depth: int, steps: int, every: int):
  def train(seed: int, work: str) -> harness.Trial:
    return harness.train_run(stage_config(base, depth, steps, every, seed),
                             os.path.join(work, "run"), data)
  return harness.Arm("scratch", train)


def grown_arm(base, data, depths: tuple[int, ...], steps: list[int],
              every: int, method: str, preset: str):
  """Trains depths[0], grows 2x by `method`/`preset`, ..., to depths[-1]."""

  def train(seed: int, work: str) -> harness.Trial:
    clock, done, prev, curve = 0.0, 0, None, []
    for i, (depth, n) in enumerate(zip(depths, steps)):
      init = None
      if prev is not None:
        init = os.path.join(work, f"grown{depth}")
        clock += grown_once(prev, init, method, preset, seed * 100 + i)
      trial = harness.train_run(
          stage_config(base, depth, n, every, seed),
          os.path.join(work, f"stage{depth}"), data, steps_before=done,
          init_from=init)
      curve += [(clock + t, v) for t, v in trial.curve]
      clock, done, prev = clock + trial.train_time_s, trial.steps, trial.run_dir
    return dataclasses.replace(trial, train_time_s=clock, curve=tuple(curve))

  return harness.Arm(f"{method}/{preset}", train)


def grown_once(src: str, dst: str, method: str, preset: str,
               seed: int) -> float:
  """Grows src's latest checkpoint into dst once (a rerun reads the time
  it took); returns the seconds growth took."""
  record = os.path.join(dst, "growth_s.json")
  if os.path.exists(record):
    with open(record, encoding="utf-8") as f:
      return json.load(f)["seconds"]
  shutil.rmtree(dst, ignore_errors=True)  # A growth killed half-way.
  start = time.perf_counter()
  growth.grow_checkpoint(src, dst, method, preset, seed=seed,
                         dilations="position", kind="latest")
  seconds = time.perf_counter() - start
  with open(record, "w", encoding="utf-8") as f:
    json.dump({"seconds": seconds}, f)
  return seconds


def time_to_reach(curve: list[list[float]], goal: float) -> float | None:
  return next((t for t, v in curve if v >= goal), None)


def add_time_to_scratch_best(results: dict[str, Any]) -> None:
  """Per grown arm and seed: its seconds to scratch's best validation,
  and scratch's own seconds to it (validation curves only)."""
  scratch = results["arms"]["scratch"]["curves"]
  for name, arm in results["arms"].items():
    reach, own = [], []
    for grown_curve, base_curve in zip(arm["curves"], scratch):
      goal = max(v for _, v in base_curve)
      reach.append(time_to_reach(grown_curve, goal))
      own.append(time_to_reach(base_curve, goal))
    arm["time_to_scratch_best_s"] = {"values": reach, "scratch": own}


def base_config(model: str, args: argparse.Namespace) -> config_lib.Config:
  raw: dict[str, Any] = {"model": {"name": model}, "data": {
      "source": args.data}, "train": {"batch_size": args.batch_size,
                                      "select_metric": "ndcg@10"}}
  if args.min_count is not None:
    raw["data"].update(min_user_count=args.min_count,
                       min_item_count=args.min_count)
  if args.embed_dim:
    raw["model"]["embed_dim"] = args.embed_dim
  return config_lib.from_dict(raw).validate()


SUMMARY_HEAD = ["| backbone | arm | valid ndcg@10 | test ndcg@10 | train s | "
                "reached scratch's best | time to it vs scratch's |",
                "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]


def write_summary(out_dir: str, rows: list[str], paper: str) -> None:
  """Prints the summary rows under their head, with the paper's claim,
  and writes them to OUT_DIR/summary.md."""
  text = "\n".join(SUMMARY_HEAD + rows + ["", f"Paper: {paper}."])
  print(text, flush=True)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")


def summary_rows(model: str, results: dict[str, Any]) -> list[str]:
  rows = []
  for name, arm in results["arms"].items():
    reach = arm["time_to_scratch_best_s"]["values"]
    reached = [t for t in reach if t is not None]
    ratio = ([t / s for t, s in zip(reach, arm["time_to_scratch_best_s"]
                                    ["scratch"]) if t is not None and s]
             if name != "scratch" else [1.0])
    rows.append(
        f"| {model} | {name} | "
        f"{arm['valid']['ndcg@10']['mean']:.4f} +- "
        f"{arm['valid']['ndcg@10']['std']:.4f} | "
        f"{arm['test']['ndcg@10']['mean']:.4f} +- "
        f"{arm['test']['ndcg@10']['std']:.4f} | "
        f"{arm['train_time_s']['mean']:.0f} | "
        f"{len(reached)}/{len(reach)} | "
        + (f"{np.mean(ratio):.2f} ({min(ratio):.2f}-{max(ratio):.2f})"
           if ratio else "-") + " |")
  return rows


def add_run_flags(parser: argparse.ArgumentParser) -> None:
  """The data, seeds and training flags every StackRec script takes."""
  parser.add_argument("--data", default="synthetic:small")
  parser.add_argument("--min-count", type=int, default=None,
                      help="k-core counts for users and items")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--eval-every", type=int, default=100)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--embed-dim", type=int, default=0,
                      help="0: the backbone's default")


def add_growth_flags(parser: argparse.ArgumentParser, budget: str) -> None:
  """The depths a grown arm goes through, and how (TS, TF)."""
  parser.add_argument("--depths", default="2,4,8")
  parser.add_argument("--shares", default="0.25,0.25,0.5",
                      help=f"each depth's share of {budget}")
  parser.add_argument("--methods", default="adjacent,cross")
  parser.add_argument("--presets", default="paper")


def growth_schedule(parser: argparse.ArgumentParser, args: argparse.Namespace
                    ) -> tuple[tuple[int, ...], tuple[float, ...]]:
  """(depths, shares) from the growth flags, refused in one line when
  they do not pair up."""
  depths = tuple(int(x) for x in args.depths.split(","))
  shares = tuple(float(x) for x in args.shares.split(","))
  if len(shares) != len(depths):
    parser.error(f"--shares has {len(shares)} values for {len(depths)} "
                 "depths")
  return depths, shares


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_run_flags(parser)
  add_growth_flags(parser, "--steps")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--steps", type=int, default=1500,
                      help="optimiser steps per arm, every stage counted")
  parser.add_argument("--out", default="runs/stackrec_zoo")
  args = parser.parse_args()
  depths, shares = growth_schedule(parser, args)
  steps = stage_steps(args.steps, shares)
  seeds = tuple(int(x) for x in args.seeds.split(","))
  rows = []
  for model in args.models.split(","):
    base = base_config(model, args)
    data = pipeline.load_data(base.data)
    arms = [scratch_arm(base, data, depths[-1], args.steps, args.eval_every)]
    arms += [grown_arm(base, data, depths, steps, args.eval_every, m, p)
             for m in args.methods.split(",")
             for p in args.presets.split(",")]
    out = os.path.join(args.out, model)
    results = harness.run_experiment(f"stackrec_ts_{model}", arms, seeds,
                                     out, args.data)
    add_time_to_scratch_best(results)
    results["settings"] = {"depths": depths, "stage_steps": steps,
                           "eval_every": args.eval_every,
                           "batch_size": args.batch_size,
                           "paper_claim": PAPER_CLAIM}
    harness.write_json(os.path.join(out, "results.json"), results)
    rows += summary_rows(model, results)
  write_summary(args.out, rows, PAPER_CLAIM)


if __name__ == "__main__":
  main()
