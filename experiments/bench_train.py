"""Training-step throughput: tokens/s, model TFLOP/s, compile time and
peak device memory for named configs of every backbone. Prints a table last.

Each config runs in its own subprocess so compile time and peak memory are
its own. Model FLOPs are counted as in ../shared/PERF.md: per token, fwd+bwd
= 3x forward; forward = the blocks' matmuls (below) + 2*C*V (full softmax)
or 2*C*(samples+1) (sampled). Per block and token, with width C, length T,
feed-forward width F:

  nextitnet  2 convs * 2*k*C*C
  sasrec     8*C*C (q, k, v, out) + 4*T*C (scores, mixing) + 4*C*F
  ssept      as sasrec (C = item + user width)
  grec       nextitnet's block in the encoder and in the decoder (L each),
             plus the adapter's 2 * 2*C*2C once
  bert4rec   as sasrec, F = 4C, plus the output layer's 2*C*C once
  hstu       8*C*C (u, v, q, k) + 2*C*C (out) + 4*T*C
  gru4rec    3 gates * 2 matmuls * 2*C*C = 12*C*C

(attention counted over all T keys, causal or not, as is usual).

  python experiments/bench_train.py                 # the GPU set
  python experiments/bench_train.py --set cpu       # a small CPU smoke set
  python experiments/bench_train.py --set backbones_cpu   # one step each
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
  model: str = "nextitnet"
  heads: int = 1  # Attention backbones.


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

MODELS = ("nextitnet", "sasrec", "hstu", "gru4rec", "bert4rec", "grec",
          "ssept")
# One step of every backbone at one width: which costs what on this CPU.
# A small catalogue, so that the blocks, not the softmax, set the time.
BACKBONES_CPU_SET = {
    f"{m}_b2_c64_v2k": Bench(2, 64, 2_000, batch=32, length=50,
                             dtype="float32", model=m, heads=2)
    for m in MODELS}
BACKBONES_GPU_SET = {
    f"{m}_b8_c256_v27k": Bench(8, 256, 27_000, model=m, heads=4)
    for m in MODELS}
SETS = {"gpu": GPU_SET, "cpu": CPU_SET, "backbones_cpu": BACKBONES_CPU_SET,
        "backbones_gpu": BACKBONES_GPU_SET}


def block_flops_per_token(b: Bench) -> float:
  c, t = b.channels, b.length
  if b.model == "nextitnet":
    return 2 * 2 * b.kernel * c * c
  if b.model == "grec":  # An encoder block and a decoder block per level.
    return 2 * (2 * 2 * b.kernel * c * c)
  if b.model in ("sasrec", "bert4rec", "ssept"):
    f = 4 * c if b.model == "bert4rec" else c
    return 8 * c * c + 4 * t * c + 4 * c * f
  if b.model == "hstu":
    return 10 * c * c + 4 * t * c
  if b.model == "gru4rec":
    return 12 * c * c
  raise ValueError(f"no FLOP count for {b.model}")


def model_flops_per_token(b: Bench) -> float:
  blocks = b.blocks * block_flops_per_token(b)
  if b.model == "bert4rec":
    blocks += 2 * b.channels * b.channels  # The output layer.
  if b.model == "grec":
    blocks += 2 * 2 * b.channels * 2 * b.channels  # The adapter.
  out = 2 * b.channels * (b.items if b.loss == "full" else b.samples + 1)
  return 3.0 * (blocks + out)


def model_config(b: Bench):
  """The backbone's config at this size, its other fields at defaults."""
  from jaxrec import models  # pylint: disable=import-outside-toplevel
  fields = dict(num_items=b.items, embed_dim=b.channels, num_blocks=b.blocks,
                dtype=b.dtype)
  if b.model in ("nextitnet", "grec"):
    fields["kernel_size"] = b.kernel
  if b.model in ("sasrec", "hstu", "bert4rec", "ssept"):
    fields["num_heads"] = b.heads
  return models.get(b.model).config(**fields).fit_data(
      b.items, b.length).fit_users(BENCH_USERS)


BENCH_USERS = 1_000  # SSE-PT's user table (other backbones have none).


def run_one(name: str, b: Bench, steps: int) -> dict:
  """Builds, checks and times one config in this process."""
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel
  from jaxrec import config, models
  from jaxrec.heads import sampled_softmax
  from jaxrec.training import loop, state as state_lib
  from jaxrec.training.mesh import Sharder, make_mesh

  cfg = config.Config(
      model=model_config(b),
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
  # Every array some backbone reads: GRec's encoder view (the history,
  # the same cost as a gap-filled one), SSE-PT's users.
  batch = sharder.put_batch({
      "inputs": rows[:, :-1], "targets": rows[:, 1:],
      "encoder_ids": rows[:, :-1],
      "users": rng.integers(1, BENCH_USERS, b.batch, dtype=np.int32)})

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
  parser.add_argument("--set", choices=tuple(SETS), default="gpu")
  parser.add_argument("--only", nargs="*", help="config names to run")
  parser.add_argument("--steps", type=int, default=20, help="timed steps")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args()
  table = SETS[args.set]
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
