"""PeterRec's profile tasks on real MovieLens-100k: predict a user's gender,
age bucket and occupation from their rating history with a frozen
pretrained NextItNet and small patches, beside the paper's baselines.

  python experiments/peterrec_profiles.py --out results/peterrec_ml100k
  python experiments/peterrec_profiles.py --out OUT \\
      --pretrained 'results/accuracy_ml100k/runs/default_nextitnet/seed{seed}'

Per seed: a NextItNet pretrained on next-item prediction over every user's
history with shipped defaults (`accuracy.default_config`, min counts 1;
with `--pretrained`, that run is used instead: accuracy.py's default runs
are exactly these), then per label (`jaxrec data profile movielens-100k
--label L`: the user's items in time order, then the label) six arms:

  peter        PeterRec: serial patches + each block's ln2 + head; the
               pretrained network frozen
  fine_all     everything trains (FineAll)
  fine_cls     the head only (FineCLS)
  fine_last1   the head + the top block's second conv (FineLast1)
  fine_last2   the head + the top block's two convs (FineLast2)
  peter_zero   the patched network from scratch (PeterZero)

and two references outside the paper, `items_logreg`: a linear softmax
classifier over the multi-hot set of the user's items, its L2 weight
chosen on validation, once over every item of the history and once over
the last max_len - 1 items (49 at the default), the window the fine-tuned
networks read (`--max-len` widens it: NextItNet has no position table).
They say how much of a label the histories hold at all on 660 training
users, and how much of it the window keeps.

Users are split 70/10/20 (train/valid/test, `data.split_seed`, the same
users for every arm, label and seed); each arm keeps the checkpoint best
on validation accuracy and reads test once. Every arm has the same
budget (`--epochs` passes over the training users, validation every
`--eval-every` steps, `--patience`). The pretraining saw every user's
items but no label: the profile labels are new to it, as in the paper,
where the source-domain behaviour of the same users is pretrained on.

The task files are written to OUT/tasks/ (MovieLens data: never commit
them; .gitignore keeps them out). Writes OUT/results.json ({"labels": {LABEL: {"majority": acc, "arms":
{ARM: {"test"|"valid": {"mean", "std", "values"}, "trainable_params",
"backbone_params", "train_time_s"}}, "items_logreg", "claims"}}}) and OUT/peterrec_profiles.png, and
prints a Markdown table beside the paper's claims. Where jaxrec differs
from the paper: causal pretraining only (the paper also shows masked,
GRec-style pretraining); the paper's data and labels are its own (Tencent
users' gender, age bucket, life status), so its accuracies are not
comparable numbers, only its orderings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging as absl_logging

from jaxrec import cli
from jaxrec import config as config_lib
from jaxrec.data import pipeline, transfer
from jaxrec.methods.peterrec import finetune as peterrec
from jaxrec.training import checkpoints, loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import accuracy  # pylint: disable=wrong-import-position
import harness  # pylint: disable=wrong-import-position

absl_logging.set_verbosity(absl_logging.ERROR)
DATA = "movielens-100k"
ARMS = ("peter", "fine_all", "fine_cls", "fine_last1", "fine_last2",
        "peter_zero")
PAPER_CLAIMS = {
    "peter_near_fine_all": "PeterRec about equal to FineAll (>= 95% of "
                           "its accuracy)",
    "peter_above_peter_zero": "PeterRec above PeterZero (pretraining "
                              "pays)",
    "last2_last1_cls_order": "FineLast2 >= FineLast1 >= FineCLS",
    "peter_under_a_tenth": "PeterRec trains under a tenth of the backbone",
    "above_majority": "(ours) PeterRec above the majority class",
}
# "Above" means by at least one test user: a smaller difference of means is
# a tie (one user is 0.53 accuracy points on MovieLens-100k's 189).


def pretrained_run(out: str, pattern: str | None, seed: int,
                   data: str = DATA) -> str:
  """The seed's pretrained run: `pattern` filled in, or trained here with
  shipped defaults (resumed when killed, reused when finished)."""
  if pattern:
    run_dir = pattern.format(seed=seed)
    if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
      raise SystemExit(f"--pretrained: {run_dir} holds no checkpoints")
    return run_dir
  run_dir = os.path.join(out, "pretrain", f"seed{seed}")
  if not os.path.exists(os.path.join(run_dir, "metrics.json")):
    cfg = accuracy.default_config(data, "nextitnet", 1, seed)
    loop.train(cfg, run_dir, pipeline.load_data(cfg.data),
               progress_bar=False,
               resume=os.path.isdir(os.path.join(run_dir, "checkpoints")))
  return run_dir


def profile_file(out: str, label: str, data: str = DATA) -> str:
  """The task file `jaxrec data profile` writes (one writer, atomic)."""
  path = os.path.join(out, "tasks", f"{label}.txt")
  if not os.path.exists(path) and cli.main(
      ["data", "profile", data, "--label", label, "--out", path]) != 0:
    raise SystemExit(f"jaxrec data profile {data} --label {label} failed")
  return path


def train_config(args: argparse.Namespace, seed: int
                 ) -> config_lib.TrainConfig:
  return config_lib.TrainConfig(
      epochs=args.epochs, eval_every=args.eval_every,
      patience=args.patience, batch_size=args.batch_size,
      learning_rate=args.lr, seed=seed, select_metric="accuracy")


def run_arm(pre: str, task_path: str, out: str, arm: str,
            train: config_lib.TrainConfig, data: config_lib.DataConfig,
            max_len: int | None = None) -> dict[str, Any]:
  """One fine-tuning; a finished one is read back, a killed one resumed.
  A run made at another window is refused: OUT holds one study."""
  done = os.path.join(out, "metrics.json")
  if os.path.exists(done):
    window = max_len or _read(os.path.join(pre, "config.json"))["data"][
        "max_len"]
    made = _read(os.path.join(out, "config.json"))["data"]["max_len"]
    if made != window:
      raise SystemExit(f"{out}: fine-tuned at max_len {made}, not "
                       f"{window}; give this study another --out")
    return _read(done)
  return peterrec.finetune(pre, "profile", task_path, out, arm, "serial",
                           train=train, data=data, progress_bar=False,
                           max_len=max_len,
                           resume=os.path.isdir(
                               os.path.join(out, "checkpoints")))


L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2)


def items_logreg(task_path: str, data: config_lib.DataConfig,
                 window: int = 0, steps: int = 300) -> dict[str, Any]:
  """The linear reference: full-batch Adam on softmax cross entropy plus
  `l2`·|W|², one fit per L2 weight; the one best on validation accuracy
  is tested. Same users and splits as the fine-tunings; `window` > 0
  keeps only each user's last `window` items."""
  lines = transfer.read_lines(task_path, "profile")
  if window:
    lines = transfer.UserLines([src[-window:] for src in lines.sources],
                               lines.targets)
  users = transfer.split_users(len(lines.sources), data)
  items = {i: k for k, i in enumerate(sorted(
      {i for src in lines.sources for i in src}))}
  classes = {c: k for k, c in enumerate(sorted(
      {t[0] for t in lines.targets}))}
  x = np.zeros((len(lines.sources), len(items)), np.float32)
  for u, src in enumerate(lines.sources):
    x[u, [items[i] for i in src]] = 1.0
  x /= np.sqrt(np.maximum(x.sum(1, keepdims=True), 1.0))
  y = np.array([classes[t[0]] for t in lines.targets], np.int32)

  def fit(l2: float) -> dict[str, jax.Array]:
    params = {"w": jnp.zeros((len(items), len(classes))),
              "b": jnp.zeros(len(classes))}
    opt = optax.adam(0.05)
    xt, yt = jnp.asarray(x[users["train"]]), jnp.asarray(y[users["train"]])

    def loss(p):
      logits = xt @ p["w"] + p["b"]
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, yt)
      return ce.mean() + l2 * jnp.sum(p["w"] ** 2)

    def step(carry, _):
      p, s = carry
      grads = jax.grad(loss)(p)
      updates, s = opt.update(grads, s)
      return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None,
                                  length=steps)
    return params

  def share_right(params, split):
    pred = np.argmax(x[users[split]] @ np.asarray(params["w"])
                     + np.asarray(params["b"]), axis=1)
    return float(np.mean(pred == y[users[split]]))

  fits = {l2: fit(l2) for l2 in L2_GRID}
  valid = {l2: share_right(p, "valid") for l2, p in fits.items()}
  chosen = max(L2_GRID, key=lambda l2: (valid[l2], l2))  # Ties: stronger L2.
  return {"l2": chosen, "valid": valid[chosen],
          "test": share_right(fits[chosen], "test"),
          "trainable_params": int(len(items) * len(classes) + len(classes))}


def _read(path: str) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--out", required=True)
  parser.add_argument("--data", default=DATA, help="a registered data set "
                      "with user features (`jaxrec data list`)")
  parser.add_argument("--pretrained", help="pretrained run per seed, with "
                      "{seed} in the path (default: pretrain under OUT)")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--labels", default="gender,age")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--epochs", type=int, default=60)
  parser.add_argument("--eval-every", type=int, default=20)
  parser.add_argument("--patience", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--max-len", type=int, default=None,
                      help="fine-tuning window (default: the pretraining's "
                      "max_len; NextItNet reads longer ones)")
  parser.add_argument("--valid-fraction", type=float, default=0.1)
  parser.add_argument("--test-fraction", type=float, default=0.2)
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  labels = args.labels.split(",")
  arms = args.arms.split(",")
  data = config_lib.DataConfig(valid_fraction=args.valid_fraction,
                               test_fraction=args.test_fraction)
  results: dict[str, Any] = {
      "experiment": "peterrec_profiles", "data": args.data, "seeds": seeds,
      "selection": "valid accuracy", "budget": {
          k: getattr(args, k) for k in ("epochs", "eval_every", "patience",
                                        "batch_size", "lr", "max_len")},
      "pretrained": [pretrained_run(args.out, args.pretrained, s, args.data)
                     for s in seeds],
      "labels": {}}
  for label in labels:
    task_path = profile_file(args.out, label, args.data)
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for seed, pre in zip(seeds, results["pretrained"]):
      for arm in arms:
        row = run_arm(pre, task_path,
                      os.path.join(args.out, "runs", label, arm,
                                   f"seed{seed}"),
                      arm, train_config(args, seed), data, args.max_len)
        runs[arm].append(row)
        print(f"[profiles] {label} {arm} seed {seed}: test accuracy "
              f"{row['test']['accuracy']:.4f} (valid "
              f"{row['valid']['accuracy']:.4f})", flush=True)
    first = runs[arms[0]][0]
    window = transfer.source_room(first["data"]["max_len"], causal=True)
    references = {"all": items_logreg(task_path, data),
                  "window": items_logreg(task_path, data, window)}
    for name, ref in references.items():
      print(f"[profiles] {label} items_logreg ({name}): test accuracy "
            f"{ref['test']:.4f} (valid {ref['valid']:.4f}, l2 "
            f"{ref['l2']:g})", flush=True)
    results["labels"][label] = {
        "items_logreg": {**references, "window_items": window},
        "majority": first["popularity"]["accuracy"],
        "users": first["data"]["num_users"],
        "arms": {arm: {
            "test": harness.summary([r["test"]["accuracy"] for r in rs]),
            "valid": harness.summary([r["valid"]["accuracy"] for r in rs]),
            "trainable_params": rs[0]["trainable_params"],
            "backbone_params": rs[0]["backbone_params"],
            "train_time_s": harness.summary(
                [r["train_time_s"] for r in rs]),
            "steps": [r["steps"] for r in rs]} for arm, rs in runs.items()}}
    if set(ARMS) <= set(arms):
      results["labels"][label]["claims"] = claims(results["labels"][label])
    checkpoints.write_json(os.path.join(args.out, "results.json"), results)
  plot(results, os.path.join(args.out, "peterrec_profiles.png"))
  print(markdown(results))
  print(claims_table(results))


def claims(entry: dict[str, Any]) -> dict[str, bool]:
  """The paper's claims on one label's results (test means)."""
  acc = {arm: a["test"]["mean"] for arm, a in entry["arms"].items()}
  user = 1.0 / entry["users"]["test"]
  peter = entry["arms"]["peter"]
  return {
      "peter_near_fine_all": acc["peter"] >= 0.95 * acc["fine_all"],
      "peter_above_peter_zero": acc["peter"] >= acc["peter_zero"] + user,
      "last2_last1_cls_order": acc["fine_last2"] + user / 2 >= acc[
          "fine_last1"] >= acc["fine_cls"] - user / 2,
      "peter_under_a_tenth":
          peter["trainable_params"] < 0.1 * peter["backbone_params"],
      "above_majority": acc["peter"] >= entry["majority"] + user}


def claims_table(results: dict[str, Any]) -> str:
  """The claims, met or not, per label (needs every paper arm)."""
  labels = [label for label, entry in results["labels"].items()
            if set(ARMS) <= set(entry["arms"])]
  if not labels:
    return ""
  verdicts = {label: claims(results["labels"][label]) for label in labels}
  rows = ["| claim (PeterRec, SIGIR 2020) | " + " | ".join(labels) + " |",
          "| --- |" + " --- |" * len(labels)]
  for key, text in PAPER_CLAIMS.items():
    rows.append(f"| {text} | " + " | ".join(
        "met" if verdicts[label][key] else "not met" for label in labels)
                + " |")
  return "\n".join(rows)


def markdown(results: dict[str, Any]) -> str:
  """Test accuracy, mean ± std over seeds, one column per label."""
  labels = list(results["labels"])
  first = results["labels"][labels[0]]["arms"]
  rows = ["| arm | trainable | % of backbone | "
          + " | ".join(f"{label} test acc" for label in labels) + " |",
          "| --- |" + " ---: |" * (2 + len(labels))]
  for arm, a in first.items():
    share = 100 * a["trainable_params"] / a["backbone_params"]
    rows.append(f"| {arm} | {a['trainable_params']:,} | {share:.1f}% | "
                + " | ".join(
                    _cell(results["labels"][label]["arms"][arm]["test"])
                    for label in labels) + " |")
  window = results["labels"][labels[0]]["items_logreg"]["window_items"]
  for name, what in (("all", "every item"),
                     ("window", f"last {window} items")):
    tests = [results["labels"][label]["items_logreg"][name]["test"]
             for label in labels]
    rows.append(f"| items_logreg over {what} (reference) | | | "
                + " | ".join(f"{t:.4f}" for t in tests) + " |")
  rows.append("| majority class | | | " + " | ".join(
      f"{results['labels'][label]['majority']:.4f}" for label in labels)
              + " |")
  return "\n".join(rows)


def _cell(stat: dict[str, Any]) -> str:
  return f"{stat['mean']:.4f} ± {stat['std']:.4f}"


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  labels = list(results["labels"])
  fig, axes = plt.subplots(1, len(labels), figsize=(4.5 * len(labels), 4))
  axes = axes if len(labels) > 1 else [axes]
  for ax, label in zip(axes, labels):
    entry = results["labels"][label]
    arms = list(entry["arms"])
    ax.bar(range(len(arms)), [entry["arms"][a]["test"]["mean"] for a in arms],
           yerr=[entry["arms"][a]["test"]["std"] for a in arms], capsize=3)
    ax.axhline(entry["majority"], color="k", ls="--", lw=1,
               label="majority class")
    refs = entry["items_logreg"]
    for name, style in (("all", "-"), ("window", ":")):
      ax.axhline(refs[name]["test"], color="C3", ls=style, lw=1,
                 label=f"items_logreg ({name})")
    lowest = min([entry["majority"], refs["window"]["test"]]
                 + [entry["arms"][a]["test"]["mean"] for a in arms])
    ax.set_ylim(0.8 * lowest, None)  # The differences, not the bars' feet.
    ax.set_xticks(range(len(arms)), arms, rotation=45, ha="right")
    ax.set_title(f"{label}: test accuracy")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  main()
