"""The tree softmax's top-20 search three ways, on a trained run: full
(every band's logits and `top_k` for every user), early exit (every band's
logits, `top_k` only where a band can reach the user's top 20) and logit
skipping (a band's logits only for the users its cluster bound cannot rule
out; `jaxrec.heads.tree_softmax.search_index`).

  python experiments/cprec.py --out results/cprec_c64     # trains the run
  python experiments/bench_tree_search.py --run results/cprec_c64/runs/cprec \\
      --out results/bench_tree_search

For batch 512 and batch 1 (test users of the run's own data): ms per
query batch (the fastest of interleaved passes, as `experiments/cprec.py`
times), the share of (user, tail band) pairs whose logits each search
computed, the head's multiply-adds per user that follow from it, and
whether its items equal the full search's. The index is built once
(its seconds are recorded), as a server would before taking queries.
Writes OUT/results.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
from absl import logging as absl_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cprec  # pylint: disable=wrong-import-position
import harness  # pylint: disable=wrong-import-position
from jaxrec.data import pipeline  # pylint: disable=wrong-import-position
from jaxrec.heads import tree_softmax  # pylint: disable=wrong-import-position
from jaxrec.training.state import load_params  # pylint: disable=wrong-import-position

absl_logging.set_verbosity(absl_logging.ERROR)
SEARCHES = ("full", "early_exit", "logit_skip")


def head_macs(lay: tree_softmax.Layout, clusters: list[int],
              computed: np.ndarray | None) -> float:
  """Multiply-adds per user of the head's products: the head cluster's,
  each band's projection, and its [d_j, k_j] product where computed (a
  share per band; None: every band), plus the bound's [d_j, M_j] product
  when clusters are given."""
  width = lay.dims[0]
  total = width * (lay.sizes[0] + lay.num_tail)
  for j in range(1, lay.num_tail + 1):
    share = 1.0 if computed is None else float(computed[j - 1])
    total += width * lay.dims[j] + share * lay.dims[j] * lay.sizes[j]
    if clusters:
      total += lay.dims[j] * clusters[j - 1]
  return float(total)


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--run", required=True,
                      help="a run directory whose head is tree_softmax")
  parser.add_argument("--out", required=True)
  parser.add_argument("--clusters", type=int, default=256,
                      help="clusters per tail band of the search index")
  parser.add_argument("--batches", type=int, default=5,
                      help="timing batches at batch 512 (50x at batch 1)")
  args = parser.parse_args()
  params, cfg, _ = load_params(args.run)
  if cfg.head.name != "tree_softmax":
    raise SystemExit(f"--run {args.run}: its head is {cfg.head.name!r}, "
                     "not tree_softmax")
  data = pipeline.load_data(cfg.data)
  lay = tree_softmax.layout(cfg.model, cfg.head)
  start = time.perf_counter()
  index = tree_softmax.search_index(params, cfg, clusters=args.clusters)
  index_s = time.perf_counter() - start
  n = cprec.TOP_N
  calls = {
      "full": (params, cfg, lambda h: tree_softmax.top_n(
          params, cfg, h, n, early_exit=False)),
      "early_exit": (params, cfg, lambda h: tree_softmax.top_n(
          params, cfg, h, n)),
      "logit_skip": (params, cfg, lambda h: tree_softmax.top_n(
          params, cfg, h, n, index=index))}
  clusters = [int(i.centroids.shape[0]) for i in index]
  out: dict[str, Any] = {
      "run": args.run, "data": cfg.data.source, "top_n": n,
      "band_sizes": list(lay.sizes), "band_dims": list(lay.dims),
      "clusters": clusters, "index_s": index_s,
      "date": time.strftime("%Y-%m-%d %H:%M"), **harness._platform()}  # pylint: disable=protected-access
  for size, count in ((512, args.batches), (1, 50 * args.batches)):
    ms, outs = cprec.interleaved_ms(calls, data.test_inputs, size, count)
    row: dict[str, Any] = {"batch": size, "ms": ms}
    searched = {name: np.concatenate([o[2] for o in outs[name]]).mean(0)
                for name in SEARCHES}
    for name in SEARCHES:
      # Full and early exit compute every band's logits; logit skipping
      # runs top_k where the early exit does (the same exact test).
      logits = (searched[name] if name == "logit_skip"
                else np.ones(lay.num_tail))
      top_k = searched["full" if name == "full" else "early_exit"]
      row[name] = {
          "logits_share_by_band": [float(x) for x in logits],
          "top_k_share_by_band": [float(x) for x in top_k],
          "head_macs_per_user": head_macs(
              lay, clusters if name == "logit_skip" else [],
              logits if name == "logit_skip" else None),
          "same_items_as_full": all(
              bool((np.asarray(f[1]) == np.asarray(o[1])).all())
              for f, o in zip(outs["full"], outs[name]))}
    out[f"batch_{size}"] = row
  os.makedirs(args.out, exist_ok=True)
  harness.write_json(os.path.join(args.out, "results.json"), out)
  print(table(out))


def table(out: dict[str, Any]) -> str:
  rows = ["| search | batch 512 ms | batch 1 ms | logits computed, per "
          "tail band | top_k run, per tail band | head MACs per user | "
          "same items as full |", "| --- | ---: | ---: | --- | --- | ---: "
          "| --- |"]
  big, one = out["batch_512"], out["batch_1"]
  for name in SEARCHES:
    r = big[name]
    rows.append(
        f"| {name} | {big['ms'][name]:.2f} | {one['ms'][name]:.3f} | "
        + ", ".join(f"{x:.0%}" for x in r["logits_share_by_band"]) + " | "
        + ", ".join(f"{x:.0%}" for x in r["top_k_share_by_band"]) + " | "
        f"{r['head_macs_per_user']:,.0f} | "
        f"{r['same_items_as_full'] and one[name]['same_items_as_full']} |")
  return "\n".join(rows)


if __name__ == "__main__":
  main()
