"""Loading at the papers' scale: a ratings.csv of MovieLens-20M's shape.

Writes (once, into --dir) a 20,000,263-row `userId,movieId,rating,timestamp`
file with ML-20M's id ranges, then times each way of reading it in its own
process, interleaved over --repeats rounds, and records wall seconds and
the process's peak resident memory:

  pyarrow_csv   pyarrow.csv.read_csv of the whole file (the floor)
  numpy_loadtxt numpy's loadtxt of the three columns (jaxrec's reader
                until 2026-12-07), plus its delimiter count
  read_table    jaxrec.data.text_table.read_table (parse to id and time
                columns)
  load_data     jaxrec.data.pipeline.load_data on csv:PATH with a fresh
                cache: parse, k-core, ids, split, padded rows, cache write

  python experiments/bench_load.py --json results/bench_load/results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ARMS = ("pyarrow_csv", "numpy_loadtxt", "read_table", "load_data")
ML20M = {"rows": 20_000_263, "users": 138_493, "items": 131_262,
         "t0": 789_652_009, "t1": 1_427_784_002}


def write_ratings(path: str, rows: int, seed: int = 0) -> None:
  """Users in order, each with a run of rows; items Zipf-like; times rise
  within a user. Written through pyarrow (a minute of numpy savetxt)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  from pyarrow import csv  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  # ML-20M's users, fewer for a smaller file (each has at least 20 rows).
  num_users = max(1, ML20M["users"] * rows // ML20M["rows"])
  per_user = rng.multinomial(rows - 20 * num_users,
                             np.full(num_users, 1 / num_users)) + 20
  users = np.repeat(np.arange(1, num_users + 1), per_user)
  items = np.minimum(rng.zipf(1.3, rows), ML20M["items"]).astype(np.int64)
  ratings = rng.integers(1, 11, rows) / 2
  times = np.sort(rng.integers(ML20M["t0"], ML20M["t1"], rows))
  rng.shuffle(times)  # Then sorted per user below, as MovieLens is not.
  table = pa.table({"userId": users, "movieId": items, "rating": ratings,
                    "timestamp": times})
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(b"userId,movieId,rating,timestamp\n")  # Unquoted, as GroupLens.
    csv.write_csv(table, f, csv.WriteOptions(include_header=False,
                                             quoting_style="none"))
  os.replace(tmp, path)


def run_arm(arm: str, path: str) -> dict:
  """One arm in this process, imports done before the clock starts."""
  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from pyarrow import csv
  from jaxrec.config import DataConfig
  from jaxrec.data import pipeline, text_table
  start = time.perf_counter()
  if arm == "pyarrow_csv":
    rows = csv.read_csv(path).num_rows
  elif arm == "numpy_loadtxt":
    dtype = [("u", np.int64), ("i", np.int64), ("t", np.float64)]
    table = np.loadtxt(path, dtype=dtype, delimiter=",", usecols=(0, 1, 3),
                       skiprows=1, comments=None, ndmin=1)
    commas = 0
    with open(path, "rb") as f:
      while chunk := f.read(1 << 24):
        commas += chunk.count(b",")
    rows = len(table)
    assert commas == (rows + 1) * 3
  elif arm == "read_table":
    fmt = text_table.movielens_format("ratings.csv")
    rows = len(text_table.read_table(lambda: open(path, "rb"), path,
                                     fmt).users)
  else:
    with tempfile.TemporaryDirectory() as cache:
      data = pipeline.load_data(DataConfig(source=f"csv:{path}",
                                           user_col="userId",
                                           item_col="movieId",
                                           cache_dir=cache))
      rows = data.meta["num_interactions"]
  return {"seconds": time.perf_counter() - start, "rows": int(rows),
          "peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      / 2**20}


def measure(arm: str, path: str) -> dict:
  """The arm in a child process: its wall time and peak resident memory
  (the child's own, including the interpreter and imports)."""
  out = subprocess.run([sys.executable, __file__, "--arm", arm, "--file",
                        path], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(),
                                                    "jaxrec-bench-load"))
  parser.add_argument("--rows", type=int, default=ML20M["rows"])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
  parser.add_argument("--file", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.arm:
    print(json.dumps(run_arm(args.arm, args.file)))
    return
  os.makedirs(args.dir, exist_ok=True)
  path = os.path.join(args.dir, f"ratings-{args.rows}.csv")
  if not os.path.exists(path):
    print(f"writing {path} ...", flush=True)
    write_ratings(path, args.rows)
  runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
  for round_ in range(args.repeats):
    for arm in ARMS:
      r = measure(arm, path)
      runs[arm].append(r)
      print(f"round {round_} {arm}: {r['seconds']:.2f} s", flush=True)
  results = {"date": time.strftime("%Y-%m-%d %H:%M"),
             "platform": platform.platform(), "cpus": os.cpu_count(),
             "python": platform.python_version(), "rows": args.rows,
             "file_bytes": os.path.getsize(path), "arms": {}}
  for arm, rs in runs.items():
    secs = [r["seconds"] for r in rs]
    results["arms"][arm] = {"seconds": secs,
                            "median_s": statistics.median(secs),
                            "peak_gib": max(r["peak_gib"] for r in rs),
                            "rows": rs[0]["rows"]}
  print(f"{'arm':15s} {'median s':>9s} {'min':>6s} {'max':>6s} "
        f"{'peak GiB':>9s}")
  for arm, r in results["arms"].items():
    print(f"{arm:15s} {r['median_s']:9.2f} {min(r['seconds']):6.2f} "
          f"{max(r['seconds']):6.2f} {r['peak_gib']:9.2f}")
  if args.json:
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
