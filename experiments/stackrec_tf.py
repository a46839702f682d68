"""StackRec TF (transfer): pretrain with stacking on a source domain,
fine-tune on a target domain with a new output layer.

The source and target domains share the item id space (the inputs) but
follow different sequential rules: by default two synthetic worlds with
different seeds over the same number of items. Pretraining: the stacked arms
grow 1 -> 2 -> 4 blocks on the source (8 -> 16 -> 32 with --scale), the
scratch arm pretrains the deep model from scratch for as many steps. Each
arm then gets a new output softmax and is fine-tuned on the target to
convergence (stop after `patience` validations without a gain, or at
`max_steps`). The compared metric is the target's validation MRR@5; every
arm's clock starts with its first pretraining stage, so pretraining time
counts. A `no_pretrain` arm trains the deep model on the target alone.

  python experiments/stackrec_tf.py                  # a few minutes on CPU
  python experiments/stackrec_tf.py --scale          # GPU

Writes OUT/results.json and OUT/valid_mrr5.png.
"""
from __future__ import annotations

import dataclasses
import os

import stackrec_common as common
from jaxrec.data import pipeline
from jaxrec.errors import JaxrecError

SMALL = dict(blocks=(1, 2, 4), steps=(150, 150, 300), max_steps=2000,
             patience=4, eval_every=50,
             model=dict(embed_dim=32, dropout=0.0),
             # window 0, dropout 0: the rows and model RESULTS.md's tables
             # were made with (jaxrec's defaults changed since).
             data=dict(source="synthetic:small", window=0),
             target="synthetic:small,users=1000,seed=1",
             train=dict(batch_size=64, learning_rate=1e-3))
SCALE = dict(blocks=(8, 16, 32), steps=(1500, 1500, 3000),
             max_steps=30000, patience=4, eval_every=500,
             model=dict(embed_dim=64, dtype="bfloat16"),
             data=dict(source="synthetic:ml20m", max_len=100),
             target="synthetic:ml20m,users=30000,seed=1",
             train=dict(batch_size=256, learning_rate=1e-3,
                        eval_batch_size=2048))


def main() -> None:
  parser = common.scenario_parser(__doc__, "runs/stackrec_tf")
  parser.add_argument("--target", help="target domain, same item ids")
  args = parser.parse_args()
  s = SCALE if args.scale else SMALL
  cfg = common.base_config(s, args)
  source = pipeline.load_data(cfg.data)
  target_cfg = cfg.replace(data=dataclasses.replace(
      cfg.data, source=args.target or s["target"]))
  target = pipeline.load_data(target_cfg.data)
  if target.num_items != source.num_items:
    raise JaxrecError(f"target {target_cfg.data.source} has "
                      f"{target.num_items} item ids, source "
                      f"{cfg.data.source} {source.num_items}: transfer here "
                      "needs one shared id space")
  blocks, steps, every = s["blocks"], s["steps"], s["eval_every"]
  quiet = not args.progress
  os.makedirs(args.out, exist_ok=True)

  def finetune(arm: common.Arm, pretrained: str, root: str) -> None:
    head = os.path.join(root, "new_head")
    arm.add_growth(common.reset_output_layer(pretrained, head))
    arm.add_run(common.run_stage(
        common.with_stage(target_cfg, blocks[-1], s["max_steps"], every,
                          s["patience"]),
        os.path.join(root, "target"), target, init_from=head, quiet=quiet),
        "target fine-tune")

  scratch = common.Arm("scratch")
  root = os.path.join(args.out, "scratch")
  scratch.add_run(common.run_stage(
      common.with_stage(cfg, blocks[-1], sum(steps), every),
      os.path.join(root, "source"), source, quiet=quiet),
      "source pretrain", record=False)
  finetune(scratch, os.path.join(root, "source"), root)

  # Reference: the deep model trained on the target alone, so the table
  # shows what pretraining buys at all.
  alone = common.Arm("no_pretrain")
  alone.add_run(common.run_stage(
      common.with_stage(target_cfg, blocks[-1], s["max_steps"], every,
                        s["patience"]),
      os.path.join(args.out, "no_pretrain"), target, quiet=quiet),
      "target only")

  arms = [scratch, alone]
  for method, preset in common.GROWN_ARMS:
    arm = common.Arm(f"{method}/{preset}")
    root = os.path.join(args.out, f"{method}_{preset}")
    prev = None
    for i, (depth, n) in enumerate(zip(blocks, steps)):
      if prev is not None:
        grown = os.path.join(root, f"grown{depth}")
        arm.add_growth(common.grow(prev, grown, method, preset, seed=i))
        prev = grown
      prev = common.run_stage(common.with_stage(cfg, depth, n, every),
                              os.path.join(root, f"source{depth}"), source,
                              init_from=prev, quiet=quiet)
      arm.add_run(prev, f"source {depth} blocks", record=False)
    finetune(arm, prev, root)
    arms.append(arm)

  common.write_results(
      args.out, arms, scratch, "TF",
      {"blocks": blocks, "source_steps": steps,
       "scratch_source_steps": sum(steps),
       "finetune_max_steps": s["max_steps"], "patience": s["patience"],
       "source": cfg.data.source,
       "target": target_cfg.data.source, "config": cfg.to_dict(),
       "source_data": source.meta, "target_data": target.meta},
      "StackRec TF: target validation after source pretraining")


if __name__ == "__main__":
  main()
