"""CpRec: each compression alone and together, against the uncompressed model.

  python experiments/cprec.py --out runs/cprec            # CPU (see below)
  python experiments/cprec.py --out runs/cprec --scale    # GPU: ML-20M shape

Arms (all NextItNet, same data, steps and seed):

  nextitnet             uncompressed
  adaptive_input        block-wise adaptive input embedding
  tree_softmax          two-level tree softmax head
  share_cross_layer     one stored block, its two convs shared (ALBERT)
  share_cross_block     position i runs stored block i mod P
  share_adjacent_layer  the two convs of each block share one kernel
  share_adjacent_block  position i runs stored block i // 2
  cprec                 adaptive input + tree softmax + cross-block sharing
  small_nextitnet       uncompressed, width chosen to match cprec's size

Each arm records params (in all and per top-level subtree), full-ranking
valid/test metrics, training time and tokens/s, and the latency of a top-20
query per evaluation batch (full scoring vs the tree softmax's exact early
exit, with the share of (user, band) pairs whose search it skipped).
Writes OUT/results.json, OUT/accuracy_vs_params.png and prints a Markdown
table for RESULTS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

from jaxrec import config as config_lib
from jaxrec import heads
from jaxrec import models
from jaxrec.data import pipeline
from jaxrec.heads import tree_softmax
from jaxrec.tasks import next_item
from jaxrec.training import checkpoints, loop, state

absl_logging.set_verbosity(absl_logging.ERROR)

# 10,000 items with a long tail: embedding and softmax are most of the model.
# C=64, not 32: at C=32 the default band widths C/4^j leave a tail item 2
# numbers, and no allocation of about 4x fewer parameters kept 95% of the
# uncompressed model's NDCG@10 there (RESULTS.md, CpRec band widths). 1,500
# steps: the uncompressed model's validation flattens from about 800 steps
# (seed 0 peaks there), cprec's still rises a little at 1,500. Each
# uncompressed arm takes several minutes on 2 cores; `--steps 300` for a
# quick look.
CPU = dict(data="synthetic:small,users=5000,items=10000,topics=100",
           embed_dim=64, num_blocks=4, max_len=20, batch_size=128,
           steps=1500, eval_every=100, lr=3e-3, patience=0, timing_batches=5)
SCALE = dict(data="synthetic:ml20m", embed_dim=256, num_blocks=32,
             max_len=50, batch_size=256, steps=20000, eval_every=2000,
             lr=1e-3, patience=0, timing_batches=20)
# The bands and sharing every compressed arm uses (RESULTS.md says why).
BANDS = dict(num_bands=3, band_shares=[0.6])
SHARE_PERIOD = 2
ARMS = {
    "nextitnet": {},
    "adaptive_input": {"model": dict(embedding="adaptive", **BANDS)},
    "tree_softmax": {"model": dict(BANDS), "head": {"name": "tree_softmax"}},
    "share_cross_layer": {"methods": {"cprec": {"share": "cross_layer"}}},
    "share_cross_block": {"methods": {"cprec": {"share": "cross_block",
                                                "period": SHARE_PERIOD}}},
    "share_adjacent_layer": {"methods": {"cprec": {
        "share": "adjacent_layer"}}},
    "share_adjacent_block": {"methods": {"cprec": {
        "share": "adjacent_block"}}},
    "cprec": {"model": dict(embedding="adaptive", **BANDS),
              "methods": {"cprec": {"share": "cross_block",
                                    "period": SHARE_PERIOD}},
              "head": {"name": "tree_softmax"}},
    "small_nextitnet": {},  # Width set to match cprec (`matched_width`).
}
TOP_N = 20
# Latency is the fastest of this many passes over the timing batches, full
# and early exit interleaved. Across arms it stays noisy on the 2-core
# machine (the same flat-softmax program took 9-22 ms per batch in
# different arms), so compare full and early exit within an arm.
TIMING_PASSES = 5
SHOWN = ("ndcg@10", "hr@10", "mrr@5")
LAST_HIDDEN = jax.jit(next_item.last_hidden, static_argnums=1)


def base_config(s: dict[str, Any], seed: int) -> dict[str, Any]:
  """The raw config every arm starts from; `s["bands"]` (from the band
  flags) is kept beside it for the arms built on bands."""
  return {
      "bands": s.get("bands", {}),
      "model": {"embed_dim": s["embed_dim"], "num_blocks": s["num_blocks"],
                "dropout": s.get("dropout", 0.2)},
      "data": {"source": s["data"], "max_len": s["max_len"],
               "min_user_count": 1, "min_item_count": 1},
      "train": {"batch_size": s["batch_size"], "steps": s["steps"],
                "eval_every": s["eval_every"], "learning_rate": s["lr"],
                "patience": s.get("patience", 0), "seed": seed,
                # The loop's default until 2026-12-07, as in the records.
                "select_metric": "mrr@5"}}


def arm_config(base: dict[str, Any], arm: str,
               width: int | None = None) -> config_lib.Config:
  raw = json.loads(json.dumps(base))
  overrides = raw.pop("bands")
  for section, values in ARMS[arm].items():
    raw.setdefault(section, {}).update(values)
  if "num_bands" in raw["model"]:  # An arm built on bands.
    raw["model"].update(overrides.get("model", {}))
    if raw.get("head", {}).get("name") == "tree_softmax":
      raw["head"].update(overrides.get("head", {}))
  if width is not None:
    raw["model"]["embed_dim"] = width
  return config_lib.from_dict(raw, f"arm {arm}").validate()


def fitted(cfg: config_lib.Config, data) -> config_lib.Config:
  return cfg.fit_data(data.num_items, data.max_len, data.item_counts)


def param_count(cfg: config_lib.Config) -> int:
  return models.count_params(models.abstract_params(cfg))


def matched_width(base: dict[str, Any], data, target: int) -> int:
  """The width whose uncompressed model is closest to `target` params."""
  sizes = {c: param_count(fitted(arm_config(base, "small_nextitnet", c),
                                 data)) for c in range(4, 257, 4)}
  return min(sizes, key=lambda c: abs(sizes[c] - target))


def by_subtree(params: Any) -> dict[str, int]:
  return {name: models.count_params(sub) for name, sub in params.items()}


def top20_calls(params, cfg) -> dict[str, Any]:
  """An arm's top-20 queries, as functions of the last hidden states h:
  `full` (every item scored) and, for the tree head, `early_exit`. The
  backbone runs outside, so only the head's search is timed."""
  if cfg.head.name == "tree_softmax":
    calls = {"full": lambda h: tree_softmax.top_n(params, cfg, h, TOP_N,
                                                  early_exit=False),
             "early_exit": lambda h: tree_softmax.top_n(params, cfg, h,
                                                        TOP_N)}
  else:
    head, v = heads.get(cfg.head.name), cfg.model.num_items
    full = jax.jit(lambda p, h: jax.lax.top_k(head.tile_scores(
        p, cfg, h, jnp.array(0), v).at[:, 0].set(-jnp.inf), TOP_N))
    calls = {"full": lambda h: full(params, h)}
  return calls


def interleaved_ms(calls: dict[str, Any], inputs: np.ndarray, size: int,
                   count: int) -> tuple[dict[str, float], dict[str, list]]:
  """ms per query batch of each (params, cfg, fn) in `calls`, over `count`
  batches of `size` test users: the fastest of TIMING_PASSES passes, the
  calls' passes interleaved so a slow spell of the shared machine hits
  them alike. Also each call's outputs."""
  size = min(size, len(inputs))
  count = max(1, min(count, len(inputs) // size))
  batches = [inputs[i * size:(i + 1) * size] for i in range(count)]
  hs, outs, by_model = {}, {}, {}
  for name, (params, cfg, fn) in calls.items():
    if id(params) not in by_model:  # Calls on one model share its states.
      by_model[id(params)] = [LAST_HIDDEN(params, cfg, x) for x in batches]
    hs[name] = by_model[id(params)]
    # Compile every program the batches need (the early exit has one per
    # set of row buckets), as a server would before taking queries.
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


def topn_latency(params, cfg, data, batch_size: int,
                 batches: int) -> dict[str, Any]:
  """ms per top-20 query batch: full scoring vs the tree head's early exit,
  at `batch_size` and at batch 1 (one user per query, as served), with the
  share of (user, tail band) pairs the exit did not search, and whether
  its ids and scores equal the full computation's."""
  calls = {name: (params, cfg, fn)
           for name, fn in top20_calls(params, cfg).items()}

  def measure(size: int, count: int) -> dict[str, Any]:
    ms, outs = interleaved_ms(calls, data.test_inputs, size, count)
    out = {"batch": min(size, len(data.test_inputs)),
           "batches": len(outs["full"]), "passes": TIMING_PASSES,
           "full_ms": ms["full"]}
    if "early_exit" in ms:
      out["early_exit_ms"] = ms["early_exit"]
      scored = np.concatenate([o[2] for o in outs["early_exit"]])
      out["bands_skipped_share"] = float(1.0 - scored.mean())
      out["skipped_share_by_band"] = [float(x) for x in 1 - scored.mean(0)]
      out["exact"] = all(
          all(bool((np.asarray(a) == np.asarray(b)).all())
              for a, b in zip(f[:2], e[:2]))
          for f, e in zip(outs["full"], outs["early_exit"]))
    return out

  out = measure(batch_size, batches)
  out["batch_1"] = measure(1, 50 * batches)
  return out


def compare_top20(out_dir: str, data, s: dict[str, Any]) -> dict[str, Any]:
  """nextitnet's full top-20 against cprec's full and early-exit ones,
  interleaved in one process (latency across arms timed apart is too
  noisy here to compare), at batch 512 and at batch 1."""
  calls = {}
  for arm in ("nextitnet", "cprec"):
    params, cfg, _ = state.load_params(os.path.join(out_dir, "runs", arm),
                                       "best")
    for name, fn in top20_calls(params, cfg).items():
      calls[f"{arm}_{name}"] = (params, cfg, fn)
  out = {}
  for key, size, count in (("batch_512", 512, s["timing_batches"]),
                           ("batch_1", 1, 50 * s["timing_batches"])):
    out[key] = interleaved_ms(calls, data.test_inputs, size, count)[0]
  return out


def run_arm(arm: str, cfg: config_lib.Config, data, out_dir: str,
            s: dict[str, Any], resume: bool = False) -> dict[str, Any]:
  # A resumed experiment continues an arm killed mid-training exactly from
  # its latest checkpoint (the loop's resume); a fresh one starts it anew.
  resume = resume and os.path.exists(os.path.join(out_dir, "config.json"))
  result = loop.train(cfg, out_dir, data, progress_bar=False, resume=resume)
  params, run_cfg, _ = state.load_params(out_dir, "best")
  real_per_row = float(np.mean(np.count_nonzero(data.train[:, 1:], axis=1)))
  tokens = result["steps"] * cfg.train.batch_size * real_per_row
  return {
      "params": models.count_params(params),
      "params_by_subtree": by_subtree(params),
      "valid": result["valid"], "test": result["test"],
      "train_time_s": result["train_time_s"],
      "tokens_per_s": tokens / max(result["train_time_s"], 1e-9),
      "topn_ms": topn_latency(params, run_cfg, data, 512,
                              s["timing_batches"]),
      "model": config_lib.section_to_dict(run_cfg.model),
      "head": config_lib.section_to_dict(run_cfg.head),
  }


def retime(out_dir: str, results: dict[str, Any], data,
           s: dict[str, Any], steps: int = 150) -> None:
  """Re-measures every arm's speed on the trained runs: top-20 latency on
  its best checkpoint, and steady training throughput from a fresh
  `steps`-step run (the mean of its last two 50-step windows: the first
  holds compilation). For timings on a quiet machine after an accuracy run
  that shared it."""
  for arm, r in results["arms"].items():
    params, cfg, _ = state.load_params(os.path.join(out_dir, "runs", arm),
                                       "best")
    r["topn_ms"] = topn_latency(params, cfg, data, 512, s["timing_batches"])
    short = cfg.replace(train=dataclasses.replace(
        cfg.train, steps=steps, eval_every=steps, patience=0))
    with tempfile.TemporaryDirectory() as tmp:
      loop.train(short, tmp, data, progress_bar=False)
      with open(os.path.join(tmp, "metrics.jsonl"), encoding="utf-8") as f:
        rates = [json.loads(line).get("tokens_per_s") for line in f]
    r["tokens_per_s"] = float(np.mean([x for x in rates if x][-2:]))
    print(f"[cprec] retimed {arm}: {r['tokens_per_s']:,.0f} tokens/s",
          flush=True)
  results["retimed"] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                        "throughput_steps": steps}


def plot(results: dict[str, Any], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for arm, r in results["arms"].items():
    ax.scatter(r["params"], r["test"]["ndcg@10"])
    ax.annotate(arm, (r["params"], r["test"]["ndcg@10"]), fontsize=8,
                xytext=(4, 2), textcoords="offset points")
  ax.set_xscale("log")
  ax.set_xlabel("parameters")
  ax.set_ylabel("test NDCG@10 (full ranking)")
  ax.set_title("CpRec: accuracy against size")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def topn_cell(t: dict[str, Any]) -> str:
  """'full ms / early-exit ms (bands skipped, exact)' for one batch size."""
  cell = f"{t['full_ms']:.2f}"
  if "early_exit_ms" in t:
    cell += (f" / {t['early_exit_ms']:.2f} "
             f"({100 * t['bands_skipped_share']:.0f}% skipped, "
             f"exact: {t['exact']})")
  return cell


def table(results: dict[str, Any]) -> str:
  arms = results["arms"]
  ref = arms.get("nextitnet")  # Absent from a run of other arms only.
  lines = ["| arm | params | compression | " + " | ".join(
      f"test {m}" for m in SHOWN) + " | NDCG@10 vs nextitnet | train s | "
           "tokens/s | top-20 ms per query, full / early exit: batch 512 ; "
           "batch 1 |",
           "|---" * (8 + len(SHOWN)) + "|"]
  for arm in sorted(arms, key=lambda a: list(ARMS).index(a)):
    r = arms[arm]
    topn = " ; ".join(topn_cell(t) for t in (r["topn_ms"],
                                              r["topn_ms"]["batch_1"]))
    compression = ratio = "n/a"
    if ref:
      compression = f"{ref['params'] / r['params']:.2f}x"
      ratio = f"{100 * r['test']['ndcg@10'] / ref['test']['ndcg@10']:.1f}%"
    lines.append(
        f"| {arm} | {r['params']:,} | {compression} | "
        + " | ".join(f"{r['test'][m]:.4f}" for m in SHOWN)
        + f" | {ratio} | {r['train_time_s']:.0f} | "
        f"{r['tokens_per_s']:,.0f} | {topn} |")
  return "\n".join(lines)


def targets(results: dict[str, Any]) -> dict[str, bool]:
  """The issue's CPU targets, checked on the recorded numbers."""
  arms = results["arms"]
  ref, cp, small = arms["nextitnet"], arms["cprec"], arms["small_nextitnet"]
  ndcg = lambda r: r["test"]["ndcg@10"]
  t = cp["topn_ms"]
  # Interleaved in one process when the runs were at hand, else per arm.
  both = results.get("top20_compared", {}).get("batch_512", {
      "nextitnet_full": ref["topn_ms"]["full_ms"],
      "cprec_early_exit": t.get("early_exit_ms", 1e9)})
  return {
      "cprec_4x_fewer_params": ref["params"] >= 4 * cp["params"],
      "cprec_ndcg10_at_least_95pct": ndcg(cp) >= 0.95 * ndcg(ref),
      "cprec_above_small_nextitnet": ndcg(cp) > ndcg(small),
      "early_exit_exact": bool(t.get("exact"))
                          and bool(t["batch_1"].get("exact")),
      # Batch 512. Against full scoring of every item by the uncompressed
      # model, and against the tree's own full computation.
      "early_exit_faster_than_full_softmax":
          both["cprec_early_exit"] < both["nextitnet_full"],
      "early_exit_faster_than_full_tree": t.get("early_exit_ms", 1e9)
                                          < t["full_ms"],
  }


def band_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
  """{section: {field: value}} from the band flags given, as the strings
  typed: `config.from_dict` reads them like any config value."""
  model = {name: value for name, value in (
      ("band_shares", args.band_shares), ("num_bands", args.num_bands),
      ("band_dims", args.band_dims)) if value is not None}
  out = {"model": model} if model else {}
  if args.tail_dims is not None:
    out["head"] = {"tail_dims": args.tail_dims}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--scale", action="store_true",
                      help="GPU size: the ML-20M-shaped catalogue, C=256, "
                      "32 blocks")
  parser.add_argument("--steps", type=int, help="override the steps")
  parser.add_argument("--patience", type=int,
                      help="stop an arm after this many validations without "
                      "gain (default 0: every arm runs all its steps); with a "
                      "large --steps, each arm trains to its own plateau")
  parser.add_argument("--data", help="override the data source")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--embed-dim", type=int, help="override C (every arm)")
  parser.add_argument("--dropout", type=float,
                      help="override the dropout (every arm; default 0.2)")
  parser.add_argument("--band-shares",
                      help="arms with bands: model.band_shares, e.g. 0.6")
  parser.add_argument("--num-bands",
                      help="arms with bands: model.num_bands")
  parser.add_argument("--band-dims",
                      help="arms with bands: model.band_dims, e.g. 32,16,4")
  parser.add_argument("--tail-dims",
                      help="tree-softmax arms: head.tail_dims, e.g. 4,2")
  parser.add_argument("--retime", action="store_true",
                      help="re-measure speed (top-20 latency, training "
                      "tokens/s) of the runs already in OUT, keeping their "
                      "accuracy: for a quiet machine")
  parser.add_argument("--resume", action="store_true",
                      help="continue a killed run in OUT: arms already in "
                      "its results.json are kept (its settings must match), "
                      "an arm killed mid-training resumes from its latest "
                      "checkpoint")
  parser.add_argument("--arms", default=",".join(ARMS),
                      help="comma-separated subset (cprec and nextitnet are "
                      "needed for small_nextitnet and the targets)")
  args = parser.parse_args()
  results_path = os.path.join(args.out, "results.json")
  if args.retime:  # The recorded settings, whatever the flags say.
    with open(results_path, encoding="utf-8") as f:
      results = json.load(f)
    s = results["settings"]
  else:
    s = dict(SCALE if args.scale else CPU)
    if args.steps:
      s["steps"] = args.steps
      s["eval_every"] = max(1, min(s["eval_every"], args.steps))
    if args.patience is not None:
      s["patience"] = args.patience
    if args.data:
      s["data"] = args.data
    if args.embed_dim is not None:
      s["embed_dim"] = args.embed_dim
    if args.dropout is not None:
      s["dropout"] = args.dropout
    s["bands"] = band_overrides(args)
  os.makedirs(args.out, exist_ok=True)
  base = base_config(s, args.seed)
  data = pipeline.load_data(arm_config(base, "nextitnet").data)
  chosen = [a.strip() for a in args.arms.split(",") if a.strip()]
  if args.retime:
    retime(args.out, results, data, s)
    chosen = []
  elif args.resume and os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as f:
      results = json.load(f)
    if results["settings"] != json.loads(json.dumps(s)) or (
        results["seed"] != args.seed):
      raise SystemExit(f"--resume: {results_path} was run with other "
                       "settings; use a new --out")
    done = [a for a in chosen if a in results["arms"]]
    print(f"[cprec] resuming: {', '.join(done) or 'no arm'} done", flush=True)
    chosen = [a for a in chosen if a not in results["arms"]]
  else:
    results = {"settings": s, "seed": args.seed,
               "date": time.strftime("%Y-%m-%d"),
               "device": jax.devices()[0].device_kind,
               "platform": platform.platform(), "jax": jax.__version__,
               "data": data.meta, "arms": {}}
  for arm in chosen:
    width = None
    if arm == "small_nextitnet":
      width = matched_width(base, data, param_count(fitted(
          arm_config(base, "cprec"), data)))
    cfg = arm_config(base, arm, width)
    print(f"[cprec] {arm}: {param_count(fitted(cfg, data)):,} params",
          flush=True)
    results["arms"][arm] = run_arm(arm, cfg, data,
                                   os.path.join(args.out, "runs", arm), s,
                                   resume=args.resume)
    checkpoints.write_json(results_path, results)
  if {"nextitnet", "cprec"} <= set(results["arms"]):
    results["top20_compared"] = compare_top20(args.out, data, s)
  if {"nextitnet", "cprec", "small_nextitnet"} <= set(results["arms"]):
    results["targets"] = targets(results)
  checkpoints.write_json(results_path, results)
  plot(results, os.path.join(args.out, "accuracy_vs_params.png"))
  print(table(results))
  if "targets" in results:
    print(json.dumps(results["targets"], indent=1))
  if "top20_compared" in results:
    print("top-20 ms per query batch, interleaved:",
          json.dumps(results["top20_compared"], indent=1))


if __name__ == "__main__":
  main()
