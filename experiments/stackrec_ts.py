"""StackRec TS (training from scratch): progressive 2x growth vs from scratch.

The stacked arms train a shallow model for a short fixed budget (not to
convergence), grow it 2x, train again briefly, grow again, and train the
final depth to convergence: e.g. 1 -> 2 -> 4 blocks (default, CPU) or
8 -> 16 -> 32 (--scale). The scratch arm trains the final depth from scratch
to convergence. "Convergence" is the same rule for both: stop after
`patience` validations without a gain in MRR@5, or at `max_steps`. Each
arm's clock starts with its first stage, so stacked arms pay for every stage
and every growth step.

  python experiments/stackrec_ts.py                  # a few minutes on CPU
  python experiments/stackrec_ts.py --scale          # GPU, ML-20M-sized data

Writes OUT/results.json and OUT/valid_mrr5.png.
"""
from __future__ import annotations

import os

import stackrec_common as common
from jaxrec.data import pipeline

SMALL = dict(blocks=(1, 2, 4), steps=(150, 150), max_steps=2000,
             patience=4, eval_every=50,
             model=dict(embed_dim=32, dropout=0.0),
             # window 0, dropout 0: the rows and model RESULTS.md's tables
             # were made with (jaxrec's defaults changed since).
             data=dict(source="synthetic:small", window=0),
             train=dict(batch_size=64, learning_rate=1e-3))
SCALE = dict(blocks=(8, 16, 32), steps=(1500, 1500), max_steps=30000,
             patience=4, eval_every=500,
             model=dict(embed_dim=64, dtype="bfloat16"),
             data=dict(source="synthetic:ml20m", max_len=100),
             train=dict(batch_size=256, learning_rate=1e-3,
                        eval_batch_size=2048))


def main() -> None:
  parser = common.scenario_parser(__doc__, "runs/stackrec_ts")
  args = parser.parse_args()
  settings = SCALE if args.scale else SMALL
  cfg = common.base_config(settings, args)
  data = pipeline.load_data(cfg.data)
  blocks, every = settings["blocks"], settings["eval_every"]
  # Short fixed budgets for the shallow stages; the final depth (and the
  # scratch arm) train to convergence under one early-stopping rule.
  stages = [common.with_stage(cfg, depth, n, every)
            for depth, n in zip(blocks[:-1], settings["steps"])]
  final = common.with_stage(cfg, blocks[-1], settings["max_steps"], every,
                            settings["patience"])
  quiet = not args.progress
  os.makedirs(args.out, exist_ok=True)

  scratch = common.Arm("scratch")
  run = common.run_stage(final, os.path.join(args.out, "scratch"), data,
                         quiet=quiet)
  scratch.add_run(run, f"{blocks[-1]} blocks")

  arms = [scratch]
  for method, preset in common.GROWN_ARMS:
    arm = common.Arm(f"{method}/{preset}")
    root = os.path.join(args.out, f"{method}_{preset}")
    prev = None
    for i, stage in enumerate(stages + [final]):
      depth = stage.model.num_blocks
      if prev is not None:
        grown = os.path.join(root, f"grown{depth}")
        arm.add_growth(common.grow(prev, grown, method, preset, seed=i))
        prev = grown
      run = common.run_stage(stage, os.path.join(root, f"stage{depth}"),
                             data, init_from=prev, quiet=quiet)
      arm.add_run(run, f"{depth} blocks")
      prev = run
    arms.append(arm)

  common.write_results(
      args.out, arms, scratch, "TS",
      {"blocks": blocks, "shallow_stage_steps": settings["steps"],
       "max_steps": settings["max_steps"], "patience": settings["patience"],
       "eval_every": every, "config": cfg.to_dict(), "data": data.meta},
      f"StackRec TS: {'->'.join(map(str, blocks))} blocks vs "
      f"{blocks[-1]} from scratch")


if __name__ == "__main__":
  main()
