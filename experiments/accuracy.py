"""Default vs tuned accuracy of each backbone on one data source, over
seeds, and the time each needs to reach its quality.

  python experiments/accuracy.py --data movielens-100k --min-count 1 \\
      --out results/accuracy_ml100k --trials 0
  python experiments/accuracy.py --data synthetic --out runs/accuracy

For each `--models` backbone and each `--seeds` seed: a `jaxrec train` with
every option at its default (only --data, the model, the seed and the
k-core counts given); then, with `--trials N` > 0, `experiments/tune.py`
(selection on validation only). Writes OUT/results.json:

  {"experiment": "accuracy", "data", "selection": "valid", "seeds",
   "models": {MODEL: {"default": {"valid"|"test": {METRIC: {"mean", "std",
   "values"}}, "train_time_s": {...}, "steps": [...], "time_to_95_s":
   {...}, "steps_to_95": {...}, "curves": [[[seconds, valid ndcg@10], ...]
   per seed], "popularity": {...}}, "tuned": {...}}}}

`time_to_95_s` is, per seed, the training time at the first validation
reaching 95% of that run's best validation NDCG@10; `steps_to_95` the
optimiser steps there, which do not depend on how busy the machine was.
A killed run, or one already finished in OUT, is resumed (a finished one
only tested again); rows OUT/results.json holds for other `--models`
under the same data, k-core counts and seeds are kept (read again at
each write, so two processes may fill one table), and a backbone can be
added without rerunning the others. OUT/time_to_quality.png
plots validation NDCG@10 against training time, one line per backbone and
seed. Prints a Markdown table for RESULTS.md / the README. Test metrics are
reported, never used to choose: a run's checkpoint is its best on
validation.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from absl import logging as absl_logging

from jaxrec import config as config_lib
from jaxrec import models
from jaxrec.data import pipeline
from jaxrec.training import checkpoints, loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=wrong-import-position

absl_logging.set_verbosity(absl_logging.ERROR)
HERE = os.path.dirname(os.path.abspath(__file__))
SHOWN = ("ndcg@10", "hr@10", "mrr@5")
CURVE_METRIC = "ndcg@10"
QUALITY_SHARE = 0.95


def default_config(source: str, model: str, min_count: int | None,
                   seed: int) -> config_lib.Config:
  raw: dict[str, Any] = {"model": {"name": model}, "data": {"source": source},
                         "train": {"seed": seed}}
  if min_count is not None:
    raw["data"].update(min_user_count=min_count, min_item_count=min_count)
  return config_lib.from_dict(raw).validate()


def curve(run_dir: str) -> list[tuple[float, float]]:
  """(training seconds, validation NDCG@10) at every validation."""
  return harness.validation_curve(run_dir, CURVE_METRIC)


def step_curve(run_dir: str) -> list[tuple[float, float]]:
  """(step, validation NDCG@10) at every validation."""
  return harness.validation_curve(run_dir, CURVE_METRIC, clock="step")


def time_to_quality(points: list[tuple[float, float]],
                    share: float = QUALITY_SHARE) -> float | None:
  """Seconds at the first validation reaching `share` of the best one."""
  if not points:
    return None
  goal = share * max(v for _, v in points)
  return next(t for t, v in points if v >= goal)


summary = harness.summary


def default_runs(source: str, model: str, min_count: int | None,
                 seeds: list[int], out_dir: str) -> dict[str, Any]:
  """One default run per seed, summarised across seeds."""
  runs = []
  for seed in seeds:
    cfg = default_config(source, model, min_count, seed)
    run_dir = os.path.join(out_dir, f"seed{seed}")
    # A killed experiment resumes each run where it stopped; a finished one
    # is only tested again (its best checkpoint, the same numbers).
    resume = os.path.isdir(os.path.join(run_dir, "checkpoints"))
    result = loop.train(cfg, run_dir, pipeline.load_data(cfg.data),
                        progress_bar=False, resume=resume)
    result["curve"] = curve(run_dir)
    result["step_curve"] = step_curve(run_dir)
    runs.append(result)
    print(f"[accuracy] {model} seed {seed}: test ndcg@10 "
          f"{result['test']['ndcg@10']:.4f} in {result['train_time_s']:.0f} s",
          flush=True)
  reach = [time_to_quality(r["curve"]) for r in runs]
  # Steps do not depend on how busy the machine was; seconds do.
  reach_steps = [time_to_quality(r["step_curve"]) for r in runs]
  return {
      "seeds": seeds,
      "valid": {m: summary([r["valid"][m] for r in runs])
                for m in runs[0]["valid"] if m != "count"},
      "test": {m: summary([r["test"][m] for r in runs])
               for m in runs[0]["test"] if m != "count"},
      "train_time_s": summary([r["train_time_s"] for r in runs]),
      "steps": [r["steps"] for r in runs],
      "time_to_95_s": summary([t for t in reach if t is not None]),
      "steps_to_95": summary([t for t in reach_steps if t is not None]),
      "curves": [r["curve"] for r in runs],
      "popularity": runs[0]["popularity"], "data": runs[0]["data"]}


def tuned_run(source: str, model: str, min_count: int | None, out_dir: str,
              trials: int, seed: int) -> dict:
  """Runs tune.py in its own process; returns the best trial's record."""
  argv = [sys.executable, os.path.join(HERE, "tune.py"), "--data", source,
          "--model", model, "--out", out_dir, "--trials", str(trials),
          "--seed", str(seed)]
  if min_count is not None:
    base = os.path.join(os.path.abspath(out_dir) + ".base.json")
    checkpoints.write_json(base, {"data": {"min_user_count": min_count,
                                           "min_item_count": min_count}})
    argv += ["--config", base]
  subprocess.run(argv, check=True)
  sys.path.insert(0, HERE)
  import tune  # pylint: disable=import-outside-toplevel
  trials_seen = tune.read_trials(os.path.join(out_dir, "trials.jsonl"))
  best = tune.select_best(trials_seen, "ndcg@10")
  return {"valid": best["valid"], "test": best["test_for_the_record"],
          "train_time_s": best["train_time_s"], "values": best["values"],
          "trial": best["trial"], "trials": len(trials_seen),
          "search_time_s": sum(t["train_time_s"] for t in trials_seen)}


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for k, (model, runs) in enumerate(results["models"].items()):
    color = f"C{k}"
    for j, points in enumerate(runs["default"]["curves"]):
      if points:
        t, v = zip(*points)
        ax.plot(t, v, color=color, alpha=0.8,
                label=model if j == 0 else None)
  ax.set_xlabel("training seconds")
  ax.set_ylabel(f"valid {CURVE_METRIC}")
  ax.set_title(f"{results['data']}: default runs, "
               f"{len(results['seeds'])} seeds each")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def earlier_rows(path: str, data: str, min_count: int | None,
                 seeds: list[int]) -> dict[str, Any]:
  """The models an earlier run wrote to `path` under the same protocol;
  none (said in one line) when it measured something else."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    old = json.load(f)
  if (old.get("data"), old.get("min_count"), old.get("seeds")) != (
      data, min_count, seeds):
    print(f"[accuracy] {path}: measured data={old.get('data')!r}, "
          f"min_count={old.get('min_count')}, seeds={old.get('seeds')}; "
          "its rows are replaced", flush=True)
    return {}
  return dict(old.get("models", {}))


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--data", default="synthetic")
  parser.add_argument("--out", required=True)
  parser.add_argument("--models", nargs="+", default=list(models.names()),
                      choices=models.names())
  parser.add_argument("--seeds", default="0,1,2",
                      help="comma-separated seeds of the default runs")
  parser.add_argument("--trials", type=int, default=10,
                      help="tune.py trials per model (0: no tuning)")
  parser.add_argument("--seed", type=int, default=0, help="tune.py's seed")
  parser.add_argument("--min-count", type=int, default=None,
                      help="k-core counts for users and items (default: "
                           "jaxrec's 5)")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "results.json")
  results = {"experiment": "accuracy", "data": args.data,
             "selection": "valid", "min_count": args.min_count,
             "seeds": seeds, "models": {}}
  own = {}
  for model in args.models:
    entry = {"default": default_runs(
        args.data, model, args.min_count, seeds,
        os.path.join(args.out, "runs", f"default_{model}"))}
    if args.trials > 0:
      entry["tuned"] = tuned_run(args.data, model, args.min_count,
                                 os.path.join(args.out, "runs",
                                              f"tune_{model}"),
                                 args.trials, args.seed)
    own[model] = entry
    # Read the file again at each write: a run of other --models beside
    # this one (a second process) wrote its rows meanwhile.
    results["models"] = {**earlier_rows(path, args.data, args.min_count,
                                        seeds), **own}
    checkpoints.write_json(path, results)
  plot(results, os.path.join(args.out, "time_to_quality.png"))
  print(markdown(results))


def _cell(stat: dict[str, Any] | float) -> str:
  if isinstance(stat, dict):
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"
  return f"{stat:.4f}"


def markdown(results: dict) -> str:
  """Default runs as mean ± std over seeds; a tuned run is one run."""
  rows = ["| model | run | " + " | ".join(f"test {m}" for m in SHOWN)
          + " | valid ndcg@10 | train s | s to 95% of best valid "
          "| steps to 95% |",
          "| --- | --- |" + " ---: |" * (len(SHOWN) + 4)]
  for model, runs in results["models"].items():
    d = runs["default"]
    rows.append(f"| {model} | default ({len(d['seeds'])} seeds) | "
                + " | ".join(_cell(d["test"][m]) for m in SHOWN)
                + f" | {_cell(d['valid']['ndcg@10'])} | "
                f"{d['train_time_s']['mean']:.0f} | "
                f"{d['time_to_95_s']['mean']:.0f} | "
                f"{d['steps_to_95']['mean']:.0f} |")
    if "tuned" in runs:
      t = runs["tuned"]
      rows.append(f"| {model} | tuned (best of {t['trials']}) | "
                  + " | ".join(_cell(t["test"][m]) for m in SHOWN)
                  + f" | {_cell(t['valid']['ndcg@10'])} | "
                  f"{t['train_time_s']:.0f} | | |")
  pop = next(iter(results["models"].values()))["default"]["popularity"]
  rows.append("| popularity | | " + " | ".join(f"{pop[m]:.4f}" for m in SHOWN)
              + " | | | | |")
  return "\n".join(rows)


if __name__ == "__main__":
  main()
