"""Default vs tuned accuracy of each backbone on one data source.

  python experiments/accuracy.py --data synthetic --out runs/accuracy
  python experiments/accuracy.py --data movielens:ml-100k.zip \\
      --min-count 1 --out runs/acc_ml100k

For each `--models` backbone: a `jaxrec train` with every option at its
default (only --data, the model and the k-core counts given), then
`experiments/tune.py` (selection on validation only). Writes
OUT/results.json (per model: the default run's and the tuned best trial's
valid and test metrics, times and values) and prints a Markdown table for
RESULTS.md. Test metrics are reported, never used to choose.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from absl import logging as absl_logging

from jaxrec import config as config_lib
from jaxrec import models
from jaxrec.data import pipeline
from jaxrec.training import checkpoints, loop

absl_logging.set_verbosity(absl_logging.ERROR)
HERE = os.path.dirname(os.path.abspath(__file__))
SHOWN = ("ndcg@10", "hr@10", "mrr@5")


def default_run(source: str, model: str, min_count: int | None,
                out_dir: str) -> dict:
  raw = {"model": {"name": model}, "data": {"source": source}}
  if min_count is not None:
    raw["data"].update(min_user_count=min_count, min_item_count=min_count)
  cfg = config_lib.from_dict(raw).validate()
  result = loop.train(cfg, out_dir, pipeline.load_data(cfg.data),
                      progress_bar=False)
  return {"valid": result["valid"], "test": result["test"],
          "train_time_s": result["train_time_s"], "epochs": result["epochs"],
          "popularity": result["popularity"], "data": result["data"]}


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


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--data", default="synthetic")
  parser.add_argument("--out", required=True)
  parser.add_argument("--models", nargs="+", default=list(models.names()),
                      choices=models.names())
  parser.add_argument("--trials", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min-count", type=int, default=None,
                      help="k-core counts for users and items (default: "
                           "jaxrec's 5)")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  results = {"data": args.data, "min_count": args.min_count, "models": {}}
  for model in args.models:
    results["models"][model] = {
        "default": default_run(args.data, model, args.min_count,
                               os.path.join(args.out, f"default_{model}")),
        "tuned": tuned_run(args.data, model, args.min_count,
                           os.path.join(args.out, f"tune_{model}"),
                           args.trials, args.seed)}
    checkpoints.write_json(os.path.join(args.out, "results.json"), results)
  print(markdown(results))


def markdown(results: dict) -> str:
  rows = ["| model | run | " + " | ".join(f"test {m}" for m in SHOWN)
          + " | valid ndcg@10 | train s |",
          "| --- | --- |" + " ---: |" * (len(SHOWN) + 2)]
  for model, runs in results["models"].items():
    for name, run in (("default", runs["default"]),
                      (f"tuned (best of {runs['tuned']['trials']})",
                       runs["tuned"])):
      rows.append(f"| {model} | {name} | "
                  + " | ".join(f"{run['test'][m]:.4f}" for m in SHOWN)
                  + f" | {run['valid']['ndcg@10']:.4f} | "
                  f"{run['train_time_s']:.0f} |")
    pop = runs["default"]["popularity"]
    rows.append("| popularity | | "
                + " | ".join(f"{pop[m]:.4f}" for m in SHOWN) + " | | |")
  return "\n".join(rows)


if __name__ == "__main__":
  main()
