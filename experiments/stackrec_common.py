"""What the three StackRec scenario scripts share: stages, arms, clocks, plots.

An *arm* is a sequence of training stages, possibly joined by growth steps
(`jaxrec.methods.stackrec.growth.grow_checkpoint`); its clock is the sum of the stages'
training wall time (`train_time_s` of each run: compile, steps and
validations) and the growth time. Validation MRR@5 is recorded against that
clock, so the arms can be compared on one time axis.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from typing import Any

import numpy as np
from absl import logging as absl_logging

from jaxrec import config as config_lib
from jaxrec import models
from jaxrec.data import sequences
from jaxrec.methods.stackrec import growth
from jaxrec.surgery import heads as head_surgery
from jaxrec.training import checkpoints
from jaxrec.training import loop

# Orbax logs every read-only checkpoint open through absl.
absl_logging.set_verbosity(absl_logging.ERROR)

METRIC = "mrr@5"
GROWN_ARMS = tuple((m, p) for m in ("adjacent", "cross")
                   for p in ("paper", "preserve"))


@dataclasses.dataclass
class Arm:
  """One arm's record: its curve on its own clock and its best checkpoint."""
  name: str
  curve: list[tuple[float, float, int]] = dataclasses.field(
      default_factory=list)  # (seconds on the arm's clock, valid MRR@5, stage)
  stack_points: list[float] = dataclasses.field(default_factory=list)
  clock: float = 0.0
  best_valid: float = -1.0
  best_test: dict[str, float] | None = None
  best_stage: str = ""
  stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def add_run(self, run_dir: str, stage: str, record: bool = True) -> None:
    """Appends a finished run's validations, shifted by the arm's clock.

    With `record=False` the run only advances the clock (e.g. pretraining on
    a source domain whose metric is not the one compared).
    """
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
      result = json.load(f)
    index = len(self.stages)
    if record:
      for row in read_validations(run_dir):
        self.curve.append((self.clock + row["train_time_s"],
                           row["valid"][METRIC], index))
      if result["valid"][METRIC] > self.best_valid:
        self.best_valid = result["valid"][METRIC]
        self.best_test = result["test"]
        self.best_stage = stage
    self.stages.append({"stage": stage, "dir": run_dir,
                        "train_time_s": result["train_time_s"],
                        "steps": result["steps"],
                        "best_valid_mrr@5": result["valid"][METRIC],
                        "counted": record})
    self.clock += result["train_time_s"]

  def add_growth(self, seconds: float) -> None:
    self.clock += seconds
    self.stack_points.append(self.clock)


def read_validations(run_dir: str) -> list[dict[str, Any]]:
  rows = []
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "valid" in row:
        rows.append(row)
  return rows


def fresh_dir(path: str) -> str:
  """Experiments rerun from scratch: an old run directory is removed."""
  if os.path.exists(path):
    shutil.rmtree(path)
  return path


def scenario_parser(doc: str, default_out: str) -> argparse.ArgumentParser:
  """The options every scenario script takes."""
  parser = argparse.ArgumentParser(
      description=doc.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
  parser.add_argument("--out", default=default_out, help="output directory")
  parser.add_argument("--scale", action="store_true",
                      help="GPU settings on ML-20M-sized synthetic data")
  parser.add_argument("--data", help="data source (default: synthetic)")
  parser.add_argument("--model", help="backbone (default: the settings', "
                      "nextitnet); settings it lacks are left out, and said")
  parser.add_argument("--seed", type=int, default=0,
                      help="train seed of every arm (init, batch order)")
  parser.add_argument("--progress", action="store_true",
                      help="show each run's progress bar")
  return parser


def base_config(settings: dict[str, Any], args: argparse.Namespace
                ) -> config_lib.Config:
  """The scenario's shared config from its SMALL or SCALE settings."""
  data = dict(settings["data"])
  if args.data:
    data["source"] = args.data
  model = dict(settings["model"])
  name = model.pop("name", "nextitnet")
  backbone = models.get(getattr(args, "model", None) or name)
  fields = {f.name for f in dataclasses.fields(backbone.config)}
  left_out = sorted(set(model) - fields)
  if left_out:  # e.g. NextItNet's dilations, or `dropout` for GRU4Rec.
    print(f"[{backbone.name}] settings it has no field for, left out: "
          f"{', '.join(left_out)}", flush=True)
  model = {k: v for k, v in model.items() if k in fields}
  return config_lib.Config(
      model=backbone.config(**model),
      data=config_lib.DataConfig(**data),
      # The best checkpoint by the metric the scenarios compare (the loop's
      # default is NDCG@10 since 2026-12-07; their records used MRR@5).
      train=config_lib.TrainConfig(**settings["train"], seed=args.seed,
                                   select_metric=METRIC))


def run_stage(cfg: config_lib.Config, out_dir: str,
              data: sequences.SequenceData, init_from: str | None = None,
              quiet: bool = True) -> str:
  loop.train(cfg, fresh_dir(out_dir), data, init_from=init_from,
             progress_bar=not quiet)
  return out_dir


def grow(src_dir: str, out_dir: str, method: str, preset: str,
         seed: int = 0) -> float:
  """Grows a run's latest checkpoint 2x; returns the wall seconds it took.

  The latest, not the best: a stage stops by budget, and early in training
  the best validation can be a much earlier, less trained model.
  """
  start = time.perf_counter()
  growth.grow_checkpoint(src_dir, fresh_dir(out_dir), method, preset,
                         seed=seed, kind="latest")
  return time.perf_counter() - start


def with_stage(cfg: config_lib.Config, blocks: int, steps: int,
               eval_every: int, patience: int = 0) -> config_lib.Config:
  """A stage's config: depth, step budget, and early stopping (0: none)."""
  return cfg.replace(
      model=dataclasses.replace(cfg.model, num_blocks=blocks),
      train=dataclasses.replace(cfg.train, steps=steps,
                                eval_every=eval_every, patience=patience))


def subset_train(data: sequences.SequenceData, fraction: float,
                 seed: int = 0) -> sequences.SequenceData:
  """The first `fraction` of a fixed seeded order of the training rows.

  Nested: the rows of a smaller fraction are a prefix of a larger one's.
  Valid and test stay whole, so every stage is scored on the same users.
  """
  order = np.random.default_rng(seed).permutation(data.train.shape[0])
  kept = np.sort(order[:max(1, int(fraction * len(order)))])
  rows = data.train[kept]
  counts = np.bincount(rows[rows != 0].ravel(), minlength=data.num_items)
  users = None if data.train_users is None else data.train_users[kept]
  return dataclasses.replace(
      data, train=rows, train_users=users,
      item_counts=counts.astype(np.int64),
      fingerprint=f"{data.fingerprint}-train{fraction:.2f}",
      meta={**data.meta, "train_fraction": fraction,
            "num_train_rows": int(rows.shape[0])})


def reset_output_layer(src_dir: str, out_dir: str, seed: int = 0) -> float:
  """A run's params with a freshly initialised output head, saved as step 0
  of `out_dir` (transfer to a target domain); returns seconds taken."""
  start = time.perf_counter()
  head_surgery.new_head_checkpoint(src_dir, fresh_dir(out_dir), seed)
  return time.perf_counter() - start


def time_to_reach(arm: Arm, target: float) -> float | None:
  for seconds, value, _ in arm.curve:
    if value >= target:
      return seconds
  return None


def summarize(arms: list[Arm], scratch: Arm, scenario: str,
              settings: dict[str, Any]) -> dict[str, Any]:
  """results.json: per arm best valid MRR@5, test at best, clocks."""
  # The scratch arm's own time to its best: the time after that only
  # confirms convergence, and every arm spends such a tail.
  scratch_time = time_to_reach(scratch, scratch.best_valid)
  out = {"scenario": scenario, "metric": f"valid {METRIC}",
         "settings": settings, "scratch_time_to_best_s": scratch_time,
         "arms": {}}
  for arm in arms:
    reach = time_to_reach(arm, scratch.best_valid)
    out["arms"][arm.name] = {
        "best_valid_mrr@5": arm.best_valid,
        "test": arm.best_test,
        "best_stage": arm.best_stage,
        "wall_s": arm.clock,
        "time_to_scratch_best_s": reach,
        "time_ratio_vs_scratch": (None if reach is None
                                  else reach / scratch_time),
        "stack_points_s": arm.stack_points,
        "stages": arm.stages,
        "curve": [list(p) for p in arm.curve],
    }
  return out


def plot(arms: list[Arm], path: str, title: str) -> None:
  """Validation MRR@5 against each arm's wall clock; stacking points marked."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for arm in arms:
    xs = [p[0] for p in arm.curve]
    ys = [p[1] for p in arm.curve]
    style = "k--" if arm.name == "scratch" else "-"
    line, = ax.plot(xs, ys, style, marker=".", label=arm.name)
    for x in arm.stack_points:
      ax.axvline(x, color=line.get_color(), alpha=0.3, linestyle=":")
  ax.set_xlabel("wall-clock seconds (arm's own clock)")
  ax.set_ylabel(f"validation {METRIC}")
  ax.set_title(title)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def print_table(results: dict[str, Any]) -> None:
  print(f"\n{results['scenario']}: {results['metric']}, clocks in seconds")
  print(f"{'arm':<22}{'best valid':>11}{'test mrr@5':>11}{'test ndcg@10':>13}"
        f"{'wall s':>9}{'to scratch best':>17}")
  for name, arm in results["arms"].items():
    reach = arm["time_to_scratch_best_s"]
    reach = "never" if reach is None else (
        f"{reach:.0f} ({arm['time_ratio_vs_scratch']:.0%})")
    test = arm["test"] or {}
    print(f"{name:<22}{arm['best_valid_mrr@5']:>11.4f}"
          f"{test.get('mrr@5', float('nan')):>11.4f}"
          f"{test.get('ndcg@10', float('nan')):>13.4f}"
          f"{arm['wall_s']:>9.0f}{reach:>17}")


def write_results(out_dir: str, arms: list[Arm], scratch: Arm, scenario: str,
                  settings: dict[str, Any], title: str) -> dict[str, Any]:
  results = summarize(arms, scratch, scenario, settings)
  checkpoints.write_json(os.path.join(out_dir, "results.json"), results)
  plot(arms, os.path.join(out_dir, "valid_mrr5.png"), title)
  print_table(results)
  return results
