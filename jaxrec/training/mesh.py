"""Devices and placement: a 2-D `data` x `model` mesh (`train.mesh`).

The batch is split over `data`; the item-sized tables (item embedding,
every head's output tables) and their optimizer state are split by rows
over `model` (`jaxrec.sharding`'s rules); everything else is replicated.
The default mesh puts every device on `data` (model=1: pure data
parallelism). Each process contributes its own rows of the global batch
(`jax.make_array_from_process_local_data`), so the same code runs on one
device, 8 fake CPU devices and several hosts.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec import sharding as sharding_lib
from jaxrec.errors import JaxrecError

OPTION = "--mesh"


def parse_mesh(spec: str, num_devices: int) -> tuple[int, int]:
  """(data, model) sizes of a `data=D,model=M` spec over `num_devices`.

  Either size may be left out (it takes the rest of the devices); '' puts
  every device on `data`. One-line errors name --mesh: an unknown axis, a
  size that is not a positive integer, or D*M != the device count (a mesh
  that leaves devices idle is almost always a typo)."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, eq, value = part.partition("=")
    name = name.strip()
    if not eq or name not in sharding_lib.AXES:
      raise JaxrecError(f"{OPTION}={spec}: {part!r} is not AXIS=SIZE with "
                        f"AXIS one of {list(sharding_lib.AXES)}")
    if name in sizes:
      raise JaxrecError(f"{OPTION}={spec}: axis {name!r} given twice")
    try:
      sizes[name] = int(value)
    except ValueError:
      sizes[name] = 0
    if sizes[name] < 1:
      raise JaxrecError(f"{OPTION}={spec}: {name} size {value.strip()!r} is "
                        "not an integer >= 1")
  data, model = sizes.get("data"), sizes.get("model")
  if data is None and model is None:
    data, model = num_devices, 1
  elif data is None:
    data = num_devices // model if num_devices % model == 0 else -1
  elif model is None:
    model = num_devices // data if num_devices % data == 0 else -1
  if data < 1 or model < 1 or data * model != num_devices:
    raise JaxrecError(f"{OPTION}={spec}: data x model must equal the "
                      f"{num_devices} devices")
  return data, model


def make_mesh(devices: list[jax.Device] | None = None,
              spec: str = "") -> Mesh:
  """A `data` x `model` mesh over the given (default: all) devices.

  Devices are laid out with `model` innermost, so a model group sits on
  neighbouring devices (one host's, on a multi-host cluster) and its
  collectives stay on the fastest links."""
  devices = jax.devices() if devices is None else devices
  data, model = parse_mesh(spec, len(devices))
  return Mesh(np.asarray(devices).reshape(data, model), sharding_lib.AXES)


class Sharder:
  """Places batches, params and optimizer state on the mesh."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.batch = NamedSharding(mesh, P(sharding_lib.DATA))
    self.data_size = int(mesh.shape[sharding_lib.DATA])
    self.model_size = int(mesh.shape.get(sharding_lib.MODEL, 1))

  def shardings(self, tree: Any) -> Any:
    """NamedShardings of a params, optimizer or train state tree (arrays
    or ShapeDtypeStructs): item-sized tables by rows over `model`, the rest
    replicated (`jaxrec.sharding.ROW_SHARDED_RULES`)."""
    return jax.tree.map(lambda s: NamedSharding(self.mesh, s),
                        sharding_lib.specs(tree, self.model_size),
                        is_leaf=lambda x: isinstance(x, P))

  def place(self, tree: Any) -> Any:
    """`tree` on the mesh, sharded by `shardings`."""
    return jax.device_put(tree, self.shardings(tree))

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Each process passes the whole global batch and contributes its rows."""
    n, k = jax.process_count(), jax.process_index()

    def put(x):
      rows = x.shape[0] // n
      return jax.make_array_from_process_local_data(
          self.batch, x[k * rows:(k + 1) * rows], x.shape)

    return {key: put(x) for key, x in batch.items()}

  def replicate(self, tree: Any) -> Any:
    return jax.device_put(tree, self.replicated)

  def check_batch(self, batch_size: int, option: str) -> int:
    """The batch size, if the mesh's `data` axis splits it evenly."""
    if batch_size % self.data_size:
      raise JaxrecError(f"{option}={batch_size}: must be a multiple of the "
                        f"{self.data_size} devices on --mesh's data axis")
    return batch_size

  def jit(self, fn: Callable, **kwargs: Any) -> Callable:
    """`jax.jit(fn, **kwargs)`, traced and run under this mesh, so heads
    see its `model` axis (`jaxrec.sharding.model_shards`) and shard_map
    their tables over it."""
    jitted = jax.jit(fn, **kwargs)

    @functools.wraps(fn)
    def call(*args, **kw):
      with self.context():
        return jitted(*args, **kw)

    call.lower = lambda *a, **k: _lower(self, jitted, *a, **k)
    return call

  def context(self) -> contextlib.AbstractContextManager:
    return jax.set_mesh(self.mesh)


def _lower(sharder: Sharder, jitted: Any, *args: Any, **kw: Any) -> Any:
  with sharder.context():
    return jitted.lower(*args, **kw)
