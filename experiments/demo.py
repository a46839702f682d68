"""The README's main job: train, grow, fine-tune, compare (`make demo`).

On the embedded synthetic data: a shallow NextItNet is trained, grown 2x
with StackRec (adjacent stacking, `preserve` preset: the grown model
starts computing what the shallow one did) and fine-tuned; a model of the grown depth is trained from scratch. The shallow
stage gets a short fixed budget; the grown and the scratch model train until
the config's early-stopping rule stops them. Prints the test metrics (full ranking, leave-
one-out) of all three next to the popularity baseline, with wall times.
The same steps on the command line:

  jaxrec train --config experiments/configs/demo.yaml --num-blocks 2 --steps 300 --patience 0 --out runs/demo/shallow
  jaxrec grow --from runs/demo/shallow --source latest --out runs/demo/grown --method adjacent --preset preserve
  jaxrec train --config experiments/configs/demo.yaml --init-from runs/demo/grown --out runs/demo/finetuned
  jaxrec train --config experiments/configs/demo.yaml --out runs/demo/scratch
"""
from __future__ import annotations

import argparse
import json
import os

import stackrec_common as common
from jaxrec import config as config_lib
from jaxrec.data import pipeline

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/demo")
  parser.add_argument("--config",
                      default=os.path.join(HERE, "configs", "demo.yaml"))
  parser.add_argument("--shallow-steps", type=int, default=300,
                      help="fixed budget of the shallow stage")
  parser.add_argument("--method", default="adjacent")
  parser.add_argument("--preset", default="preserve",
                      help="preserve (default: fastest in RESULTS.md) or "
                           "paper (the official code's resets)")
  args = parser.parse_args()
  cfg = config_lib.from_dict(config_lib.load_file(args.config), args.config)
  data = pipeline.load_data(cfg.data)
  deep = cfg.model.num_blocks
  shallow = deep // 2
  steps, patience = cfg.train.steps, cfg.train.patience
  every = cfg.train.eval_every
  print(f"data: {data.meta['source']}, {data.meta['num_users']} users, "
        f"{data.meta['num_items']} items, protocol {data.meta['protocol']}")

  rows = []
  print(f"[1/4] training {shallow} blocks for {args.shallow_steps} steps")
  run = common.run_stage(common.with_stage(cfg, shallow, args.shallow_steps,
                                           every),
                         os.path.join(args.out, "shallow"), data,
                         quiet=False)
  rows.append((f"shallow ({shallow} blocks)", run, 0.0))
  print(f"[2/4] growing {shallow} -> {deep} blocks ({args.method}, "
        f"{args.preset})")
  grown = os.path.join(args.out, "grown")
  grow_s = common.grow(run, grown, args.method, args.preset)
  print(f"[3/4] fine-tuning {deep} blocks until validation stops improving")
  run = common.run_stage(common.with_stage(cfg, deep, steps, every, patience),
                         os.path.join(args.out, "finetuned"), data,
                         init_from=grown, quiet=False)
  rows.append((f"grown ({deep} blocks)", run, grow_s))
  print(f"[4/4] training {deep} blocks from scratch until validation stops "
        "improving")
  run = common.run_stage(common.with_stage(cfg, deep, steps, every, patience),
                         os.path.join(args.out, "scratch"), data,
                         quiet=False)
  rows.append((f"scratch ({deep} blocks)", run, 0.0))
  print_comparison(rows)


def print_comparison(rows: list[tuple[str, str, float]]) -> None:
  results = []
  for name, run_dir, extra_s in rows:
    with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
      results.append((name, json.load(f), extra_s))
  pop = results[-1][1]["popularity"]
  print(f"\ntest metrics, full ranking over all "
        f"{results[0][1]['data']['num_items']} items "
        f"({results[0][1]['test']['count']} users)")
  names = ("mrr@5", "hr@10", "ndcg@10", "ndcg@20")
  print(f"{'model':<22}" + "".join(f"{n:>9}" for n in names)
        + f"{'train s':>9}")
  print(f"{'popularity':<22}" + "".join(f"{pop[n]:>9.4f}" for n in names))
  shallow_s = results[0][1]["train_time_s"]
  for name, result, extra_s in results:
    seconds = result["train_time_s"] + extra_s
    if name.startswith("grown"):
      seconds += shallow_s  # A grown model has paid for its shallow stage.
    print(f"{name:<22}" + "".join(f"{result['test'][n]:>9.4f}"
                                  for n in names) + f"{seconds:>9.0f}")
  print("(grown: shallow stage + growth + fine-tuning)")


if __name__ == "__main__":
  main()
