"""StackRec TF (transfer) through the harness: pretrain on a source domain,
then a new output layer and fine-tuning of every parameter on a target
domain that shares the source's items and its users' tastes.

  python experiments/stackrec_tf.py --out results/stackrec_tf
  python experiments/stackrec_tf.py --data movielens-100k --min-count 1 \\
      --out results/stackrec_tf_ml100k

The two domains are one data set's users split at random: `--target-share`
of them (drawn by `--split-seed`) form the target, the rest the source
(written to OUT/domains/{source,target}.csv). Both populations draw their
tastes from the same world, so what a model learns on the source can pay
on the target; the first version of this script paired two unrelated
synthetic worlds that shared only item ids, where the paper's claim could
not be tested.

Arms, at one final architecture (`--depths`' last, dilations by position)
and one budget of optimiser steps (every stage counted):
- `scratch`: the deep model pretrained on the source for
  `--pretrain-steps`, then fine-tuned on the target for `--finetune-steps`;
- `adjacent/paper`, `cross/paper` (`--methods`, `--presets`): pretrained by
  growing `--depths` (2 -> 4 -> 8 blocks) over the same pretraining steps
  (`stackrec_zoo`'s grown arm, as the paper's TS procedure), then
  fine-tuned as scratch;
- `no_pretrain`: the deep model on the target alone for both budgets.
Each pretrained arm keeps its best source-validation checkpoint, gets a
fresh output layer (`jaxrec.surgery.heads`) and fine-tunes every parameter,
as the paper. Every arm numbers the target's items by the source's
vocabulary, so all rank the same catalogue; the harness tests each arm's
best target-validation checkpoint once, after training.

The paper (StackRec, TF on ColdRec): pretraining by stacking is about 3x
faster than pretraining NextItNet-16 and loses no accuracy after
fine-tuning. Reported beside it, per seed: each arm's time, on its own
clock from its first pretraining step, to reach scratch's best target
validation, against scratch's own.

Writes OUT/results.json (the harness's, plus `time_to_scratch_best_s`),
table.md, results.png and summary.md.
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
import stackrec_zoo as zoo  # pylint: disable=wrong-import-position
from jaxrec import config as config_lib  # pylint: disable=wrong-import-position
from jaxrec.data import pipeline, sources  # pylint: disable=wrong-import-position
from jaxrec.surgery import heads as head_surgery  # pylint: disable=wrong-import-position

PAPER_CLAIM = ("TF (ColdRec): pretraining by stacking about 3x faster than "
               "NextItNet-16, no accuracy lost after fine-tuning")


def split_users(spec: str, data_cfg: config_lib.DataConfig,
                target_share: float, seed: int, out_dir: str
                ) -> tuple[str, str]:
  """Writes `spec`'s events as OUT_DIR/{source,target}.csv, its users split
  at random (`target_share` of them the target); returns the two csv:
  sources. A file that exists is kept (the split is a pure function of its
  arguments, recorded beside it)."""
  paths = tuple(os.path.join(out_dir, f"{name}.csv")
                for name in ("source", "target"))
  record = os.path.join(out_dir, "split.json")
  want = {"data": spec, "target_share": target_share, "seed": seed}
  if all(map(os.path.exists, paths + (record,))):
    with open(record, encoding="utf-8") as f:
      held = json.load(f)
    if held != want:
      raise SystemExit(f"{out_dir} holds another split ({held}); use "
                       "another --out")
    return tuple(f"csv:{p}" for p in paths)
  events = sources.resolve_source(spec, data_cfg).read()
  users = np.unique(events.users)
  order = np.random.default_rng(seed).permutation(len(users))
  target = users[order[:int(round(target_share * len(users)))]]
  in_target = np.isin(events.users, target)
  os.makedirs(out_dir, exist_ok=True)
  for path, keep in zip(paths, (~in_target, in_target)):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write("user_id,item_id,timestamp\n")
      for u, i, t in zip(events.users[keep], events.items[keep],
                         events.timestamps[keep]):
        f.write(f"{u},{i},{t}\n")
    os.replace(path + ".tmp", path)
  harness.write_json(record, want)
  return tuple(f"csv:{p}" for p in paths)


def fine_tuned(pretrain: harness.Arm, target_cfg: config_lib.Config,
               steps: int, every: int) -> harness.Arm:
  """`pretrain`'s arm continued: a fresh output layer on its best source
  checkpoint, then `steps` of fine-tuning every parameter on the target.
  The trial is the target run, on the arm's clock from its first
  pretraining step."""

  def train(seed: int, work: str) -> harness.Trial:
    pre = pretrain.train(seed, os.path.join(work, "source"))
    head = os.path.join(work, "new_head")
    if not os.path.isdir(os.path.join(head, "checkpoints")):
      head_surgery.new_head_checkpoint(pre.run_dir, head, seed=seed)
    tuned = harness.train_run(
        zoo.stage_config(target_cfg, target_cfg.model.num_blocks, steps,
                         every, seed),
        os.path.join(work, "target"), steps_before=pre.steps,
        init_from=head)
    return dataclasses.replace(
        tuned, train_time_s=pre.train_time_s + tuned.train_time_s,
        curve=tuple((pre.train_time_s + t, v) for t, v in tuned.curve))

  return harness.Arm(pretrain.name, train)


def no_pretrain_arm(target_cfg: config_lib.Config, target_data: Any,
                    steps: int, every: int) -> harness.Arm:
  def train(seed: int, work: str) -> harness.Trial:
    return harness.train_run(
        zoo.stage_config(target_cfg, target_cfg.model.num_blocks, steps,
                         every, seed), os.path.join(work, "run"),
        target_data)
  return harness.Arm("no_pretrain", train)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  zoo.add_run_flags(parser)
  zoo.add_growth_flags(parser, "--pretrain-steps")
  parser.add_argument("--model", default="nextitnet")
  parser.add_argument("--target-share", type=float, default=0.3,
                      help="share of the users that form the target")
  parser.add_argument("--split-seed", type=int, default=0)
  parser.add_argument("--pretrain-steps", type=int, default=1500)
  parser.add_argument("--finetune-steps", type=int, default=500)
  parser.add_argument("--out", default="runs/stackrec_tf")
  args = parser.parse_args()
  if not 0 < args.target_share < 1:
    parser.error(f"--target-share={args.target_share}: expected a share in "
                 "(0, 1)")
  depths, shares = zoo.growth_schedule(parser, args)
  base = zoo.base_config(args.model, args)
  source_spec, target_spec = split_users(
      args.data, base.data, args.target_share, args.split_seed,
      os.path.join(args.out, "domains"))
  source_cfg = base.replace(data=dataclasses.replace(base.data,
                                                     source=source_spec))
  target_cfg = base.replace(
      model=dataclasses.replace(base.model, num_blocks=depths[-1]),
      data=dataclasses.replace(base.data, source=target_spec))
  source = pipeline.load_data(source_cfg.data)
  # The source's numbering for every arm: one catalogue ranked by all.
  target = pipeline.load_data(target_cfg.data, vocab=source.vocab)
  every = args.eval_every
  arms = [fine_tuned(zoo.scratch_arm(source_cfg, source, depths[-1],
                                     args.pretrain_steps, every),
                     target_cfg, args.finetune_steps, every)]
  arms += [fine_tuned(zoo.grown_arm(source_cfg, source, depths,
                                    zoo.stage_steps(args.pretrain_steps,
                                                    shares), every, m, p),
                      target_cfg, args.finetune_steps, every)
           for m in args.methods.split(",") for p in args.presets.split(",")]
  arms.append(no_pretrain_arm(target_cfg, target,
                              args.pretrain_steps + args.finetune_steps,
                              every))
  seeds = tuple(int(x) for x in args.seeds.split(","))
  results = harness.run_experiment(f"stackrec_tf_{args.model}", arms, seeds,
                                   args.out, args.data)
  zoo.add_time_to_scratch_best(results)
  results["settings"] = {
      "model": args.model, "depths": depths,
      "pretrain_stage_steps": zoo.stage_steps(args.pretrain_steps, shares),
      "finetune_steps": args.finetune_steps, "eval_every": every,
      "batch_size": args.batch_size, "target_share": args.target_share,
      "split_seed": args.split_seed, "source": source.meta,
      "target": target.meta, "paper_claim": PAPER_CLAIM}
  harness.write_json(os.path.join(args.out, "results.json"), results)
  zoo.write_summary(args.out, zoo.summary_rows(args.model, results),
                    PAPER_CLAIM)


if __name__ == "__main__":
  main()
