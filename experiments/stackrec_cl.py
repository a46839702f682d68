"""StackRec CL (continual learning): grow the deployed model when data grows.

Training data arrives as nested subsets (0.2, 0.4, 0.6, 0.8, 1.0 of the
training sequences). A shallow model is trained on the first subset and
fine-tuned as each later subset arrives. When the last data arrives, the
grown arms stack that shallow model 2x (StackRec, as the paper's 16 -> 32
blocks) and fine-tune it on all data; the scratch arm trains the deep model
from scratch on all data. As in the paper, a grown arm's clock covers only
the stacking and the fine-tuning on the new data: the shallow model already
existed. A `shallow` arm (the shallow model fine-tuned on all data, no
growth) shows what the extra depth adds. Every run on all data trains to
convergence under one rule: stop after `patience` validations without a
gain in MRR@5, or at `max_steps`.

  python experiments/stackrec_cl.py                  # a few minutes on CPU
  python experiments/stackrec_cl.py --scale          # GPU, ML-20M-sized data

Writes OUT/results.json and OUT/valid_mrr5.png.
"""
from __future__ import annotations

import os

import stackrec_common as common
from jaxrec.data import pipeline

FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)
SMALL = dict(blocks=2, increment_steps=150, max_steps=2000, patience=4,
             eval_every=50,
             model=dict(embed_dim=32, dropout=0.0),
             # window 0, dropout 0: the rows and model RESULTS.md's tables
             # were made with (jaxrec's defaults changed since).
             data=dict(source="synthetic:small", window=0),
             train=dict(batch_size=64, learning_rate=1e-3))
SCALE = dict(blocks=16, increment_steps=1500, max_steps=30000, patience=4,
             eval_every=500,
             model=dict(embed_dim=64, dtype="bfloat16"),
             data=dict(source="synthetic:ml20m", max_len=100),
             train=dict(batch_size=256, learning_rate=1e-3,
                        eval_batch_size=2048))


def main() -> None:
  parser = common.scenario_parser(__doc__, "runs/stackrec_cl")
  args = parser.parse_args()
  s = SCALE if args.scale else SMALL
  cfg = common.base_config(s, args)
  data = pipeline.load_data(cfg.data)
  quiet = not args.progress
  os.makedirs(args.out, exist_ok=True)
  shallow, deep, every = s["blocks"], 2 * s["blocks"], s["eval_every"]

  # The deployed shallow model, fine-tuned as each earlier subset arrives.
  prev = None
  for frac in FRACTIONS[:-1]:
    prev = common.run_stage(
        common.with_stage(cfg, shallow, s["increment_steps"], every),
        os.path.join(args.out, f"shallow_{frac:.1f}"),
        common.subset_train(data, frac), init_from=prev, quiet=quiet)
  deployed = prev

  scratch = common.Arm("scratch")
  scratch.add_run(common.run_stage(
      common.with_stage(cfg, deep, s["max_steps"], every, s["patience"]),
      os.path.join(args.out, "scratch"), data, quiet=quiet),
      f"{deep} blocks on all data")

  cont = common.Arm("shallow")
  cont.add_run(common.run_stage(
      common.with_stage(cfg, shallow, s["max_steps"], every, s["patience"]),
      os.path.join(args.out, "shallow_1.0"), data, init_from=deployed,
      quiet=quiet), f"{shallow} blocks on all data")

  arms = [scratch, cont]
  for method, preset in common.GROWN_ARMS:
    arm = common.Arm(f"{method}/{preset}")
    root = os.path.join(args.out, f"{method}_{preset}")
    grown = os.path.join(root, f"grown{deep}")
    arm.add_growth(common.grow(deployed, grown, method, preset))
    arm.add_run(common.run_stage(
        common.with_stage(cfg, deep, s["max_steps"], every, s["patience"]),
        os.path.join(root, "finetune"), data, init_from=grown, quiet=quiet),
        f"{deep} blocks on all data")
    arms.append(arm)

  common.write_results(
      args.out, arms, scratch, "CL",
      {"fractions": FRACTIONS, "shallow_blocks": shallow,
       "deep_blocks": deep, "increment_steps": s["increment_steps"],
       "max_steps": s["max_steps"], "patience": s["patience"],
       "config": cfg.to_dict(), "data": data.meta},
      f"StackRec CL: {shallow} -> {deep} blocks when all data arrives")


if __name__ == "__main__":
  main()
