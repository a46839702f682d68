"""The data types every source produces, and deterministic batching.

Sources (synthetic, MovieLens, CSV, RecBole, TFDS) yield `Interactions`;
`jaxrec.data.pipeline` turns them into `SequenceData`: left-padded id arrays
with 0 = padding, split by a protocol so that training never sees a valid or
test target.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator

import numpy as np

from jaxrec.data.vocabulary import Vocabulary


@dataclasses.dataclass(frozen=True)
class Interactions:
  """Raw user-item events. Ids are arbitrary (remapped later)."""
  users: np.ndarray  # [N] any integer or string dtype
  items: np.ndarray  # [N] any integer or string dtype
  timestamps: np.ndarray  # [N] float64 or int64; ties keep file order
  name: str  # Human-readable origin, e.g. "ml-1m/ratings.dat".


@dataclasses.dataclass(frozen=True)
class SequenceData:
  """Processed, split sequences. All id arrays are int32 with 0 = padding.

  Train rows are teacher-forcing windows: inputs `row[:-1]`, targets
  `row[1:]`, padding targets masked. Valid/test rows are model inputs whose
  last position predicts the matching target.
  """
  num_items: int  # V: item ids are 1..V-1, 0 is padding.
  train: np.ndarray  # [N_train, max_len + 1], left-padded.
  valid_inputs: np.ndarray  # [N_valid, max_len], left-padded.
  valid_targets: np.ndarray  # [N_valid]
  test_inputs: np.ndarray  # [N_test, max_len], left-padded.
  test_targets: np.ndarray  # [N_test]
  item_counts: np.ndarray  # [V] int64: frequency in the training rows only.
  fingerprint: str  # Hash of source contents + processing options.
  meta: dict[str, Any]  # Source, protocol, user/item/interaction counts.
  # Raw ids of the items (by model id) and users; None for data built in
  # memory without one (tests, experiment scripts).
  vocab: Vocabulary | None = None

  @property
  def max_len(self) -> int:
    return self.valid_inputs.shape[1]


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
  return max(1, num_rows // batch_size)


def train_batch(train: np.ndarray, step: int, batch_size: int,
                seed: int) -> dict[str, np.ndarray]:
  """The batch for optimiser step `step`: a pure function of its arguments.

  Each epoch is a fresh seeded permutation of the rows, so the iterator's
  whole state is the step number and a killed run resumes exactly.
  """
  n = train.shape[0]
  per_epoch = steps_per_epoch(n, batch_size)
  epoch, index = divmod(step, per_epoch)
  order = epoch_order(n, seed, epoch)
  if n < batch_size:  # Tiny data: cycle the permutation to fill the batch.
    order = np.resize(order, batch_size)
  rows = train[order[index * batch_size:(index + 1) * batch_size]]
  return {"inputs": rows[:, :-1], "targets": rows[:, 1:]}


@functools.lru_cache(maxsize=2)
def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  """The row order of one epoch; cached so a step does not redraw it."""
  order = np.random.default_rng([seed, epoch]).permutation(num_rows)
  order.flags.writeable = False  # Shared by every step of the epoch.
  return order


def eval_batches(inputs: np.ndarray, targets: np.ndarray,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches (the last padded) so evaluation compiles once."""
  n = inputs.shape[0]
  for start in range(0, n, batch_size):
    x = inputs[start:start + batch_size]
    y = targets[start:start + batch_size]
    valid = np.ones(len(y), bool)
    pad = batch_size - len(y)
    if pad:
      x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
      y = np.concatenate([y, np.ones(pad, y.dtype)])
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    yield {"inputs": x, "targets": y, "valid": valid}
