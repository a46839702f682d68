"""Scale-out benchmark: per-device memory of a training step vs `--mesh`.

Three parts, on 8 fake XLA CPU devices (set before jax starts):

1. memory: for catalogues of 1M and 10M items and model = 1, 2, 4, 8
   (data = 8 / model), XLA's compiled memory analysis of the jitted train
   step (params + Adam state + batch in, the new state out (donated),
   temporaries) from abstract ShapeDtypeStruct inputs carrying their
   shardings: nothing is allocated or run. `table_bytes_per_device` is the
   item tables' (embedding, softmax kernel and bias) and their Adam
   moments' bytes on one device, from their shard shapes.
2. step time: a small catalogue, a few measured steps per mesh.
3. a few real training steps on a 10M-item synthetic catalogue with the
   tables split over model=8 (a smaller width, so it fits a CPU host).

  python experiments/bench_scale.py --json results/bench/scale.json

This is a benchmark, not a test: fake devices share the host's cores, so
its times say nothing about real accelerators; its memory figures are
XLA's own accounting of the per-device program.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=wrong-import-position
import argparse
import json
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from jaxrec import config, models, sharding  # noqa: E402
from jaxrec.models.nextitnet import NextItNetConfig  # noqa: E402
from jaxrec.training import loop, state as state_lib  # noqa: E402
from jaxrec.training.mesh import Sharder, make_mesh  # noqa: E402


def make_cfg(items: int, embed_dim: int, blocks: int, batch: int,
             length: int, mesh: str) -> config.Config:
  return config.Config(
      model=NextItNetConfig(num_items=items, embed_dim=embed_dim,
                            num_blocks=blocks),
      data=config.DataConfig(max_len=length),
      train=config.TrainConfig(batch_size=batch, loss="full", mesh=mesh))


def setup(cfg: config.Config):
  """(sharder, jitted step, abstract state, state shardings, optimizer)."""
  sharder = Sharder(make_mesh(None, cfg.train.mesh))
  params = models.abstract_params(cfg)
  opt, labels = state_lib.optimizer_for(cfg, params)
  state = jax.eval_shape(lambda p: state_lib.init_state(p, opt), params)
  shardings = sharder.shardings(state)
  step = sharder.jit(loop.make_train_step(cfg, opt, labels),
                     in_shardings=(shardings, sharder.batch),
                     out_shardings=(shardings, sharder.replicated),
                     donate_argnums=0)
  return sharder, step, state, shardings, opt


def table_bytes(state: Any, shardings: Any) -> int:
  """Bytes on one device of the row-split leaves (tables, their moments)."""
  total = 0
  for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(state),
                              jax.tree.leaves(shardings)):
    name = sharding.path_name(path)
    if sharding.spec_for(name, len(leaf.shape)) == jax.sharding.PartitionSpec():
      continue
    shard = sh.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
  return total


def memory_case(items: int, model: int, args: argparse.Namespace
                ) -> dict[str, Any]:
  data = jax.device_count() // model
  cfg = make_cfg(items, args.embed_dim, args.blocks, args.batch, args.length,
                 f"data={data},model={model}")
  sharder, step, state, shardings, _ = setup(cfg)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      state, shardings)
  batch = {k: jax.ShapeDtypeStruct((args.batch, args.length), jnp.int32,
                                   sharding=sharder.batch)
           for k in ("inputs", "targets")}
  t0 = time.time()
  compiled = step.lower(abstract_state, batch).compile()
  mem = compiled.memory_analysis()
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  return {"items": items, "model": model, "data": data,
          "bytes_per_device": int(per_device),
          "table_bytes_per_device": table_bytes(state, shardings),
          "argument_bytes": int(mem.argument_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes),
          "compile_s": round(time.time() - t0, 2)}


def run_steps(items: int, model: int, embed_dim: int, blocks: int,
              batch: int, length: int, steps: int) -> dict[str, Any]:
  """Real steps on random sequences; seconds per step after the first."""
  data = jax.device_count() // model
  cfg = make_cfg(items, embed_dim, blocks, batch, length,
                 f"data={data},model={model}")
  sharder, step, _, shardings, opt = setup(cfg)
  t0 = time.time()
  # Initialised straight into its shards: no device ever holds a whole
  # table or its moments.
  state = sharder.jit(
      lambda key: state_lib.init_state(models.init_params(cfg, key), opt),
      out_shardings=shardings)(jax.random.key(0))
  jax.block_until_ready(state)
  init_s = time.time() - t0
  rng = np.random.default_rng(0)
  times, losses = [], []
  for _ in range(steps + 1):
    seqs = rng.integers(1, items, size=(batch, length + 1), dtype=np.int32)
    placed = sharder.put_batch({"inputs": seqs[:, :-1],
                                "targets": seqs[:, 1:]})
    t = time.time()
    state, out = step(state, placed)
    losses.append(float(out["loss"]))
    times.append(time.time() - t)
  emb = state["params"]["item_embedding"]["embedding"]
  return {"items": items, "model": model, "data": data,
          "embed_dim": embed_dim, "batch": batch, "length": length,
          "init_s": round(init_s, 2),
          "first_step_s": round(times[0], 3),
          "step_s": round(float(np.median(times[1:])), 4),
          "losses": [round(x, 4) for x in losses],
          "embedding_shard_rows": int(emb.addressable_shards[0].data.shape[0])}


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", metavar="FILE", help="write the rows here")
  p.add_argument("--embed-dim", type=int, default=64)
  p.add_argument("--blocks", type=int, default=4)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--length", type=int, default=50)
  p.add_argument("--catalogues", default="1000000,10000000")
  p.add_argument("--models", default="1,2,4,8")
  p.add_argument("--skip-big-run", action="store_true",
                 help="skip the 10M-item training steps")
  args = p.parse_args(argv)
  out: dict[str, Any] = {
      "jax": jax.__version__, "devices": jax.device_count(),
      "device": f"CPU ({os.cpu_count()} cores), {jax.device_count()} fake "
                "XLA devices",
      "host": platform.machine(),
      "model": {"name": "nextitnet", "embed_dim": args.embed_dim,
                "blocks": args.blocks, "batch": args.batch,
                "length": args.length, "loss": "full (chunked)",
                "optimizer": "adam"},
      "memory": [], "step_time": [], "big_run": None}
  for items in map(int, args.catalogues.split(",")):
    for model in map(int, args.models.split(",")):
      row = memory_case(items, model, args)
      print(json.dumps(row), flush=True)
      out["memory"].append(row)
  for model in (1, 2, 4, 8):
    row = run_steps(100_000, model, 32, 2, 16, 20, steps=5)
    print(json.dumps(row), flush=True)
    out["step_time"].append(row)
  if not args.skip_big_run:
    row = run_steps(10_000_000, 8, 16, 1, 8, 10, steps=3)
    print(json.dumps(row), flush=True)
    out["big_run"] = row
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
