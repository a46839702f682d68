"""PeterRec: patches in a frozen pretrained NextItNet against the paper's
baselines, on both downstream tasks, after causal and masked pretraining.

  python experiments/peterrec.py --out runs/peterrec            # CPU, minutes
  python experiments/peterrec.py --out runs/peterrec --scale    # GPU

A synthetic two-domain world (`jaxrec.data.transfer.synthetic_world`):
users' topic tastes drive their source-domain sequences (the pretraining
data), their target-domain items (cold start) and a profile label. Two
pretrainings (causal next-item; masked, bidirectional), then per
pretraining nine arms, each fine-tuned on cold start and on profiles:

  peter_serial, peter_serial_top, peter_parallel, peter_block_parallel
      PeterRec (patches + LayerNorms + head) in each placement
  fine_all, fine_cls, fine_last1, fine_last2   the paper's baselines
  peter_zero    the serial-patched network from scratch, all trainable

Keys of masked-pretraining arms are prefixed `masked_`. Writes
OUT/results.json (arms: trainable_params, backbone_params, cold_start
{valid, test} full-ranking metrics, profile {accuracy}, train_time_s),
OUT/peterrec.png, and prints a Markdown table with the paper's claims and
the issue's targets.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from typing import Any

import jax
from absl import logging as absl_logging

from jaxrec import config as config_lib
from jaxrec.data import transfer
from jaxrec.training import loop
from jaxrec.methods.peterrec import finetune as peterrec

absl_logging.set_verbosity(absl_logging.ERROR)

CPU = dict(world="small", embed_dim=32, num_blocks=4, max_len=30,
           pretrain_steps=1500, steps=400, eval_every=50, batch_size=128,
           lr=2e-3, pretrain_lr=3e-3, patience=4)
SCALE = dict(world="large", embed_dim=128, num_blocks=16, max_len=50,
             pretrain_steps=20000, steps=4000, eval_every=500,
             batch_size=256, lr=1e-3, pretrain_lr=1e-3, patience=4)
ARMS = {  # arm -> (preset, placement)
    "peter_serial": ("peter", "serial"),
    "peter_serial_top": ("peter", "serial_top"),
    "peter_parallel": ("peter", "parallel"),
    "peter_block_parallel": ("peter", "block_parallel"),
    "fine_all": ("fine_all", "serial"),
    "fine_cls": ("fine_cls", "serial"),
    "fine_last1": ("fine_last1", "serial"),
    "fine_last2": ("fine_last2", "serial"),
    "peter_zero": ("peter_zero", "serial"),
}
PAPER_CLAIMS = [
    "a patch (of a block) has under a tenth of the network's parameters",
    "PeterRec about equal to FineAll, far above PeterZero",
    "FineLast2 > FineLast1 > FineCLS",
    "the fully parallel (block_parallel) placement is poor",
]


def pretrain(s: dict[str, Any], paths: dict[str, str], out: str,
             causal: bool, seed: int) -> dict[str, Any]:
  model = config_lib.model_config_class("nextitnet")(
      embed_dim=s["embed_dim"], num_blocks=s["num_blocks"], causal=causal)
  cfg = config_lib.Config(
      model=model,
      data=config_lib.DataConfig(source="csv:" + paths["source"],
                                 max_len=s["max_len"]),
      train=config_lib.TrainConfig(
          steps=s["pretrain_steps"], eval_every=s["eval_every"] * 4,
          batch_size=s["batch_size"], learning_rate=s["pretrain_lr"],
          seed=seed))
  return loop.train(cfg, out, progress_bar=False)


def finetune_arm(s: dict[str, Any], pre: str, paths: dict[str, str],
                 out: str, preset: str, placement: str,
                 seed: int) -> dict[str, Any]:
  train = config_lib.TrainConfig(
      steps=s["steps"], eval_every=s["eval_every"], patience=s["patience"],
      batch_size=s["batch_size"], learning_rate=s["lr"], seed=seed,
      select_metric="ndcg@10")
  row: dict[str, Any] = {}
  t0 = time.time()
  cold = peterrec.finetune(pre, "cold_start", paths["cold_start"],
                           os.path.join(out, "cold_start"), preset,
                           placement, train=train, progress_bar=False)
  prof = peterrec.finetune(
      pre, "profile", paths["profile"], os.path.join(out, "profile"),
      preset, placement, progress_bar=False,
      train=dataclasses.replace(train, select_metric="accuracy"))
  row["trainable_params"] = cold["trainable_params"]
  row["backbone_params"] = cold["backbone_params"]
  row["cold_start"] = {"valid": cold["valid"], "test": cold["test"],
                       "popularity_test": cold["popularity"]}
  row["profile"] = {"accuracy": prof["test"]["accuracy"],
                    "valid_accuracy": prof["valid"]["accuracy"],
                    "majority_accuracy": prof["popularity"]["accuracy"],
                    "trainable_params": prof["trainable_params"]}
  row["train_time_s"] = cold["train_time_s"] + prof["train_time_s"]
  row["wall_s"] = time.time() - t0
  return row


def targets(arms: dict[str, Any], prefix: str = "") -> dict[str, bool]:
  """The issue's targets on one pretraining's arms."""
  peter, fine, zero = (arms[prefix + k] for k in
                       ("peter_serial", "fine_all", "peter_zero"))
  ndcg = lambda a: a["cold_start"]["test"]["ndcg@10"]  # pylint: disable=unnecessary-lambda-assignment
  acc = lambda a: a["profile"]["accuracy"]  # pylint: disable=unnecessary-lambda-assignment
  return {
      "cold_start_ndcg10_within_95pct_of_fine_all":
          ndcg(peter) >= 0.95 * ndcg(fine),
      "profile_accuracy_within_95pct_of_fine_all":
          acc(peter) >= 0.95 * acc(fine),
      "trainable_at_most_10pct_of_backbone":
          peter["trainable_params"] <= 0.10 * peter["backbone_params"],
      "clearly_above_peter_zero":
          ndcg(peter) > 1.05 * ndcg(zero) and acc(peter) > acc(zero),
  }


def table(results: dict[str, Any]) -> str:
  rows = ["| arm | trainable | % of backbone | cold start test NDCG@10 "
          "| HR@10 | profile accuracy | train s |",
          "|---|---:|---:|---:|---:|---:|---:|"]
  for key, a in results["arms"].items():
    t = a["cold_start"]["test"]
    rows.append(
        f"| {key} | {a['trainable_params']:,} | "
        f"{100 * a['trainable_params'] / a['backbone_params']:.1f}% | "
        f"{t['ndcg@10']:.4f} | {t['hr@10']:.4f} | "
        f"{a['profile']['accuracy']:.4f} | {a['train_time_s']:.0f} |")
  any_arm = next(iter(results["arms"].values()))
  rows.append(f"| popularity / majority | | | "
              f"{any_arm['cold_start']['popularity_test']['ndcg@10']:.4f} | "
              f"{any_arm['cold_start']['popularity_test']['hr@10']:.4f} | "
              f"{any_arm['profile']['majority_accuracy']:.4f} | |")
  return "\n".join(rows)


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for ax, (title, value) in zip(axes, (
      ("cold start: test NDCG@10",
       lambda a: a["cold_start"]["test"]["ndcg@10"]),
      ("profile: test accuracy", lambda a: a["profile"]["accuracy"]))):
    for offset, prefix, label in ((-0.2, "", "causal pretraining"),
                                  (0.2, "masked_", "masked pretraining")):
      keys = [k for k in ARMS if prefix + k in results["arms"]]
      ax.bar([i + offset for i in range(len(keys))],
             [value(results["arms"][prefix + k]) for k in keys], width=0.4,
             label=label)
    ax.set_xticks(range(len(ARMS)), list(ARMS), rotation=45, ha="right")
    ax.set_title(title)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--scale", action="store_true",
                      help="GPU sizes (a larger world and model)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, help="override fine-tuning steps")
  parser.add_argument("--pretrain-steps", type=int)
  parser.add_argument("--world", help="override the world size "
                      f"({', '.join(transfer.WORLD_SIZES)})")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--pretrainings", default="causal,masked")
  args = parser.parse_args()
  s = dict(SCALE if args.scale else CPU)
  for key in ("steps", "pretrain_steps", "world"):
    if getattr(args, key) is not None:
      s[key] = getattr(args, key)
  os.makedirs(args.out, exist_ok=True)
  paths = transfer.synthetic_world(os.path.join(args.out, "world"),
                                   transfer.WORLD_SIZES[s["world"]])
  results: dict[str, Any] = {
      "settings": s, "seed": args.seed, "date": time.strftime("%Y-%m-%d"),
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "python": platform.python_version(), "pretraining": {}, "arms": {}}
  for kind in args.pretrainings.split(","):
    prefix = "" if kind == "causal" else "masked_"
    pre = os.path.join(args.out, f"pretrain_{kind}")
    if not os.path.exists(os.path.join(pre, "metrics.json")):
      r = pretrain(s, paths, pre, kind == "causal", args.seed)
    else:
      with open(os.path.join(pre, "metrics.json"), encoding="utf-8") as f:
        r = json.load(f)
    results["pretraining"][kind] = {"test": r["test"],
                                    "train_time_s": r["train_time_s"]}
    print(f"pretraining {kind}: test ndcg@10 {r['test']['ndcg@10']:.4f}",
          flush=True)
    for arm in args.arms.split(","):
      preset, placement = ARMS[arm]
      row = finetune_arm(s, pre, paths, os.path.join(args.out, prefix + arm),
                         preset, placement, args.seed)
      results["arms"][prefix + arm] = row
      print(f"{prefix + arm}: cold ndcg@10 "
            f"{row['cold_start']['test']['ndcg@10']:.4f}, profile acc "
            f"{row['profile']['accuracy']:.4f}, trainable "
            f"{row['trainable_params']:,}", flush=True)
  for kind in results["pretraining"]:
    prefix = "" if kind == "causal" else "masked_"
    if all(prefix + k in results["arms"]
           for k in ("peter_serial", "fine_all", "peter_zero")):
      results.setdefault("targets", {})[kind] = targets(results["arms"],
                                                        prefix)
  with open(os.path.join(args.out, "results.json"), "w",
            encoding="utf-8") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(args.out, "peterrec.png"))
  print("\npaper's claims: " + "; ".join(PAPER_CLAIMS))
  print(json.dumps(results.get("targets", {}), indent=1))
  print(table(results))


if __name__ == "__main__":
  main()
