"""Random search over learning rate, dropout, width, depth and batch size,
selected on the validation split only.

  python experiments/tune.py --data synthetic --model nextitnet --out runs/tune
  python experiments/tune.py --data movielens:ml-100k.zip --model sasrec \\
      --out runs/tune_sasrec --trials 20
  jaxrec train --config runs/tune/best.yaml --out runs/best

Every trial is a full `jaxrec train` run (early stopping on validation, the
best validation checkpoint tested) in OUT/trials/NNN. OUT/trials.jsonl gets
one line per finished trial: the sampled values, the validation metrics of
its best checkpoint, its time and steps (and, for the record only, its test
metrics). The best trial by validation `--metric` is written as a config to
OUT/best.yaml; OUT/tune.png plots the validation metric of every trial and
the running best. Trial i's values are a pure function of (--seed, i), so a
killed search rerun with the same options skips the finished trials and goes
on. Nothing here reads the test split to choose anything: `select_best`
reads only `valid`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from typing import Any

import numpy as np
from absl import logging as absl_logging
from tqdm import tqdm

from jaxrec import config as config_lib
from jaxrec import models
from jaxrec.data import pipeline
from jaxrec.training import loop

absl_logging.set_verbosity(absl_logging.ERROR)

# name -> (section, field, sampler(rng, backbone) -> value)
SPACE = {
    "learning_rate": ("train", "learning_rate",
                      lambda r, _: float(math.exp(r.uniform(math.log(2e-4),
                                                            math.log(5e-3))))),
    "dropout": ("model", "dropout",
                lambda r, _: float(r.choice([0.0, 0.1, 0.2, 0.3, 0.5]))),
    "embed_dim": ("model", "embed_dim",
                  lambda r, _: int(r.choice([32, 64, 128]))),
    "num_blocks": ("model", "num_blocks",
                   lambda r, b: int(r.choice({"sasrec": [1, 2, 3]}.get(
                       b, [2, 4, 8])))),
    "batch_size": ("train", "batch_size",
                   lambda r, _: int(r.choice([64, 128, 256]))),
}


def sample(seed: int, trial: int, backbone: str) -> dict[str, Any]:
  """Trial `trial`'s values: a pure function of (seed, trial)."""
  rng = np.random.default_rng([seed, trial])
  return {name: draw(rng, backbone) for name, (_, _, draw) in SPACE.items()}


def trial_config(base: config_lib.Config,
                 values: dict[str, Any]) -> config_lib.Config:
  updates: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
  for name, value in values.items():
    section, field, _ = SPACE[name]
    updates[section][field] = value
  cfg = base.replace(
      model=dataclasses.replace(base.model, **updates["model"]),
      train=dataclasses.replace(base.train, **updates["train"]))
  if cfg.model.embed_dim % getattr(cfg.model, "num_heads", 1):
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, num_heads=1))
  return cfg.validate()


def select_best(trials: list[dict[str, Any]],
                metric: str) -> dict[str, Any]:
  """The trial with the best validation `metric`. Reads `valid` only."""
  return max(trials, key=lambda t: t["valid"][metric])


def read_trials(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def data_free(cfg: config_lib.Config) -> dict[str, Any]:
  """A config dict for `jaxrec train --config`: sizes the data fixes reset."""
  out = cfg.to_dict()
  out["model"]["num_items"] = 0
  if "num_positions" in out["model"]:
    out["model"]["num_positions"] = 0
  return out


def plot(trials: list[dict[str, Any]], metric: str, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  values = [t["valid"][metric] for t in trials]
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(range(len(values)), values, "o", label="trial")
  ax.plot(range(len(values)), np.maximum.accumulate(values), "-",
          label="best so far")
  ax.set_xlabel("trial")
  ax.set_ylabel(f"validation {metric}")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--data", default="synthetic", help="data source")
  parser.add_argument("--model", default="nextitnet",
                      choices=models.names())
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--trials", type=int, default=12)
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the search (trial values)")
  parser.add_argument("--config", help="base config file (YAML or JSON)")
  parser.add_argument("--metric", default="ndcg@10",
                      choices=config_lib.METRIC_NAMES,
                      help="validation metric to select on")
  args = parser.parse_args()

  raw = config_lib.load_file(args.config) if args.config else {}
  raw = config_lib.upgrade(dict(raw), args.config or "config")
  raw["model"] = {**(raw.get("model") or {}), "name": args.model}
  raw["data"] = {**(raw.get("data") or {}), "source": args.data}
  base = config_lib.from_dict(raw, args.config or "config")
  base = base.replace(train=dataclasses.replace(
      base.train, select_metric=args.metric)).validate()
  data = pipeline.load_data(base.data)
  os.makedirs(args.out, exist_ok=True)
  log_path = os.path.join(args.out, "trials.jsonl")
  trials = read_trials(log_path)
  done = {t["trial"] for t in trials}
  bar = tqdm(range(args.trials), desc="tune", unit="trial",
             initial=len(done & set(range(args.trials))))
  for i in range(args.trials):
    if i in done:
      continue
    values = sample(args.seed, i, args.model)
    cfg = trial_config(base, values)
    run_dir = os.path.join(args.out, "trials", f"{i:03d}")
    if os.path.exists(run_dir):  # A trial killed midway starts again.
      import shutil  # pylint: disable=import-outside-toplevel
      shutil.rmtree(run_dir)
    result = loop.train(cfg, run_dir, data, progress_bar=False)
    record = {"trial": i, "values": values, "valid": result["valid"],
              "train_time_s": result["train_time_s"],
              "steps": result["steps"], "best_step": result["best_step"],
              "epochs": result["epochs"], "dir": run_dir,
              "test_for_the_record": result["test"]}
    with open(log_path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
    trials.append(record)
    bar.update(1)
    bar.set_postfix(best=f"{select_best(trials, args.metric)['valid'][args.metric]:.4f}")
  bar.close()
  trials = [t for t in trials if t["trial"] < args.trials]
  best = select_best(trials, args.metric)
  import yaml  # pylint: disable=import-outside-toplevel
  with open(os.path.join(args.out, "best.yaml"), "w", encoding="utf-8") as f:
    f.write(f"# experiments/tune.py: trial {best['trial']} of {len(trials)}, "
            f"best validation {args.metric} "
            f"{best['valid'][args.metric]:.4f}\n")
    yaml.safe_dump(data_free(trial_config(base, best["values"])), f,
                   sort_keys=False)
  plot(sorted(trials, key=lambda t: t["trial"]), args.metric,
       os.path.join(args.out, "tune.png"))
  print(f"\n{'trial':>5} {'valid ' + args.metric:>14} {'time s':>8}  values")
  for t in sorted(trials, key=lambda t: t["trial"]):
    mark = " *" if t is best else ""
    print(f"{t['trial']:>5} {t['valid'][args.metric]:>14.4f} "
          f"{t['train_time_s']:>8.0f}  {t['values']}{mark}")
  print(f"best: trial {best['trial']} -> {args.out}/best.yaml")


if __name__ == "__main__":
  main()
