"""Masked item prediction: pretraining a bidirectional backbone (GRec's
encoder; PeterRec's masked pretraining).

Training: each training row's last `max_len` items; 30% of its real
(non-padding) positions, at least one, are chosen (rounded, drawn per row);
a chosen position's input becomes the MASK token (80%), a random item (10%)
or stays (10%), as BERT. The loss is the head's over the chosen positions
only (padding is never chosen: the official code, which uses id 0 as MASK,
masks padding too). The masking is a pure function of (seed, step), so a
resume replays it exactly.

Evaluation ranks the next item from `[history[1:], MASK]`: the MASK's
hidden state scores every item (a non-causal model must not see the
target, and it does not: the target is not in the input).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import models
from jaxrec.data import sequences
from jaxrec.tasks import next_item

NAME = "masked_item"
MASK_SHARE = 0.3  # Of a row's real positions.
REPLACE = (0.8, 0.1)  # Shares of chosen inputs set to MASK / a random item.


def mask_rows(rows: np.ndarray, rng: np.random.Generator, num_items: int,
              mask_id: int, share: float = MASK_SHARE
              ) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) of left-padded rows [B, T]: targets hold the item at
  each chosen position and 0 elsewhere."""
  real = rows != 0
  count = np.where(real.any(1),
                   np.maximum(1, np.rint(share * real.sum(1))), 0)
  keys = np.where(real, rng.random(rows.shape), np.inf)
  order = np.argsort(np.argsort(keys, axis=1), axis=1)  # Rank of each key.
  chosen = order < count[:, None]
  roll = rng.random(rows.shape)
  random_items = rng.integers(1, num_items, size=rows.shape)
  inputs = np.where(chosen & (roll < REPLACE[0]), mask_id, rows)
  swap = chosen & (roll >= REPLACE[0]) & (roll < REPLACE[0] + REPLACE[1])
  inputs = np.where(swap, random_items, inputs)
  return inputs.astype(rows.dtype), np.where(chosen, rows, 0).astype(
      rows.dtype)


def batch(data: sequences.SequenceData, step: int, batch_size: int,
          seed: int) -> dict[str, np.ndarray]:
  """The masked training batch of `step`: a pure function of (seed, step)."""
  rows = sequences.train_batch(data.train, step, batch_size, seed)["targets"]
  rng = np.random.default_rng([seed, step, 0x6d61736b])  # "mask"
  inputs, targets = mask_rows(rows, rng, data.num_items, data.num_items)
  return {"inputs": inputs, "targets": targets}


# The loss is the next-item one: the head's masked cross entropy over the
# positions whose target is not 0.
loss_parts = next_item.loss_parts
loss = next_item.loss


def mask_last(cfg: Any, inputs: jax.Array) -> jax.Array:
  """[history[1:], MASK]: the slot to predict, at the end."""
  mask = jnp.full((inputs.shape[0], 1), cfg.model.token_id("mask"),
                  inputs.dtype)
  return jnp.concatenate([inputs[:, 1:], mask], axis=1)


def masked_hidden(params: models.Params, cfg: Any, inputs: jax.Array,
                  users: jax.Array | None = None) -> jax.Array:
  return next_item.last_hidden(params, cfg, mask_last(cfg, inputs), users)


represent = masked_hidden


def rank_fn(cfg: Any) -> Callable[..., jax.Array]:
  return next_item.rank_fn(cfg, masked_hidden)


def sampled_rank_fn(cfg: Any) -> Callable[..., jax.Array]:
  return next_item.sampled_rank_fn(cfg, masked_hidden)


sampler_for = next_item.sampler_for
report = next_item.report
