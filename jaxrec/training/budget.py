"""What a training run needs of a device's memory, known before anything
is allocated, compiled or written.

A config whose params, Adam moments, activations or logits cannot fit used
to reach XLA, which allocated until the device ran out (a
RESOURCE_EXHAUSTED traceback on a GPU; on a CPU the kernel's OOM killer or
a machine swapping to a halt), after minutes of data loading and
compilation, and after the run directory had been written. `check_fits`
refuses such a config in one line with the estimate and the limit, before
any of that.

The estimate is a lower bound, counting only what a train step cannot do
without: so a config it refuses cannot fit, and one it passes may still
run out (the CLI's out-of-memory line then names what to shrink).
`tests/test_budget.py` holds it under what XLA's compiled train step
reports.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from jaxrec import models, sharding
from jaxrec.errors import JaxrecError
from jaxrec.training import optim


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Bytes one device needs at least, by what needs them."""
  params: int  # Every param (item tables: this device's rows).
  optimizer: int  # Gradients and Adam's two moments of trainable params.
  activations: int  # The hidden states the backward pass reads.
  logits: int  # One tile of scores per training position.

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.activations + self.logits

  def describe(self) -> str:
    parts = dataclasses.asdict(self)
    return ", ".join(f"{name} {_gib(n)}" for name, n in parts.items() if n)


def training_estimate(cfg: Any, params: Any, data_size: int = 1,
                      model_size: int = 1) -> Estimate:
  """The lower bound for `cfg` (sizes fitted to its data) and its params
  (arrays or ShapeDtypeStructs), on a mesh of data x model devices."""
  specs = sharding.specs(params, model_size)
  labels = optim.trainable_labels(params, cfg.train.freeze)
  param_bytes = trainable_bytes = 0
  for leaf, spec, label in zip(jax.tree.leaves(params),
                               jax.tree.leaves(specs, is_leaf=_is_spec),
                               jax.tree.leaves(labels)):
    n = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
    n //= model_size if any(spec) else 1  # Rows split over `model`.
    param_bytes += n
    trainable_bytes += n if label == optim.TRAIN else 0
  rows = max(1, cfg.train.batch_size // data_size)
  positions = rows * cfg.data.max_len
  itemsize = np.dtype(cfg.model.dtype).itemsize
  # A stack of blocks keeps each block's input for the backward pass (the
  # scan's carry, remat or not); any backbone keeps its output.
  stacked = bool(models.get(cfg.model.name).surgery.stacks)
  depth = cfg.model.num_blocks if stacked else 1
  activations = positions * cfg.model.embed_dim * itemsize * depth
  if cfg.train.loss == "full":
    scored = min(cfg.train.loss_chunk, cfg.head.num_outputs(cfg.model))
  else:
    scored = cfg.train.num_samples
  return Estimate(params=param_bytes, optimizer=3 * trainable_bytes,
                  activations=activations, logits=positions * scored * 4)


def device_memory(device: jax.Device | None = None) -> tuple[int, str]:
  """(bytes, what): an accelerator's memory limit, or the host's memory
  where the device reports none (CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except (RuntimeError, NotImplementedError):  # Some backends have none.
    stats = {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]), f"{device.device_kind}'s memory"
  pages = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(pages), "this machine's memory"


def check_fits(cfg: Any, params: Any, data_size: int = 1,
               model_size: int = 1,
               limit: tuple[int, str] | None = None) -> Estimate:
  """Refuses `cfg` in one line when its lower bound exceeds the memory of
  one device (`limit`: (bytes, what), default `device_memory()`)."""
  estimate = training_estimate(cfg, params, data_size, model_size)
  have, what = limit or device_memory()
  if estimate.total > have:
    raise JaxrecError(
        f"model.embed_dim={cfg.model.embed_dim}, model.num_blocks="
        f"{cfg.model.num_blocks}, train.batch_size={cfg.train.batch_size}, "
        f"data.max_len={cfg.data.max_len}, {cfg.model.num_items - 1:,} "
        f"items: a train step needs at least {_gib(estimate.total)} per "
        f"device ({estimate.describe()}), more than {what} "
        f"({_gib(have)}); shrink one of them or split the tables over "
        "--mesh model=M")
  return estimate


def _is_spec(x: Any) -> bool:
  return isinstance(x, jax.sharding.PartitionSpec)


def _gib(n: int) -> str:
  return f"{n / 2**30:,.1f} GiB" if n >= 2**27 else f"{n / 2**20:,.1f} MiB"
