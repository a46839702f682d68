"""CpRec through the harness: each compression alone and together, against
the uncompressed model, over seeds, with every knob chosen on validation.

  python experiments/cprec.py --out results/cprec            # CPU
  python experiments/cprec.py --out runs/cprec --scale       # GPU: ML-20M shape

Arms (all NextItNet, same data and optimiser steps):

  nextitnet             uncompressed
  adaptive_input        block-wise adaptive input embedding
  tree_softmax          two-level tree softmax head
  share_cross_layer     one stored block, its two convs shared (ALBERT)
  share_cross_block     position i runs stored block i mod P
  share_adjacent_layer  the two convs of each block share one kernel
  share_adjacent_block  position i runs stored block i // 2
  cprec                 adaptive input + tree softmax + cross-block sharing
  small_nextitnet       uncompressed, width chosen to match cprec's size

Knobs, each chosen on validation (the mean over seeds) before the arms
that depend on it train, so no test number is in view when any is set:
1. the width C: `nextitnet` at each of `--widths` (default 32 and 64);
   every other arm runs at the chosen C (`--embed-dim` fixes C instead);
2. the band shares: `cprec` at each of `--band-share-grid` (where the head
   band ends, as a share of training events; default 0.6 and 0.8); every
   arm with bands uses the chosen one (`--band-shares` fixes it instead);
3. small_nextitnet's width: the uncompressed model's closest in size to
   the chosen cprec.
Then the harness tests every arm once. Timings, on seed 0's runs: each
arm's training tokens/s (the mean of its last two logged windows) and its
top-20 latency at batch 512 and batch 1, full scoring against the tree
head's exact early exit, with the share of (user, band) pairs the exit
did not search; and nextitnet's and cprec's searches interleaved in one
process (latency timed apart is too noisy here to compare across arms).

Writes OUT/results.json (the harness's, plus per arm `params_by_subtree`,
`tokens_per_s`, `topn_ms` and `config`; `top20_compared`, `choices`,
`targets`, `settings`), table.md, results.png, accuracy_vs_params.png and
summary.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=wrong-import-position
from jaxrec import config as config_lib  # pylint: disable=wrong-import-position
from jaxrec import heads, models  # pylint: disable=wrong-import-position
from jaxrec.data import pipeline  # pylint: disable=wrong-import-position
from jaxrec.heads import tree_softmax  # pylint: disable=wrong-import-position
from jaxrec.tasks import next_item  # pylint: disable=wrong-import-position
from jaxrec.training import state  # pylint: disable=wrong-import-position

# 10,000 items with a long tail: embedding and softmax are most of the
# model. 1,500 steps: the uncompressed model's validation flattens from
# about 800 steps, cprec's still rises a little at 1,500 (RESULTS.md).
CPU = dict(data="synthetic:small,users=5000,items=10000,topics=100",
           num_blocks=4, max_len=20, batch_size=128, steps=1500,
           eval_every=100, lr=3e-3, timing_batches=5)
SCALE = dict(data="synthetic:ml20m", num_blocks=32, max_len=50,
             batch_size=256, steps=20000, eval_every=2000, lr=1e-3,
             timing_batches=20)
WIDTHS = (32, 64)
BAND_SHARE_GRID = (0.6, 0.8)
NUM_BANDS = 3
SHARE_PERIOD = 2
ARMS = {  # arm -> config sections it changes
    "nextitnet": {},
    "adaptive_input": {"model": {"embedding": "adaptive"}, "bands": True},
    "tree_softmax": {"head": {"name": "tree_softmax"}, "bands": True},
    "share_cross_layer": {"methods": {"cprec": {"share": "cross_layer"}}},
    "share_cross_block": {"methods": {"cprec": {"share": "cross_block",
                                                "period": SHARE_PERIOD}}},
    "share_adjacent_layer": {"methods": {"cprec": {
        "share": "adjacent_layer"}}},
    "share_adjacent_block": {"methods": {"cprec": {
        "share": "adjacent_block"}}},
    "cprec": {"model": {"embedding": "adaptive"},
              "methods": {"cprec": {"share": "cross_block",
                                    "period": SHARE_PERIOD}},
              "head": {"name": "tree_softmax"}, "bands": True},
    "small_nextitnet": {},  # Its width matches cprec's size.
}
TOP_N = 20
TIMING_PASSES = 5  # The fastest pass counts; passes interleave the calls.
LAST_HIDDEN = jax.jit(next_item.last_hidden, static_argnums=1)
PAPER = ("CpRec (SIGIR 2020): 4-8x fewer parameters at comparable or better "
         "accuracy on ML-20M-scale data")


def arm_config(s: dict[str, Any], arm: str, seed: int, width: int,
               shares: float, band_flags: dict[str, Any]
               ) -> config_lib.Config:
  """`arm` at width C=`width`; an arm built on bands gets `shares` and the
  band flags (`--band-dims`, `--tail-dims`, `--num-bands`)."""
  raw: dict[str, Any] = {
      "model": {"embed_dim": width, "num_blocks": s["num_blocks"]},
      "data": {"source": s["data"], "max_len": s["max_len"],
               "min_user_count": 1, "min_item_count": 1},
      "train": {"batch_size": s["batch_size"], "steps": s["steps"],
                "eval_every": s["eval_every"], "learning_rate": s["lr"],
                "patience": 0, "seed": seed}}
  spec = ARMS[arm]
  for section in ("model", "head", "methods"):
    if section in spec:
      raw.setdefault(section, {}).update(json.loads(json.dumps(
          spec[section])))
  if spec.get("bands"):
    raw["model"].update({"num_bands": NUM_BANDS, "band_shares": [shares],
                         **band_flags.get("model", {})})
    if raw.get("head", {}).get("name") == "tree_softmax":
      raw["head"].update(band_flags.get("head", {}))
  return config_lib.from_dict(raw, f"arm {arm}").validate()


def param_count(cfg: config_lib.Config, data: Any) -> int:
  fitted = cfg.fit_data(data.num_items, data.max_len, data.item_counts)
  return models.count_params(models.abstract_params(fitted))


def matched_width(s, data, band_flags, target: int) -> int:
  """The width whose uncompressed model is closest to `target` params."""
  sizes = {c: param_count(arm_config(s, "small_nextitnet", 0, c, 0.0,
                                     band_flags), data)
           for c in range(4, 257, 4)}
  return min(sizes, key=lambda c: abs(sizes[c] - target))


def arm_of(s, data, band_flags, arm: str, width: int, shares: float,
           name: str = "", knobs: dict[str, Any] | None = None
           ) -> harness.Arm:
  def train(seed: int, work: str) -> harness.Trial:
    cfg = arm_config(s, arm, seed, width, shares, band_flags)
    return harness.train_run(cfg, os.path.join(work, "run"), data)
  return harness.Arm(name or arm, train, variant_of=arm if knobs else "",
                     knobs=knobs or {})


# ------------------------------------------------------------ timing


def top20_calls(params, cfg) -> dict[str, Any]:
  """An arm's top-20 queries, as functions of the last hidden states h:
  `full` (every item scored) and, for the tree head, `early_exit`. The
  backbone runs outside, so only the head's search is timed."""
  if cfg.head.name == "tree_softmax":
    return {"full": lambda h: tree_softmax.top_n(params, cfg, h, TOP_N,
                                                 early_exit=False),
            "early_exit": lambda h: tree_softmax.top_n(params, cfg, h,
                                                       TOP_N)}
  head, v = heads.get(cfg.head.name), cfg.model.num_items
  full = jax.jit(lambda p, h: jax.lax.top_k(head.tile_scores(
      p, cfg, h, jnp.array(0), v).at[:, 0].set(-jnp.inf), TOP_N))
  return {"full": lambda h: full(params, h)}


def interleaved_ms(calls: dict[str, Any], inputs: np.ndarray, size: int,
                   count: int) -> tuple[dict[str, float], dict[str, list]]:
  """ms per query batch of each (params, cfg, fn) in `calls` over `count`
  batches of `size` test users: the fastest of TIMING_PASSES passes, the
  calls interleaved within each pass; and each call's outputs."""
  size = min(size, len(inputs))
  count = max(1, min(count, len(inputs) // size))
  batches = [inputs[i * size:(i + 1) * size] for i in range(count)]
  hs, outs, by_model = {}, {}, {}
  for name, (params, cfg, fn) in calls.items():
    if id(params) not in by_model:  # Calls on one model share its states.
      by_model[id(params)] = [LAST_HIDDEN(params, cfg, x) for x in batches]
    hs[name] = by_model[id(params)]
    # Compile every program the batches need, as a server would.
    outs[name] = jax.block_until_ready([fn(h) for h in hs[name]])
  best = dict.fromkeys(calls, float("inf"))
  for _ in range(TIMING_PASSES):
    for name, (_, _, fn) in calls.items():
      start = time.perf_counter()
      for h in hs[name]:
        jax.block_until_ready(fn(h))
      best[name] = min(best[name],
                       1000 * (time.perf_counter() - start) / count)
  return best, outs


def topn_latency(params, cfg, data, batches: int) -> dict[str, Any]:
  """Top-20 ms per query batch, full vs early exit, at batch 512 and 1,
  with the share of (user, tail band) pairs the exit did not search and
  whether its ids and scores equal the full search's."""
  calls = {name: (params, cfg, fn)
           for name, fn in top20_calls(params, cfg).items()}

  def measure(size: int, count: int) -> dict[str, Any]:
    ms, outs = interleaved_ms(calls, data.test_inputs, size, count)
    out = {"batch": min(size, len(data.test_inputs)),
           "batches": len(outs["full"]), "full_ms": ms["full"]}
    if "early_exit" in ms:
      scored = np.concatenate([o[2] for o in outs["early_exit"]])
      out.update(
          early_exit_ms=ms["early_exit"],
          bands_skipped_share=float(1.0 - scored.mean()),
          skipped_share_by_band=[float(x) for x in 1 - scored.mean(0)],
          exact=all(all(bool((np.asarray(a) == np.asarray(b)).all())
                        for a, b in zip(f[:2], e[:2]))
                    for f, e in zip(outs["full"], outs["early_exit"])))
    return out

  out = measure(512, batches)
  out["batch_1"] = measure(1, 50 * batches)
  return out


def tokens_per_s(run_dir: str) -> float:
  """Steady training throughput: the mean of the run's last two logged
  windows (the first holds compilation)."""
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    rates = [json.loads(line).get("tokens_per_s") for line in f]
  return float(np.mean([x for x in rates if x][-2:]))


def timed(results: dict[str, Any], data, batches: int) -> None:
  """Per arm (seed 0's run): sizes by subtree, tokens/s, top-20 latency;
  then nextitnet's and cprec's searches interleaved."""
  loaded = {}
  for name, arm in results["arms"].items():
    params, cfg, _ = state.load_params(arm["run_dirs"][0], "best")
    loaded[name] = (params, cfg)
    arm["params_by_subtree"] = {k: models.count_params(v)
                                for k, v in params.items()}
    arm["tokens_per_s"] = tokens_per_s(arm["run_dirs"][0])
    arm["topn_ms"] = topn_latency(params, cfg, data, batches)
    arm["config"] = {"model": config_lib.section_to_dict(cfg.model),
                     "head": config_lib.section_to_dict(cfg.head)}
  if {"nextitnet", "cprec"} <= set(loaded):
    calls = {f"{arm}_{name}": (*loaded[arm], fn)
             for arm in ("nextitnet", "cprec")
             for name, fn in top20_calls(*loaded[arm]).items()}
    results["top20_compared"] = {
        key: interleaved_ms(calls, data.test_inputs, size, count)[0]
        for key, size, count in (("batch_512", 512, batches),
                                 ("batch_1", 1, 50 * batches))}


# ----------------------------------------------------------- reports


def targets(results: dict[str, Any]) -> dict[str, bool]:
  """The issue's CPU targets, on means over seeds (and per seed where the
  claim is about accuracy)."""
  arms = results["arms"]
  ref, cp, small = arms["nextitnet"], arms["cprec"], arms["small_nextitnet"]
  ndcg = lambda r: np.array(r["test"]["ndcg@10"]["values"])  # pylint: disable=unnecessary-lambda-assignment
  t = cp["topn_ms"]
  both = results["top20_compared"]["batch_512"]
  return {
      "cprec_4x_fewer_params": ref["params"] >= 4 * cp["params"],
      "cprec_ndcg10_at_least_95pct_every_seed":
          bool(np.all(ndcg(cp) >= 0.95 * ndcg(ref))),
      "cprec_above_small_nextitnet_every_seed":
          bool(np.all(ndcg(cp) > ndcg(small))),
      "early_exit_exact": bool(t.get("exact"))
                          and bool(t["batch_1"].get("exact")),
      "early_exit_faster_than_full_softmax":
          both["cprec_early_exit"] < both["nextitnet_full"],
      "early_exit_faster_than_full_tree": t["early_exit_ms"] < t["full_ms"],
  }


def summary(results: dict[str, Any]) -> str:
  arms = results["arms"]
  ref = arms.get("nextitnet")
  rows = ["| arm | params | compression | test NDCG@10 | vs nextitnet "
          "(per seed) | tokens/s | top-20 ms, full / early exit (batch 512) "
          "|", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for name, arm in arms.items():
    ndcg = arm["test"]["ndcg@10"]
    vs = comp = "n/a"
    if ref:
      comp = f"{ref['params'] / arm['params']:.2f}x"
      ratios = np.array(ndcg["values"]) / np.array(
          ref["test"]["ndcg@10"]["values"])
      vs = f"{100 * ratios.mean():.1f}% ({100 * ratios.min():.1f}-" \
           f"{100 * ratios.max():.1f})"
    t = arm.get("topn_ms", {})
    search = f"{t.get('full_ms', float('nan')):.2f}" + (
        f" / {t['early_exit_ms']:.2f} ({100 * t['bands_skipped_share']:.0f}% "
        "skipped)" if "early_exit_ms" in t else "")
    label = name + (" (" + ", ".join(
        f"{k}={v}" for k, v in arm["selected"].items()) + ")"
                    if arm["selected"] else "")
    rows.append(f"| {label} | {arm['params']:,} | {comp} | "
                f"{ndcg['mean']:.4f} +- {ndcg['std']:.4f} | {vs} | "
                f"{arm.get('tokens_per_s', float('nan')):,.0f} | {search} |")
  rows += ["", f"Choices on validation: {json.dumps(results['choices'])}.",
           f"Paper: {PAPER}."]
  if "targets" in results:
    rows.append(f"Targets: {json.dumps(results['targets'])}.")
  return "\n".join(rows)


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, arm in results["arms"].items():
    ndcg = arm["test"]["ndcg@10"]
    ax.errorbar(arm["params"], ndcg["mean"], yerr=ndcg["std"], fmt="o",
                capsize=3)
    ax.annotate(name, (arm["params"], ndcg["mean"]), fontsize=8,
                xytext=(4, 2), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel(f"test NDCG@10 (mean +- std, {len(results['seeds'])} seeds)")
  ax.set_title("CpRec: accuracy against size")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def band_flags_of(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
  """{section: {field: value}} from the band flags given, as typed."""
  model = {name: value for name, value in (
      ("num_bands", args.num_bands), ("band_dims", args.band_dims))
           if value is not None}
  out = {"model": model} if model else {}
  if args.tail_dims is not None:
    out["head"] = {"tail_dims": args.tail_dims}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--scale", action="store_true",
                      help="GPU size: the ML-20M-shaped catalogue, 32 blocks")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--steps", type=int, help="override the steps")
  parser.add_argument("--data", help="override the data source")
  parser.add_argument("--widths", default=",".join(map(str, WIDTHS)),
                      help="the widths C chosen among on validation")
  parser.add_argument("--embed-dim", type=int,
                      help="fix C instead of choosing it")
  parser.add_argument("--band-share-grid",
                      default=",".join(map(str, BAND_SHARE_GRID)),
                      help="head-band shares chosen among on validation")
  parser.add_argument("--band-shares", type=float,
                      help="fix the head band's share instead")
  parser.add_argument("--num-bands", help="model.num_bands of band arms")
  parser.add_argument("--band-dims",
                      help="model.band_dims of band arms, e.g. 32,16,4")
  parser.add_argument("--tail-dims",
                      help="head.tail_dims of tree-softmax arms, e.g. 4,2")
  parser.add_argument("--arms", default=",".join(ARMS),
                      help="a subset (nextitnet, cprec and small_nextitnet "
                      "are always run: the others are measured against "
                      "them)")
  args = parser.parse_args()
  s = dict(SCALE if args.scale else CPU)
  if args.steps:
    s["steps"], s["eval_every"] = args.steps, min(s["eval_every"],
                                                  args.steps)
  if args.data:
    s["data"] = args.data
  unknown = sorted(set(args.arms.split(",")) - set(ARMS))
  if unknown:
    parser.error(f"--arms: {unknown} not among {list(ARMS)}")
  wanted = [a for a in ARMS if a in args.arms.split(",")
            or a in ("nextitnet", "cprec", "small_nextitnet")]
  seeds = tuple(int(x) for x in args.seeds.split(","))
  flags = band_flags_of(args)
  widths = ([args.embed_dim] if args.embed_dim else
            [int(x) for x in args.widths.split(",")])
  grid = ([args.band_shares] if args.band_shares is not None else
          [float(x) for x in args.band_share_grid.split(",")])
  data = pipeline.load_data(arm_config(s, "nextitnet", 0, widths[0],
                                       grid[0], flags).data)
  mid = grid[0]  # Bands do not touch the uncompressed model.

  # 1. C, on the uncompressed model's validation.
  width_arms = [arm_of(s, data, flags, "nextitnet", c, mid,
                       f"nextitnet_c{c}", {"embed_dim": c}) for c in widths]
  chosen, _, _ = harness.train_and_choose(width_arms, seeds, args.out)
  width = chosen["nextitnet"].knobs["embed_dim"]
  # 2. The band shares, on cprec's validation at that C.
  share_arms = [arm_of(s, data, flags, "cprec", width, x,
                       f"cprec_shares{x}", {"band_shares": x})
                for x in grid]
  chosen, _, _ = harness.train_and_choose(share_arms, seeds, args.out)
  shares = chosen["cprec"].knobs["band_shares"]
  # 3. small_nextitnet's width, from the chosen cprec's size.
  small = matched_width(s, data, flags, param_count(arm_config(
      s, "cprec", 0, width, shares, flags), data))
  arms = width_arms + share_arms + [
      arm_of(s, data, flags, a, small if a == "small_nextitnet" else width,
             shares) for a in wanted if a not in ("nextitnet", "cprec")]
  results = harness.run_experiment("cprec", arms, seeds, args.out, s["data"])
  results["choices"] = {"embed_dim": width, "band_shares": shares,
                        "small_nextitnet_width": small}
  timed(results, data, s["timing_batches"])
  results["targets"] = targets(results)
  results["settings"] = {**s, "widths": widths, "band_share_grid": grid,
                         "band_flags": flags, "paper": PAPER}
  harness.write_json(os.path.join(args.out, "results.json"), results)
  plot(results, os.path.join(args.out, "accuracy_vs_params.png"))
  text = summary(results)
  print(text, flush=True)
  with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
