"""PeterRec through the harness: patches in a frozen pretrained network
against the paper's baselines, on both downstream tasks, after causal and
masked pretraining, over seeds.

  python experiments/peterrec.py --out results/peterrec            # CPU
  python experiments/peterrec.py --out results/peterrec --pretrainings causal,masked,grec

A synthetic two-domain world (`jaxrec.data.transfer.synthetic_world`, one
world for every seed): users' topic tastes drive their source-domain
sequences (the pretraining data), their target-domain items (cold start)
and a profile label. Per seed, each pretraining (`--pretrainings`) trains
once (`harness.shared_stage`):

  causal   NextItNet, next-item prediction
  masked   NextItNet with centred convs, masked item prediction
  grec     a GRec trained by gap filling, its encoder taken out as the
           masked NextItNet it is (`jaxrec extract --part encoder`)

then, per task (cold start, ranked by NDCG@10; profile, by accuracy), nine
arms fine-tune it for the same steps (patience 0; each keeps its best
validation checkpoint):

  peter_serial, peter_serial_top, peter_parallel, peter_block_parallel
      PeterRec (patches + the last layer's norms + head) in each placement
  fine_all, fine_cls, fine_last1, fine_last2   the paper's baselines
  peter_zero    the serial-patched network from scratch, all trainable

Arms after the masked pretrainings are prefixed `masked_` and `grec_`.
Every pretrained arm's budget is the pretraining's steps plus the
fine-tuning's; `peter_zero` spends only the fine-tuning's and says so
(`budget="own"`: what pretraining buys is the thing it measures). The
harness tests each arm once, after training. `params` in its tables is
what an arm trains (the compared quantity here); the backbone's size is in
each arm's `backbone_params`.

Writes OUT/{cold_start,profile}/ (the harness's results.json, table.md,
results.png) and OUT/summary.md: the paper's claims beside ours, paired
by seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=wrong-import-position
from jaxrec import config as config_lib  # pylint: disable=wrong-import-position
from jaxrec.data import transfer  # pylint: disable=wrong-import-position
from jaxrec.methods.peterrec import finetune as peterrec  # pylint: disable=wrong-import-position
from jaxrec.surgery import parts  # pylint: disable=wrong-import-position

CPU = dict(world="small", embed_dim=32, num_blocks=4, max_len=30,
           pretrain_steps=1500, steps=400, eval_every=50, batch_size=128,
           lr=2e-3, pretrain_lr=3e-3)
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
PRETRAININGS = ("causal", "masked", "grec")
PREFIX = {"causal": "", "masked": "masked_", "grec": "grec_"}
TASKS = {"cold_start": "ndcg@10", "profile": "accuracy"}
PAPER_CLAIMS = {
    "peter_about_fine_all": "PeterRec about equal to FineAll",
    "peter_above_zero": "PeterRec far above PeterZero",
    "last2_last1_cls": "FineLast2 > FineLast1 > FineCLS",
}


def pretrained(s: dict[str, Any], paths: dict[str, str], kind: str,
               out: str, seed: int) -> harness.Trial:
  """The seed's `kind` pretraining (trained once, then read back); for
  `grec`, the run is GRec's encoder extracted from the trained GRec."""
  name = "grec" if kind == "grec" else "nextitnet"
  model = config_lib.model_config_class(name)(
      embed_dim=s["embed_dim"], num_blocks=s["num_blocks"],
      **({"causal": False} if kind == "masked" else {}))
  cfg = config_lib.Config(
      model=model,
      data=config_lib.DataConfig(source="csv:" + paths["source"],
                                 max_len=s["max_len"]),
      train=config_lib.TrainConfig(
          steps=s["pretrain_steps"], eval_every=s["eval_every"] * 4,
          batch_size=s["batch_size"], learning_rate=s["pretrain_lr"],
          seed=seed, patience=0))

  def train(work: str) -> harness.Trial:
    trial = harness.train_run(cfg, os.path.join(work, "run"))
    if kind != "grec":
      return trial
    encoder = os.path.join(work, "encoder")
    if not os.path.isdir(os.path.join(encoder, "checkpoints")):
      parts.extract_checkpoint(trial.run_dir, encoder, "encoder", seed=seed)
    return dataclasses.replace(trial, run_dir=encoder)

  return harness.shared_stage(out, f"pretrain_{kind}", seed, train)


def finetune_arm(s: dict[str, Any], paths: dict[str, str], kind: str,
                 arm: str, task: str, out: str) -> harness.Arm:
  preset, placement = ARMS[arm]
  own = not peterrec.PRESETS[preset].pretrained

  def train(seed: int, work: str) -> harness.Trial:
    pre = pretrained(s, paths, kind, out, seed)
    run_dir = os.path.join(work, "run")
    cfg = config_lib.TrainConfig(
        steps=s["steps"], eval_every=s["eval_every"], patience=0,
        batch_size=s["batch_size"], learning_rate=s["lr"], seed=seed,
        select_metric=TASKS[task], final_test=False)
    result = peterrec.finetune(
        pre.run_dir, task, paths[task], run_dir, preset, placement,
        train=cfg, progress_bar=False,
        resume=os.path.isdir(os.path.join(run_dir, "checkpoints")))
    harness.write_json(os.path.join(work, "sizes.json"), {
        k: result[k] for k in ("trainable_params", "backbone_params")})
    return harness.Trial(
        run_dir=run_dir, steps=result["steps"] + (0 if own else pre.steps),
        params=result["trainable_params"],
        valid={k: v for k, v in result["valid"].items() if k != "count"},
        train_time_s=result["train_time_s"],
        curve=tuple(harness.validation_curve(run_dir, TASKS[task])))

  return harness.Arm(PREFIX[kind] + arm, train,
                     budget="own" if own else "equal")


def with_sizes(results: dict[str, Any], out: str) -> None:
  """Each arm's backbone size, beside what it trains."""
  for name, arm in results["arms"].items():
    with open(os.path.join(harness.work_dir(out, name, results["seeds"][0]),
                           "sizes.json"), encoding="utf-8") as f:
      arm["backbone_params"] = json.load(f)["backbone_params"]


def claims(results: dict[str, dict[str, Any]], prefix: str
           ) -> list[dict[str, Any]]:
  """The paper's claims on one pretraining's arms, per task, paired by
  seed (a claim holds when it holds on every seed)."""
  out = []
  for task, metric in TASKS.items():
    arms = results[task]["arms"]
    if not all(prefix + a in arms for a in ARMS):
      continue

    def values(arm: str, arms=arms, metric=metric) -> np.ndarray:
      return np.array(arms[prefix + arm]["test"][metric]["values"])

    peter, fine, zero = (values(a) for a in ("peter_serial", "fine_all",
                                              "peter_zero"))
    ordered = ((values("fine_last2") > values("fine_last1"))
               & (values("fine_last1") > values("fine_cls")))
    out += [
        {"task": task, "claim": PAPER_CLAIMS["peter_about_fine_all"],
         "ours": f"{np.mean(peter / fine):.3f} of FineAll (min "
                 f"{np.min(peter / fine):.3f})",
         "met": bool(np.all(peter >= 0.95 * fine))},
        {"task": task, "claim": PAPER_CLAIMS["peter_above_zero"],
         "ours": f"{np.mean(peter / zero):.3f}x PeterZero",
         "met": bool(np.all(peter > 1.05 * zero))},
        {"task": task, "claim": PAPER_CLAIMS["last2_last1_cls"],
         "ours": f"holds on {int(ordered.sum())} of {len(ordered)} seeds",
         "met": bool(ordered.all())}]
  return out


def _cell(arm: dict[str, Any], metric: str) -> str:
  return (f"{arm['test'][metric]['mean']:.4f} +- "
          f"{arm['test'][metric]['std']:.4f}")


def summary(results: dict[str, dict[str, Any]], kinds: list[str]) -> str:
  rows = ["| arm | trains | % of backbone | cold start test NDCG@10 | "
          "profile test accuracy |", "| --- | ---: | ---: | ---: | ---: |"]
  cold, prof = results["cold_start"]["arms"], results["profile"]["arms"]
  for name, arm in cold.items():
    rows.append(f"| {name}{'*' if arm['budget'] == 'own' else ''} | "
                f"{arm['params']:,} | "
                f"{100 * arm['params'] / arm['backbone_params']:.1f}% | "
                f"{_cell(arm, 'ndcg@10')} | "
                f"{_cell(prof[name], 'accuracy') if name in prof else ''} |")
  rows += ["", "| pretraining | task | paper | ours | met |",
           "| --- | --- | --- | --- | --- |"]
  for kind in kinds:
    for c in claims(results, PREFIX[kind]):
      rows.append(f"| {kind} | {c['task']} | {c['claim']} | {c['ours']} | "
                  f"{'yes' if c['met'] else 'no'} |")
  return "\n".join(rows)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, help="fine-tuning steps")
  parser.add_argument("--pretrain-steps", type=int)
  parser.add_argument("--eval-every", type=int)
  parser.add_argument("--world", help="the world's size "
                      f"({', '.join(transfer.WORLD_SIZES)})")
  parser.add_argument("--embed-dim", type=int)
  parser.add_argument("--num-blocks", type=int)
  parser.add_argument("--batch-size", type=int)
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--pretrainings", default="causal,masked",
                      help=f"of {', '.join(PRETRAININGS)}")
  args = parser.parse_args()
  s = dict(CPU)
  for key in ("steps", "pretrain_steps", "eval_every", "world", "embed_dim",
              "num_blocks", "batch_size"):
    if getattr(args, key) is not None:
      s[key] = getattr(args, key)
  kinds = args.pretrainings.split(",")
  bad = sorted(set(kinds) - set(PRETRAININGS))
  if bad:
    parser.error(f"--pretrainings: {bad} not among {list(PRETRAININGS)}")
  arms = args.arms.split(",")
  bad = sorted(set(arms) - set(ARMS))
  if bad:
    parser.error(f"--arms: {bad} not among {list(ARMS)}")
  seeds = tuple(int(x) for x in args.seeds.split(","))
  paths = transfer.synthetic_world(os.path.join(args.out, "world"),
                                   transfer.WORLD_SIZES[s["world"]])
  results = {}
  for task, metric in TASKS.items():
    out = os.path.join(args.out, task)
    # Pretrainings live beside the tasks: both tasks read the same ones.
    experiment = [finetune_arm(s, paths, kind, arm, task, args.out)
                  for kind in kinds for arm in arms]
    results[task] = harness.run_experiment(
        f"peterrec_{task}", experiment, seeds, out,
        f"synthetic two-domain world ({s['world']})", select_metric=metric)
    with_sizes(results[task], out)
    results[task]["settings"] = {**s, "pretrainings": kinds,
                                 "params": "trainable"}
  for task in TASKS:  # The claims pair the tasks' arms, so after both.
    results[task]["claims"] = [c for kind in kinds
                               for c in claims(results, PREFIX[kind])
                               if c["task"] == task]
    harness.write_json(os.path.join(args.out, task, "results.json"),
                       results[task])
  text = summary(results, kinds)
  print(text, flush=True)
  with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
