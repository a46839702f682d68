"""Stages shared by the StackRec scripts: a stage's config, a run, a
growth (`make demo`), and the nested subsets of training rows that StackRec
CL's data arrives in. The scenarios themselves run on the experiment
harness (`harness.py`: stackrec_zoo.py for TS, stackrec_cl.py, stackrec_tf.py).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time

import numpy as np
from absl import logging as absl_logging

from jaxrec import config as config_lib
from jaxrec.data import sequences
from jaxrec.methods.stackrec import growth
from jaxrec.training import loop

# Orbax logs every read-only checkpoint open through absl.
absl_logging.set_verbosity(absl_logging.ERROR)


def fresh_dir(path: str) -> str:
  """Experiments rerun from scratch: an old run directory is removed."""
  if os.path.exists(path):
    shutil.rmtree(path)
  return path


def run_stage(cfg: config_lib.Config, out_dir: str,
              data: sequences.SequenceData, init_from: str | None = None,
              quiet: bool = True) -> str:
  loop.train(cfg, fresh_dir(out_dir), data, init_from=init_from,
             progress_bar=not quiet)
  return out_dir


def grow(src_dir: str, out_dir: str, method: str, preset: str,
         seed: int = 0) -> float:
  """Grows a run's latest checkpoint 2x; returns the wall seconds it took.

  The latest, not the best: a stage stops by budget, and early in training
  the best validation can be a much earlier, less trained model.
  """
  start = time.perf_counter()
  growth.grow_checkpoint(src_dir, fresh_dir(out_dir), method, preset,
                         seed=seed, kind="latest")
  return time.perf_counter() - start


def with_stage(cfg: config_lib.Config, blocks: int, steps: int,
               eval_every: int, patience: int = 0) -> config_lib.Config:
  """A stage's config: depth, step budget, and early stopping (0: none)."""
  return cfg.replace(
      model=dataclasses.replace(cfg.model, num_blocks=blocks),
      train=dataclasses.replace(cfg.train, steps=steps,
                                eval_every=eval_every, patience=patience))


def subset_train(data: sequences.SequenceData, fraction: float,
                 seed: int = 0) -> sequences.SequenceData:
  """The first `fraction` of a fixed seeded order of the training rows.

  Nested: the rows of a smaller fraction are a prefix of a larger one's.
  Valid and test stay whole, so every stage is scored on the same users.
  """
  order = np.random.default_rng(seed).permutation(data.train.shape[0])
  kept = np.sort(order[:max(1, int(fraction * len(order)))])
  rows = data.train[kept]
  counts = np.bincount(rows[rows != 0].ravel(), minlength=data.num_items)
  users = None if data.train_users is None else data.train_users[kept]
  return dataclasses.replace(
      data, train=rows, train_users=users,
      item_counts=counts.astype(np.int64),
      fingerprint=f"{data.fingerprint}-train{fraction:.2f}",
      meta={**data.meta, "train_fraction": fraction,
            "num_train_rows": int(rows.shape[0])})


