"""Deterministic batching: the batch of a step is a pure function."""
import numpy as np

from jaxrec.data import sequences


def rows(n=40, width=6):
  return np.arange(n * width, dtype=np.int32).reshape(n, width)


def test_an_epoch_visits_every_row_once():
  data = rows()
  seen = np.concatenate([sequences.train_batch(data, s, 8, 0)["inputs"][:, 0]
                         for s in range(5)])
  assert sorted(seen.tolist()) == sorted(data[:, 0].tolist())


def test_same_step_same_batch_and_epochs_reshuffle():
  data = rows()
  a = sequences.train_batch(data, 3, 8, seed=1)
  b = sequences.train_batch(data, 3, 8, seed=1)
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  first = sequences.train_batch(data, 0, 8, seed=1)["inputs"]
  next_epoch = sequences.train_batch(data, 5, 8, seed=1)["inputs"]
  assert not np.array_equal(first, next_epoch)


def test_inputs_and_targets_are_the_shifted_row():
  batch = sequences.train_batch(rows(), 0, 4, 0)
  np.testing.assert_array_equal(batch["inputs"][:, 1:],
                                batch["targets"][:, :-1])


def test_eval_batches_pad_the_last_batch_and_mark_it():
  inputs = rows(10)[:, :3]
  targets = np.arange(10, dtype=np.int32) + 1
  batches = list(sequences.eval_batches(inputs, targets, 4))
  assert [b["inputs"].shape[0] for b in batches] == [4, 4, 4]
  assert batches[-1]["valid"].tolist() == [True, True, False, False]
