"""Ranking metrics: MRR, HR and NDCG at 5, 10 and 20, over all items.

Every example is scored against all V-1 real items on device, in item tiles
so no [batch, V] matrix is needed for huge catalogues. Rules:
- the padding id 0 is never ranked;
- ties count against the target (rank = #better + #equal others), so a
  constant model gets the worst rank, not the best;
- optional `mask_history` removes the items of the input sequence (except the
  target itself) from the ranking; it is off by default and every report says
  which was used.
Sampled-negative ranking (1 positive + N random negatives, as in PeterRec's
fine-tuning) exists only on request and is labelled `sampled:N`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.data import sequences

CUTOFFS = (5, 10, 20)


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
  """Mean MRR/HR/NDCG@k from 0-based ranks (0 = the target is first), and
  accuracy: the share ranked first (a classifier's accuracy over all
  classes when the "items" are classes, as PeterRec's profile task)."""
  ranks = np.asarray(ranks, np.float64)
  out = {"accuracy": float(np.mean(ranks == 0))}
  for k in CUTOFFS:
    hit = ranks < k
    out[f"mrr@{k}"] = float(np.mean(np.where(hit, 1.0 / (ranks + 1), 0.0)))
    out[f"hr@{k}"] = float(np.mean(hit))
    out[f"ndcg@{k}"] = float(
        np.mean(np.where(hit, 1.0 / np.log2(ranks + 2), 0.0)))
  return out


def target_ranks(score_tile: Callable[[jax.Array, int], jax.Array],
                 num_items: int, targets: jax.Array,
                 history: jax.Array | None = None,
                 tile: int = 16384, *, offset: Any = 0,
                 rows: int | None = None,
                 axis: str | None = None) -> jax.Array:
  """0-based rank of each target among all real items, item tile by tile.

  `score_tile(start, size)` returns float32 scores [B, size] of item ids
  start..start+size-1 (any head's `tile_scores`; ids >= num_items are
  excluded here, whatever they score). targets [B]; history [B, T] ids to
  exclude (0 = none). Two passes over the tiles: the first reads the
  target's score out of the same computation that scores every other item,
  so a tie is a true tie, not a rounding difference between two code paths.

  On a shard of a table split by rows over mesh axis `axis` (under
  shard_map), `score_tile` scores local rows start..start+size-1, which
  are ids offset+start..; only the first `rows` local rows are real, and
  the target's score and the counts are summed over `axis`.
  """
  v = num_items
  b = targets.shape[0]
  local_rows = v if rows is None else rows
  tile = min(tile, local_rows)
  num_tiles = -(-local_rows // tile)
  starts = jnp.arange(num_tiles) * tile
  row_index = jnp.arange(b)[:, None]

  def tile_ids(start):
    local = start + jnp.arange(tile)
    return local + offset, local >= local_rows

  def excluded(ids, start, past):
    out = (ids == 0) | (ids >= v) | past
    out = jnp.broadcast_to(out, (b, tile))
    if history is not None:
      # Out-of-tile ids go to index `tile` and are dropped (a negative index
      # would wrap around instead).
      local = history - (start + offset)
      local = jnp.where((local >= 0) & (local < tile), local, tile)
      seen = jnp.zeros((b, tile), bool).at[row_index, local].set(
          True, mode="drop")
      seen = seen & (ids != 0)
      out = out | (seen & (ids[None, :] != targets[:, None]))
    return out

  def target_score(acc, start):
    scores, (ids, past) = score_tile(start, tile), tile_ids(start)
    hit = (ids[None, :] == targets[:, None]) & ~past[None, :]
    return acc + jnp.sum(jnp.where(hit, scores, 0.0), axis=1), None

  t_score, _ = jax.lax.scan(target_score, jnp.zeros(b), starts)
  if axis is not None:  # Only the target's own shard holds its score.
    t_score = jax.lax.psum(t_score, axis)

  def count_ahead(acc, start):
    scores, (ids, past) = score_tile(start, tile), tile_ids(start)
    # `other` also keeps the target from counting itself when XLA fuses the
    # two passes differently and its score moves by an ulp.
    other = ids[None, :] != targets[:, None]
    ahead = (scores >= t_score[:, None]) & other & ~excluded(ids, start,
                                                             past)
    return acc + jnp.sum(ahead, axis=1), None

  ranks, _ = jax.lax.scan(count_ahead, jnp.zeros(b, jnp.int32), starts)
  if axis is not None:
    ranks = jax.lax.psum(ranks, axis)
  return ranks


def sampled_ranks(target_scores: jax.Array,
                  negative_scores: jax.Array) -> jax.Array:
  """Rank of the target [B] among itself and negatives [B, N] (ties
  against the target)."""
  return jnp.sum(negative_scores >= target_scores[:, None], axis=1)


def sample_negatives(rng: np.random.Generator, targets: np.ndarray,
                     num_items: int, num_negatives: int) -> np.ndarray:
  """Uniform negatives over 1..V-1, resampled where they hit the target."""
  neg = rng.integers(1, num_items, size=(len(targets), num_negatives))
  clash = neg == targets[:, None]
  while clash.any():
    neg[clash] = rng.integers(1, num_items, size=int(clash.sum()))
    clash = neg == targets[:, None]
  return neg


def evaluate(rank_fn: Callable[[dict[str, np.ndarray]], Any],
             inputs: np.ndarray, targets: np.ndarray, batch_size: int,
             users: np.ndarray | None = None) -> dict[str, float]:
  """Runs `rank_fn(batch) -> ranks` over fixed-size batches (with the
  rows' `users`); mean metrics."""
  # Read the ranks back only after every batch is dispatched, so device
  # work is not stalled by a host sync per batch.
  pending = [(rank_fn(batch), batch["valid"])
             for batch in sequences.eval_batches(inputs, targets, batch_size,
                                                 users)]
  ranks = np.concatenate([np.asarray(r)[valid] for r, valid in pending])
  out = metrics_from_ranks(ranks)
  out["count"] = int(len(targets))
  return out


def popularity_ranks(item_counts: np.ndarray, inputs: np.ndarray,
                     targets: np.ndarray,
                     mask_history: bool = False) -> np.ndarray:
  """Ranks under the popularity baseline (score = training frequency).

  Same rules as the model: id 0 never ranked, ties against the target.
  """
  counts = np.asarray(item_counts, np.int64)
  real = counts[1:]
  ordered = np.sort(real)
  t_count = counts[targets]
  # Items (excluding id 0) scoring >= the target, minus the target itself.
  ranks = len(real) - np.searchsorted(ordered, t_count, side="left") - 1
  if mask_history:
    hist = np.sort(inputs, axis=1)
    first = np.ones_like(hist, bool)
    first[:, 1:] = hist[:, 1:] != hist[:, :-1]
    ahead = (first & (hist != 0) & (hist != targets[:, None])
             & (counts[hist] >= t_count[:, None]))
    ranks = ranks - ahead.sum(axis=1)
  return ranks


def popularity_metrics(item_counts: np.ndarray, inputs: np.ndarray,
                       targets: np.ndarray,
                       mask_history: bool = False) -> dict[str, float]:
  out = metrics_from_ranks(
      popularity_ranks(item_counts, inputs, targets, mask_history))
  out["count"] = int(len(targets))
  return out

