"""Training-step throughput of NextItNet: tokens/s, model TFLOP/s, compile
time and peak device memory for named configs. Prints a table last.

Each config runs in its own subprocess so compile time and peak memory are
its own. Model FLOPs are counted as in ../shared/PERF.md: per token, fwd+bwd
= 3x forward; forward = blocks * 2 convs * 2*k*C*C + 2*C*V (full softmax) or
2*C*(samples+1) (sampled).

  python experiments/bench_train.py                 # the GPU set
  python experiments/bench_train.py --set cpu       # a small CPU smoke set
  python experiments/bench_train.py --only b32_c256_v27k_full
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Bench:
  blocks: int
  channels: int
  items: int
  loss: str = "full"
  samples: int = 0
  batch: int = 256
  length: int = 100
  dtype: str = "bfloat16"
  kernel: int = 3


GPU_SET = {
    "b8_c64_v27k_full": Bench(8, 64, 27_000),
    "b32_c64_v27k_full": Bench(32, 64, 27_000),
    "b8_c256_v27k_full": Bench(8, 256, 27_000),
    "b32_c256_v27k_full": Bench(32, 256, 27_000),  # The target.
    "b128_c256_v27k_full": Bench(128, 256, 27_000),
    "b32_c256_v27k_sampled": Bench(32, 256, 27_000, "sampled", 2000),
    "b32_c256_v1m_full": Bench(32, 256, 1_000_000),
    "b32_c256_v1m_sampled": Bench(32, 256, 1_000_000, "sampled", 8192),
}
CPU_SET = {
    "b8_c64_v27k_full": Bench(8, 64, 27_000, batch=32, length=50,
                              dtype="float32"),
    "b32_c64_v27k_full": Bench(32, 64, 27_000, batch=32, length=50,
                               dtype="float32"),
    "b8_c64_v27k_sampled": Bench(8, 64, 27_000, "sampled", 1000, batch=32,
                                 length=50, dtype="float32"),
    "b8_c64_v1m_full": Bench(8, 64, 1_000_000, batch=16, length=50,
                             dtype="float32"),
}


def model_flops_per_token(b: Bench) -> float:
  conv = b.blocks * 2 * 2 * b.kernel * b.channels * b.channels
  out = 2 * b.channels * (b.items if b.loss == "full" else b.samples + 1)
  return 3.0 * (conv + out)


def run_one(name: str, b: Bench, steps: int) -> dict:
  """Builds, checks and times one config in this process."""
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel
  from jaxrec import config, models
  from jaxrec.heads import sampled_softmax
  from jaxrec.models.nextitnet import NextItNetConfig
  from jaxrec.training import loop, state as state_lib
  from jaxrec.training.mesh import Sharder, make_mesh

  cfg = config.Config(
      model=NextItNetConfig(num_items=b.items, embed_dim=b.channels,
                            num_blocks=b.blocks, kernel_size=b.kernel,
                            dtype=b.dtype),
      train=config.TrainConfig(batch_size=b.batch, loss=b.loss,
                               num_samples=max(b.samples, 1),
                               sampler="log_uniform"))
  params = models.init_params(cfg, jax.random.key(0))
  opt, labels = state_lib.optimizer_for(cfg, params)
  sharder = Sharder(make_mesh())
  sampler = (sampled_softmax.make_sampler("log_uniform", b.items)
             if b.loss == "sampled" else None)
  step = jax.jit(loop.make_train_step(cfg, opt, labels, sampler),
                 in_shardings=(sharder.replicated, sharder.batch),
                 out_shardings=(sharder.replicated, sharder.replicated),
                 donate_argnums=0)
  state = sharder.replicate(state_lib.init_state(params, opt))
  rng = np.random.default_rng(0)
  rows = rng.integers(1, b.items, size=(b.batch, b.length + 1), dtype=np.int32)
  batch = sharder.put_batch({"inputs": rows[:, :-1], "targets": rows[:, 1:]})

  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, out = compiled(state, batch)  # Warm-up; also checks the loss.
  loss0 = float(out["loss"])
  assert np.isfinite(loss0), f"{name}: loss {loss0}"
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, out = compiled(state, batch)
    out["loss"].block_until_ready()
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  tokens = b.batch * b.length
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return {
      "name": name, "step_ms": step_s * 1e3, "tokens_per_s": tokens / step_s,
      "tflops": model_flops_per_token(b) * tokens / step_s / 1e12,
      "compile_s": compile_s,
      "peak_gib": None if peak is None else peak / 2**30,
      "loss": loss0, "config": dataclasses.asdict(b),
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "date": time.strftime("%Y-%m-%d"),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--set", choices=("gpu", "cpu"), default="gpu")
  parser.add_argument("--only", nargs="*", help="config names to run")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args()
  table = GPU_SET if args.set == "gpu" else CPU_SET
  if args.one:
    print("RESULT " + json.dumps(run_one(args.one, table[args.one],
                                         args.steps)))
    return
  rows = []
  for name in args.only or list(table):
    proc = subprocess.run(
        [sys.executable, __file__, "--set", args.set, "--one", name,
         "--steps", str(args.steps)], capture_output=True, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    result = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not result:
      tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
      rows.append({"name": name, "error": tail[:120]})
      print(f"{name}: FAILED {tail[:200]}", flush=True)
      continue
    rows.append(json.loads(result[0][len("RESULT "):]))
    print(f"{name}: done", flush=True)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=2)
  import jax  # pylint: disable=import-outside-toplevel
  print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"{time.strftime('%Y-%m-%d')}")
  print(f"{'config':<24}{'step ms':>9}{'tokens/s':>12}{'TFLOP/s':>9}"
        f"{'compile s':>11}{'peak GiB':>10}")
  for r in rows:
    if "error" in r:
      print(f"{r['name']:<24} FAILED: {r['error']}")
      continue
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
    print(f"{r['name']:<24}{r['step_ms']:>9.1f}{r['tokens_per_s']:>12,.0f}"
          f"{r['tflops']:>9.2f}{r['compile_s']:>11.1f}{peak:>10}")


if __name__ == "__main__":
  main()
