"""The four methods on one lineage: train shallow, grow (StackRec),
compress (CpRec), skip (SkipRec), patch (PeterRec); each stage a run
directory whose checkpoint metadata names its parent.

  python experiments/lineage.py --out results/lineage              # CPU
  python experiments/lineage.py --out /tmp/l --world tiny --steps 20 --seeds 0

Data: a synthetic two-domain world (`jaxrec.data.transfer.synthetic_world`):
the source domain's sequences train every next-item stage; its users'
profile labels are the downstream task of the patched stage. Stages, per
seed (OUT/seed<S>/<stage>):

  shallow     NextItNet with `shallow_blocks` blocks, from scratch
  grown       StackRec's adjacent stacking of `shallow` (2x depth), trained
  compressed  CpRec on `grown`: cross-block sharing (P stored blocks, each
              the trained block at its first position), the full embedding
              cut into frequency bands and the flat softmax turned into the
              tree softmax by truncated SVD (`methods.cprec.factorise`),
              fine-tuned
  skipping    SkipRec's policy attached to `compressed` (`--init-from`),
              policy and backbone trained jointly
  patched     PeterRec on `compressed`: patches, norms and a new head
              trained for the profile task inside the frozen shared,
              banded network. Its parent is `compressed`, not `skipping`:
              a policy trained for next-item gates would have to be frozen
              or retrained for another task, and `jaxrec finetune` refuses
              a source that skips, in one line.

Every stage trains the same number of steps (`steps`) and keeps its best
validation checkpoint; test is read once per stage, at its end. Writes
OUT/results.json (per stage: parent, params, the seeds' valid/test metrics
as mean, std and values, served top-20 latency at batch 512, train time),
OUT/lineage.png and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from typing import Any

import jax
import matplotlib
import numpy as np
from absl import logging as absl_logging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

from jaxrec import config as config_lib  # noqa: E402
from jaxrec import models, serving  # noqa: E402
from jaxrec.data import pipeline, transfer  # noqa: E402
from jaxrec.methods.cprec import factorise  # noqa: E402
from jaxrec.methods.cprec.config import CpRecConfig  # noqa: E402
from jaxrec.methods.peterrec import finetune as peterrec  # noqa: E402
from jaxrec.methods.skiprec.config import SkipRecConfig  # noqa: E402
from jaxrec.methods.stackrec import growth  # noqa: E402
from jaxrec.nn import bands  # noqa: E402
from jaxrec import method_api  # noqa: E402
from jaxrec.surgery import checkpoint as surgery  # noqa: E402
from jaxrec.training import checkpoints, loop  # noqa: E402
from jaxrec.training import state as state_lib  # noqa: E402

absl_logging.set_verbosity(absl_logging.ERROR)

CPU = dict(world="small", embed_dim=32, shallow_blocks=2, max_len=30,
           steps=500, eval_every=100, batch_size=128, lr=3e-3,
           period=2, num_bands=3, band_shares=(0.6,), skip_lambda=0.5,
           timing_batches=3)
STAGES = ("shallow", "grown", "compressed", "skipping", "patched")
PARENT = {"shallow": None, "grown": "shallow", "compressed": "grown",
          "skipping": "compressed", "patched": "compressed"}
METRIC = "ndcg@10"
TIMING_PASSES = 5


def train_config(s: dict[str, Any], paths: dict[str, str], seed: int,
                 methods: tuple[Any, ...] = ()) -> config_lib.Config:
  model = config_lib.model_config_class("nextitnet")(
      embed_dim=s["embed_dim"], num_blocks=s["shallow_blocks"])
  return config_lib.Config(
      model=model, methods=methods,
      data=config_lib.DataConfig(source="csv:" + paths["source"],
                                 max_len=s["max_len"]),
      train=config_lib.TrainConfig(
          steps=s["steps"], eval_every=s["eval_every"],
          batch_size=s["batch_size"], learning_rate=s["lr"], seed=seed,
          select_metric=METRIC))


def fresh(path: str) -> str:
  if os.path.exists(path):
    shutil.rmtree(path)
  return path


def compress_fn(s: dict[str, Any], counts: np.ndarray, seed: int):
  """The CpRec surgery: tie blocks, then bands and the tree softmax."""
  def fn(params, cfg):
    shared = cfg.with_method(CpRecConfig(share="cross_block",
                                         period=s["period"]))
    shared = shared.validate()
    params = method_api.attach(params, shared, jax.random.key(seed),
                               {"cprec"})
    cutoffs = bands.cutoffs_from_counts(counts, s["num_bands"],
                                        s["band_shares"])
    dims = bands.band_dims(cfg.model.embed_dim, s["num_bands"])
    return factorise.compress(params, shared, cutoffs, dims)
  return fn


def served_ms(run_dir: str, inputs: np.ndarray, batches: int) -> float:
  """ms per batch of a top-20 as `jaxrec predict` computes it (the tree
  softmax's early exit where the head has one), fastest of 5 passes."""
  predictor = serving.Predictor(run_dir, "best")
  fn = predictor._fn(20, False)  # pylint: disable=protected-access
  size = min(512, len(inputs))
  chunks = [inputs[i * size:(i + 1) * size] for i in range(batches)
            if (i + 1) * size <= len(inputs)] or [inputs[:size]]
  jax.block_until_ready(fn(predictor.params, chunks[0]))  # Compile.
  best = float("inf")
  for _ in range(TIMING_PASSES):
    start = time.perf_counter()
    for chunk in chunks:
      jax.block_until_ready(fn(predictor.params, chunk))
    best = min(best, (time.perf_counter() - start) / len(chunks))
  return best * 1e3


def parent_of(run_dir: str) -> str | None:
  """The nearest run the checkpoint's lineage names (a surgery's start
  directory, `*_start`, leads back to the run it was made from)."""
  _, meta = checkpoints.read_meta(run_dir)
  for entry in reversed(meta.get("lineage") or []):
    name = os.path.basename(entry.get("dir", "").rstrip("/"))
    if name and not name.endswith("_start"):
      return name
  return None


def chain_of(run_dir: str) -> list[str]:
  """The checkpoint's lineage as `op:directory` (op only where none)."""
  _, meta = checkpoints.read_meta(run_dir)
  return [f"{e.get('op')}:{os.path.basename(e['dir'])}" if "dir" in e
          else str(e.get("op")) for e in meta.get("lineage") or []]


def run_seed(s: dict[str, Any], paths: dict[str, str], out: str,
             seed: int) -> dict[str, dict[str, Any]]:
  dirs = {stage: os.path.join(out, stage) for stage in STAGES}
  base = train_config(s, paths, seed)
  rows: dict[str, dict[str, Any]] = {}

  def record(stage, metrics):
    params, _, _ = state_lib.load_params(dirs[stage], "best")
    rows[stage] = {"valid": metrics["valid"], "test": metrics["test"],
                   "params": models.count_params(params),
                   "train_time_s": metrics["train_time_s"],
                   "steps": metrics["steps"],
                   "parent": parent_of(dirs[stage]),
                   "lineage": chain_of(dirs[stage])}
    for key in ("block_usage", "compression_ratio", "trainable_params"):
      if key in metrics:
        rows[stage][key] = metrics[key]

  record("shallow", loop.train(base, fresh(dirs["shallow"]),
                               progress_bar=False))
  start = fresh(dirs["grown"] + "_start")
  growth.grow_checkpoint(dirs["shallow"], start, "adjacent", "paper",
                         seed=seed, kind="best")
  record("grown", loop.train(base, fresh(dirs["grown"]), init_from=start,
                             progress_bar=False))
  data = pipeline.load_data(base.data)  # Cached by the first stage.
  start = fresh(dirs["compressed"] + "_start")
  surgery.apply_to_checkpoint(
      dirs["grown"], start, compress_fn(s, data.item_counts, seed),
      {"op": "compress", "share": "cross_block", "period": s["period"],
       "num_bands": s["num_bands"], "band_shares": list(s["band_shares"])},
      kind="best")
  record("compressed", loop.train(base, fresh(dirs["compressed"]),
                                  init_from=start, progress_bar=False))
  skip = base.replace(methods=(SkipRecConfig(lam=s["skip_lambda"]),))
  record("skipping", loop.train(skip, fresh(dirs["skipping"]),
                                init_from=dirs["compressed"],
                                progress_bar=False))
  tune = config_lib.TrainConfig(
      steps=s["steps"], eval_every=s["eval_every"],
      batch_size=s["batch_size"], learning_rate=s["lr"], seed=seed,
      select_metric="accuracy")
  record("patched", peterrec.finetune(
      dirs["compressed"], "profile", paths["profile"],
      fresh(dirs["patched"]), "peter", "serial", train=tune,
      progress_bar=False))
  for stage in STAGES[:-1]:
    rows[stage]["infer_ms"] = served_ms(dirs[stage], data.test_inputs,
                                        s["timing_batches"])
  return rows


def summary(values: list[float]) -> dict[str, Any]:
  return {"mean": float(np.mean(values)), "std": float(np.std(values)),
          "values": [float(v) for v in values]}


def aggregate(per_seed: dict[int, dict[str, dict[str, Any]]]
              ) -> dict[str, Any]:
  seeds = sorted(per_seed)
  out = {}
  for stage in STAGES:
    rows = [per_seed[s][stage] for s in seeds]
    metric = "accuracy" if stage == "patched" else METRIC
    entry = {"parent": PARENT[stage], "seeds": seeds,
             "steps": rows[0]["steps"], "params": rows[0]["params"],
             "metric": metric,
             "valid": {metric: summary([r["valid"][metric] for r in rows])},
             "test": {metric: summary([r["test"][metric] for r in rows])},
             "train_time_s": summary([r["train_time_s"] for r in rows]),
             "recorded_parents": sorted({str(r["parent"]) for r in rows}),
             "lineage": rows[0]["lineage"]}
    if "infer_ms" in rows[0]:
      entry["infer_ms"] = summary([r["infer_ms"] for r in rows])
    for key in ("block_usage", "compression_ratio", "trainable_params"):
      if key in rows[0]:
        value = rows[0][key]
        entry[key] = (summary([r[key]["test"] for r in rows])
                      if isinstance(value, dict) else value)
    out[stage] = entry
  return out


def cell(x: dict[str, Any], digits: int = 4) -> str:
  return f"{x['mean']:.{digits}f} +- {x['std']:.{digits}f}"


def table(stages: dict[str, Any]) -> str:
  lines = ["| stage | parent | params | valid | test | top-20 ms (batch "
           "512, served) | train s |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  for name, r in stages.items():
    metric = r["metric"]
    ms = cell(r["infer_ms"], 1) if "infer_ms" in r else "-"
    extra = ""
    if "block_usage" in r:
      extra = f" (blocks used {r['block_usage']['mean']:.2f})"
    lines.append(
        f"| {name}{extra} | {r['parent'] or '-'} | {r['params']:,} | "
        f"{metric} {cell(r['valid'][metric])} | "
        f"{metric} {cell(r['test'][metric])} | {ms} | "
        f"{r['train_time_s']['mean']:.0f} |")
  return "\n".join(lines)


def plot(stages: dict[str, Any], path: str) -> None:
  names = [n for n in STAGES if n != "patched"]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  panels = (("params", lambda r: (r["params"], 0.0), "parameters"),
            ("test", lambda r: (r["test"][METRIC]["mean"],
                                r["test"][METRIC]["std"]),
             f"test {METRIC} (mean, std over seeds)"),
            ("infer_ms", lambda r: (r["infer_ms"]["mean"],
                                    r["infer_ms"]["std"]),
             "served top-20 ms, batch 512"))
  for ax, (_, get, title) in zip(axes, panels):
    values = [get(stages[n]) for n in names]
    ax.bar(names, [v[0] for v in values], yerr=[v[1] for v in values],
           color="#4c72b0")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="x", rotation=30)
  fig.suptitle("One lineage: shallow -> grown -> compressed -> skipping "
               "(patched: profile accuracy in the table)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, help="steps per stage")
  parser.add_argument("--world", help="world size "
                      f"({', '.join(transfer.WORLD_SIZES)})")
  args = parser.parse_args()
  s = dict(CPU)
  if args.steps is not None:
    s["steps"] = args.steps
    s["eval_every"] = max(1, min(s["eval_every"], args.steps // 2))
  if args.world:
    s["world"] = args.world
  os.makedirs(args.out, exist_ok=True)
  paths = transfer.synthetic_world(os.path.join(args.out, "world"),
                                   transfer.WORLD_SIZES[s["world"]])
  seeds = [int(x) for x in args.seeds.split(",")]
  per_seed = {seed: run_seed(s, paths, os.path.join(args.out,
                                                    f"seed{seed}"), seed)
              for seed in seeds}
  stages = aggregate(per_seed)
  results = {"experiment": "lineage",
             "data": f"synthetic world {s['world']!r} "
                     "(jaxrec.data.transfer.synthetic_world)",
             "selection": "valid", "settings": s,
             "date": time.strftime("%Y-%m-%d"),
             "device": jax.devices()[0].device_kind, "jax": jax.__version__,
             "python": platform.python_version(), "stages": stages,
             "per_seed": {str(k): v for k, v in per_seed.items()}}
  with open(os.path.join(args.out, "results.json"), "w",
            encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  plot(stages, os.path.join(args.out, "lineage.png"))
  print(table(stages))


if __name__ == "__main__":
  main()
