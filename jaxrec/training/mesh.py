"""Devices and batch placement: a 1-D `data` mesh, the batch split over it.

Params and optimizer state are replicated; each process contributes its
own rows of the global batch (`jax.make_array_from_process_local_data`),
so the same code runs on one device, 8 fake CPU devices and several hosts.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxrec.errors import JaxrecError


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `data` over the given (default: all) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


class Sharder:
  """Places host batches on the mesh, batch axis split over `data`."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.batch = NamedSharding(mesh, P("data"))

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
    """The batch size, if the mesh's devices split it evenly."""
    size = self.mesh.size
    if batch_size % size:
      raise JaxrecError(f"{option}={batch_size}: must be a multiple of the "
                        f"{size} devices of the mesh")
    return batch_size
