"""One harness for method experiments: arms x seeds under equal budgets,
every knob chosen on validation, test read once at the end.

An experiment script is a list of `Arm`s and one `run_experiment` call:

  arms = [Arm("scratch", train=lambda seed, d: train_run(cfg(seed, 8), d)),
          Arm("grown", train=grow_then_finetune),
          *[Arm(f"skip_l{x}", train=..., variant_of="skip",
                knobs={"lam": x}) for x in (0.5, 1, 2)]]
  run_experiment("skiprec", arms, seeds=(0, 1, 2), out_dir=OUT,
                 data="synthetic:small")

What it guarantees (tests/test_harness.py checks each):
- Phases in order: every (arm, seed) trains, then variants are chosen by
  their mean validation `select_metric` over seeds, and only then is any
  test metric computed, for the chosen arms only. Runs train with
  `train.final_test=false` (`train_run`), so no test number exists before
  that phase to be looked at.
- Equal budgets: compared arms must spend the same optimiser steps per
  seed (every stage counted); an arm whose budget is the thing compared
  says so (`budget="own"`) and the table marks it.
- Resumable: each finished (arm, seed) leaves `trial.json`; a killed
  experiment rerun with the same out_dir trains only what is missing.
- Timing, where asked (`Arm.infer`): rounds over the arms interleaved, so
  drift in the machine's speed falls on every arm alike.

Writes OUT/results.json:

  {"experiment", "data", "selection": "valid", "select_metric", "seeds",
   "date", "device", "jax", "arms": {ARM: {"seeds", "steps", "params",
   "budget", "valid": {METRIC: {"mean", "std", "values"}}, "test": {...},
   "train_time_s": {...}, "curves": [[[seconds, valid], ...] per seed],
   "selected": {KNOB: VALUE}, "variants": {VARIANT: valid summary},
   "infer_ms": {"median", "min", "values"}}}}

OUT/results.png (mean and spread per arm, valid and test) and
OUT/table.md (the RESULTS.md rows).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Callable, Sequence

import numpy as np

SHOWN = ("ndcg@10", "hr@10", "mrr@5")


class HarnessError(Exception):
  """An experiment that would compare unequal things, or is malformed."""


@dataclasses.dataclass(frozen=True)
class Trial:
  """What one arm leaves under one seed."""
  run_dir: str  # Its final run: its best validation checkpoint is tested.
  steps: int  # Optimiser steps over every stage (the budget).
  params: int
  valid: dict[str, float]  # The best validation record's metrics.
  train_time_s: float
  # (seconds, the run's train.select_metric) at every validation.
  curve: tuple[tuple[float, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm: `train(seed, work_dir) -> Trial`. Arms sharing `variant_of`
  are one arm's knob settings (`knobs`); validation picks one."""
  name: str
  train: Callable[[int, str], Trial]
  variant_of: str = ""
  knobs: dict[str, Any] = dataclasses.field(default_factory=dict)
  budget: str = "equal"  # "own": its steps are what is compared.
  infer: Callable[[str], Callable[[], Any]] | None = None  # run_dir -> fn.

  @property
  def reported_as(self) -> str:
    return self.variant_of or self.name


def summary(values: Sequence[float]) -> dict[str, Any]:
  return {"mean": float(np.mean(values)), "std": float(np.std(values)),
          "values": [float(v) for v in values]}


def train_run(cfg: Any, run_dir: str, data: Any = None,
              steps_before: int = 0, **train_kwargs: Any) -> Trial:
  """A `jaxrec` training run as a Trial, never tested (the harness tests
  later). `steps_before`: optimiser steps of earlier stages of this arm
  (a grown model's shallow stage), counted in its budget."""
  # pylint: disable=import-outside-toplevel
  from jaxrec import models
  from jaxrec.evaluation import load_params
  from jaxrec.training import loop
  cfg = cfg.replace(train=dataclasses.replace(cfg.train, final_test=False))
  # A killed trial left checkpoints: resume it exactly, as `--resume`.
  resume = os.path.isdir(os.path.join(run_dir, "checkpoints"))
  result = loop.train(cfg, run_dir, data, progress_bar=False, resume=resume,
                      **train_kwargs)
  params, _, _ = load_params(run_dir)
  metric = cfg.train.select_metric
  return Trial(run_dir=run_dir, steps=steps_before + result["steps"],
               params=models.count_params(params),
               valid={k: v for k, v in result["valid"].items()
                      if k != "count"},
               train_time_s=result["train_time_s"],
               curve=tuple(validation_curve(run_dir, metric)))


def validation_curve(run_dir: str, metric: str, clock: str = "train_time_s"
                     ) -> list[tuple[float, float]]:
  """(`clock`, validation `metric`) at every validation; `clock` is
  "train_time_s" (training seconds) or "step"."""
  points = []
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if "valid" in record and clock in record:
        points.append((record[clock], record["valid"][metric]))
  return points


def tested_metrics(trial: Trial) -> dict[str, float]:
  """Full-ranking test metrics of the trial's best validation checkpoint."""
  from jaxrec import evaluation  # pylint: disable=import-outside-toplevel
  out = evaluation.evaluate_checkpoint(trial.run_dir, split="test")["test"]
  return {k: v for k, v in out.items() if k != "count"}


def tested_on(data: Any) -> Callable[[Trial], dict[str, float]]:
  """A `test` for data built in memory (a world no data source names):
  full-ranking test metrics of the trial's best validation checkpoint on
  `data`'s test split."""
  def test(trial: Trial) -> dict[str, float]:
    # pylint: disable=import-outside-toplevel
    from jaxrec.training.loop import evaluate_params
    from jaxrec.training.mesh import Sharder, make_mesh
    from jaxrec.training.state import load_params
    sharder = Sharder(make_mesh())
    params, cfg, _ = load_params(trial.run_dir, sharding=sharder.replicated)
    out = evaluate_params(params, cfg, sharder, data.test_inputs,
                          data.test_targets, users=data.test_users)
    return {k: v for k, v in out.items() if k != "count"}
  return test


def run_experiment(name: str, arms: Sequence[Arm], seeds: Sequence[int],
                   out_dir: str, data: str, select_metric: str = "ndcg@10",
                   test: Callable[[Trial], dict[str, float]] = tested_metrics,
                   timing_rounds: int = 5) -> dict[str, Any]:
  """Trains every arm under every seed, chooses variants on validation,
  then tests the chosen arms; writes results.json, results.png and
  table.md under out_dir and returns the results."""
  chosen, variants, trials = train_and_choose(arms, seeds, out_dir,
                                              select_metric)
  # Validation is done with; from here on test may be read, once.
  reported = {}
  for group, arm in chosen.items():
    tested = [test(trials[arm.name, s]) for s in seeds]
    reported[group] = _arm_record(arm, seeds, trials, tested,
                                  variants.get(group))
  for group, timing in time_inference(chosen, seeds[0], trials,
                                      timing_rounds).items():
    reported[group]["infer_ms"] = timing
  results = {"experiment": name, "data": data, "selection": "valid",
             "select_metric": select_metric, "seeds": list(seeds),
             "date": time.strftime("%Y-%m-%d %H:%M"), **_platform(),
             "arms": reported}
  os.makedirs(out_dir, exist_ok=True)
  write_json(os.path.join(out_dir, "results.json"), results)
  with open(os.path.join(out_dir, "table.md"), "w", encoding="utf-8") as f:
    f.write(markdown_table(results) + "\n")
  plot(results, os.path.join(out_dir, "results.png"))
  return results


def train_and_choose(arms: Sequence[Arm], seeds: Sequence[int], out_dir: str,
                     select_metric: str = "ndcg@10"
                     ) -> tuple[dict[str, Arm], dict[str, dict],
                                dict[tuple[str, int], Trial]]:
  """Trains (or reads back) every arm under every seed and chooses each
  group's variant on validation; reads no test metric. An experiment whose
  later arms depend on a choice (CpRec: every arm at the width chosen for
  the uncompressed model) calls this first, then `run_experiment` with
  every arm: the trials made here are read back, not trained again."""
  check_arms(arms, seeds)
  trials = {(arm.name, seed): _trained(arm, seed, out_dir)
            for seed in seeds for arm in arms}  # Seed-major: drift is shared.
  check_budgets(arms, seeds, trials)
  chosen, variants = choose_on_validation(arms, seeds, trials, select_metric)
  return chosen, variants, trials


# An arm's name is a directory of its checkpoints: Orbax's tensorstore paths
# failed to open with brackets in them ("nextitnet[C=8]": metadata "does
# not exist" at restore), so names keep to these characters.
ARM_NAME = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")


def check_arms(arms: Sequence[Arm], seeds: Sequence[int]) -> None:
  names = [a.name for a in arms]
  bad = [n for n in names if not ARM_NAME.fullmatch(n)]
  if bad:
    raise HarnessError(f"arm names {bad}: use letters, digits and _ . - "
                       "(a / nests arms), since a name is a checkpoint "
                       "directory")
  if len(set(names)) != len(names):
    raise HarnessError(f"arm names repeat: {names}")
  plain = {a.name for a in arms if not a.variant_of}
  clash = plain & {a.variant_of for a in arms if a.variant_of}
  if clash:
    raise HarnessError(f"{sorted(clash)}: both an arm and a variant group")
  if len(seeds) < 1 or len(set(seeds)) != len(seeds):
    raise HarnessError(f"seeds {list(seeds)}: expected distinct seeds")


def check_budgets(arms: Sequence[Arm], seeds: Sequence[int],
                  trials: dict[tuple[str, int], Trial]) -> None:
  """Refuses to compare arms that trained for different step budgets."""
  for seed in seeds:
    steps = {a.name: trials[a.name, seed].steps for a in arms
             if a.budget == "equal"}
    if len(set(steps.values())) > 1:
      raise HarnessError(
          f"seed {seed}: unequal budgets {steps} (optimiser steps over every "
          "stage); give the arms equal steps, or mark an arm budget='own' "
          "when its budget is what is compared")


def choose_on_validation(arms: Sequence[Arm], seeds: Sequence[int],
                         trials: dict[tuple[str, int], Trial], metric: str
                         ) -> tuple[dict[str, Arm], dict[str, dict]]:
  """Per reported arm, the variant with the best mean validation `metric`
  over seeds (ties: the first listed); and every variant's summary."""
  chosen: dict[str, Arm] = {}
  variants: dict[str, dict[str, Any]] = {}
  for arm in arms:
    score = float(np.mean([trials[arm.name, s].valid[metric] for s in seeds]))
    group = arm.reported_as
    if arm.variant_of:
      variants.setdefault(group, {})[arm.name] = {
          "knobs": arm.knobs, metric: summary(
              [trials[arm.name, s].valid[metric] for s in seeds])}
    best = chosen.get(group)
    if best is None or score > float(np.mean(
        [trials[best.name, s].valid[metric] for s in seeds])):
      chosen[group] = arm
  return chosen, variants


def time_inference(chosen: dict[str, Arm], seed: int,
                   trials: dict[tuple[str, int], Trial],
                   rounds: int) -> dict[str, dict[str, Any]]:
  """Milliseconds per call of each timed arm's `infer` function (on its
  `seed` run), rounds interleaved over the arms, after one warm-up call."""
  fns = {group: arm.infer(trials[arm.name, seed].run_dir)
         for group, arm in chosen.items() if arm.infer is not None}
  for fn in fns.values():
    fn()  # Compile and warm caches outside the timed rounds.
  times: dict[str, list[float]] = {group: [] for group in fns}
  for _ in range(rounds):
    for group, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[group].append((time.perf_counter() - start) * 1e3)
  return {group: {"median": float(np.median(t)), "min": float(np.min(t)),
                  "values": t} for group, t in times.items()}


def markdown_table(results: dict[str, Any]) -> str:
  """RESULTS.md rows: mean +- std over seeds; `*` marks an arm whose budget
  is its own."""
  arms = results["arms"].values()
  shown = {split: [m for m in SHOWN if all(m in a[split] for a in arms)]
           for split in ("valid", "test")}
  head = (["arm", "params", "steps"]
          + [f"{split} {m}" for split in shown for m in shown[split]])
  rows = ["| " + " | ".join(head) + " |",
          "| --- | " + " | ".join(["---:"] * (len(head) - 1)) + " |"]
  for name, arm in results["arms"].items():
    label = name + (f" ({_knobs(arm['selected'])})" if arm["selected"]
                    else "") + ("*" if arm["budget"] == "own" else "")
    steps = arm["steps"]  # A list where seeds stopped early apart.
    cells = [label, f"{arm['params']:,}",
             " / ".join(f"{n:,}" for n in steps) if isinstance(steps, list)
             else f"{steps:,}"]
    for split, metrics in shown.items():
      cells += [f"{arm[split][m]['mean']:.4f} +- {arm[split][m]['std']:.4f}"
                for m in metrics]
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def plot(results: dict[str, Any], path: str,
         metric: str = "ndcg@10") -> None:
  """Mean and spread of `metric` per arm, validation and test."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = list(results["arms"])
  if not all(metric in results["arms"][n]["valid"] for n in names):
    return
  fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names)), 4))
  x = np.arange(len(names))
  for offset, split in ((-0.15, "valid"), (0.15, "test")):
    stats = [results["arms"][n][split][metric] for n in names]
    ax.errorbar(x + offset, [s["mean"] for s in stats],
                yerr=[s["std"] for s in stats], fmt="o", capsize=4,
                label=split)
  ax.set_xticks(x, names, rotation=20, ha="right")
  ax.set_ylabel(f"{metric} (mean +- std over {len(results['seeds'])} seeds)")
  ax.set_title(f"{results['experiment']} on {results['data']}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def work_dir(out_dir: str, arm_name: str, seed: int) -> str:
  """Where an arm's trial under `seed` works: an arm that builds on another
  arm's trained model (a static depth chosen by a policy's usage) reads
  that arm's run from here."""
  return os.path.join(out_dir, "runs", arm_name, f"seed{seed}")


def finished_trial(out_dir: str, arm_name: str, seed: int) -> Trial | None:
  """The arm's finished trial under `seed`, or None."""
  record = os.path.join(work_dir(out_dir, arm_name, seed), "trial.json")
  if not os.path.exists(record):
    return None
  with open(record, encoding="utf-8") as f:
    raw = json.load(f)
  raw["curve"] = tuple(tuple(p) for p in raw["curve"])
  return Trial(**raw)


def shared_stage(out_dir: str, name: str, seed: int,
                 train: Callable[[str], Trial]) -> Trial:
  """A stage several arms of a seed start from (SkipRec's base, StackRec
  CL's deployed shallow model): `train(work_dir)` runs once under
  `work_dir(out_dir, name, seed)`, later calls read its trial back."""
  done = finished_trial(out_dir, name, seed)
  if done is not None:
    return done
  work = work_dir(out_dir, name, seed)
  os.makedirs(work, exist_ok=True)
  trial = train(work)
  write_json(os.path.join(work, "trial.json"), dataclasses.asdict(trial))
  return trial


def _trained(arm: Arm, seed: int, out_dir: str) -> Trial:
  """The arm's trial under `seed`: read back if a finished one exists."""
  return shared_stage(out_dir, arm.name, seed,
                      lambda work: arm.train(seed, work))


def _arm_record(arm: Arm, seeds: Sequence[int],
                trials: dict[tuple[str, int], Trial],
                tested: list[dict[str, float]],
                variants: dict[str, Any] | None) -> dict[str, Any]:
  runs = [trials[arm.name, s] for s in seeds]
  steps = {r.steps for r in runs}
  return {
      "seeds": list(seeds),
      "steps": runs[0].steps if len(steps) == 1 else [r.steps for r in runs],
      "params": runs[0].params, "budget": arm.budget,
      "valid": {m: summary([r.valid[m] for r in runs]) for m in runs[0].valid},
      "test": {m: summary([t[m] for t in tested]) for m in tested[0]},
      "train_time_s": summary([r.train_time_s for r in runs]),
      "curves": [[list(p) for p in r.curve] for r in runs],
      "selected": dict(arm.knobs) if arm.variant_of else {},
      "variants": variants or {},
      "run_dirs": [r.run_dir for r in runs],
  }


def _knobs(knobs: dict[str, Any]) -> str:
  return ", ".join(f"{k}={v}" for k, v in knobs.items())


def _platform() -> dict[str, str]:
  import jax  # pylint: disable=import-outside-toplevel
  return {"device": jax.devices()[0].device_kind, "jax": jax.__version__}


def write_json(path: str, value: Any) -> None:
  """Atomically: a killed experiment leaves the old file or none."""
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)
