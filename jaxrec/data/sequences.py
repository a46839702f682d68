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
  # The user of each row, by index: 1..U in the data's user order
  # (`vocab.users`), 0 for a user with no training row, whom no model has
  # seen (protocol=paper's valid and test users; a user too short to leave
  # a training transition). None: data built without users.
  train_users: np.ndarray | None = None  # [N_train] int32
  valid_users: np.ndarray | None = None  # [N_valid] int32
  test_users: np.ndarray | None = None  # [N_test] int32

  @property
  def max_len(self) -> int:
    return self.valid_inputs.shape[1]

  @property
  def num_users(self) -> int:
    """Size of a user table over this data, the unseen index 0 included
    (0: the data has no users)."""
    if self.train_users is None:
      return 0
    return int(self.meta["num_users"]) + 1


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
  return max(1, num_rows // batch_size)


def train_batch(train: np.ndarray, step: int, batch_size: int,
                seed: int, users: np.ndarray | None = None
                ) -> dict[str, np.ndarray]:
  """The batch for optimiser step `step`: a pure function of its arguments.

  Each epoch is a fresh seeded permutation of the rows, so the iterator's
  whole state is the step number and a killed run resumes exactly. With
  `users` (one per row) the batch also holds each row's user.
  """
  picked = batch_rows(train.shape[0], step, batch_size, seed)
  rows = train[picked]
  out = {"inputs": rows[:, :-1], "targets": rows[:, 1:]}
  if users is not None:
    out["users"] = users[picked]
  return out


def batch_rows(num_rows: int, step: int, batch_size: int,
               seed: int) -> np.ndarray:
  """The indices of the training rows in the batch of `step`."""
  per_epoch = steps_per_epoch(num_rows, batch_size)
  epoch, index = divmod(step, per_epoch)
  order = epoch_order(num_rows, seed, epoch)
  if num_rows < batch_size:  # Tiny data: cycle the permutation to fill it.
    order = np.resize(order, batch_size)
  return order[index * batch_size:(index + 1) * batch_size]


@functools.lru_cache(maxsize=2)
def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  """The row order of one epoch; cached so a step does not redraw it."""
  order = np.random.default_rng([seed, epoch]).permutation(num_rows)
  order.flags.writeable = False  # Shared by every step of the epoch.
  return order


def eval_batches(inputs: np.ndarray, targets: np.ndarray, batch_size: int,
                 users: np.ndarray | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-size batches (the last padded) so evaluation compiles once;
  each holds its rows' `users` (0, the unseen user, without them)."""
  n = inputs.shape[0]
  if users is None:
    users = np.zeros(n, np.int32)
  for start in range(0, n, batch_size):
    x = inputs[start:start + batch_size]
    y = targets[start:start + batch_size]
    u = users[start:start + batch_size]
    valid = np.ones(len(y), bool)
    pad = batch_size - len(y)
    if pad:
      x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
      y = np.concatenate([y, np.ones(pad, y.dtype)])
      u = np.concatenate([u, np.zeros(pad, u.dtype)])
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    yield {"inputs": x, "targets": y, "users": u, "valid": valid}
