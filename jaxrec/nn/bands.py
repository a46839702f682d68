"""Frequency bands (CpRec): the catalogue cut head to tail into id ranges.

Item ids rank items by training-split frequency (1 = most frequent,
`jaxrec.data.pipeline`), so a band is an id range. With cutoffs
`c_1 < ... < c_{n-1}` (and c_0 = 0, c_n = V), band j holds ids
`[c_j, c_{j+1})`; band 0, the head, also holds the padding id 0. CpRec's
block-wise embedding gives band j a `[k_j, d_j]` table, `d_j` shrinking
toward the tail, and its tree softmax a softmax per tail band.

Cutoffs are config (`model.band_cutoffs`). Left empty, they are resolved
once from the training counts by `cutoffs_from_counts` and written into the
run's config, so a checkpoint always carries its bands: band 0 covers
`band_shares[0]` of the training events (default 80%), later bands end at
the further shares given, and bands without a share split the remaining
events into equal masses.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.errors import JaxrecError


def cutoffs_from_counts(item_counts: np.ndarray, num_bands: int,
                        shares: Sequence[float] = (0.8,)) -> tuple[int, ...]:
  """Id cutoffs (num_bands - 1 of them) from training counts [V].

  Band j ends where the cumulative share of training events first reaches
  its share; every band keeps at least one item. `item_counts` must be in
  id order (descending counts, as the pipeline makes them).
  """
  counts = np.asarray(item_counts, np.float64)
  num_real = len(counts) - 1
  if num_bands < 1 or num_real < num_bands:
    raise JaxrecError(f"model.num_bands={num_bands}: expected 1.."
                      f"{num_real} (one item per band at least; the data has "
                      f"{num_real} items)")
  targets = band_shares(num_bands, shares)
  total = counts[1:].sum()
  cumulative = np.cumsum(counts[1:]) / max(total, 1.0)
  cutoffs, low = [], 1
  for j, share in enumerate(targets):
    # Items 1..n reach `share` at n = first index with cumulative >= share.
    n = int(np.searchsorted(cumulative, share - 1e-12)) + 1
    bands_left = num_bands - 1 - j  # Bands above this cutoff.
    cut = min(max(n + 1, low + 1), len(counts) - bands_left)
    cutoffs.append(cut)
    low = cut
  return tuple(cutoffs)


def band_shares(num_bands: int, shares: Sequence[float]) -> list[float]:
  """The cumulative event share at which each band but the last ends:
  the given ones, then equal masses over what is left."""
  given = [float(s) for s in shares][:num_bands - 1]
  last = given[-1] if given else 0.0
  rest = num_bands - 1 - len(given)
  step = (1.0 - last) / (rest + 1)
  return given + [last + step * (i + 1) for i in range(rest)]


def check_shares(shares: Sequence[float]) -> None:
  ok = all(0 < s < 1 for s in shares) and all(
      a < b for a, b in zip(shares, shares[1:]))
  if not ok:
    raise JaxrecError(f"model.band_shares={list(shares)}: expected "
                      "increasing shares in (0, 1)")


def check_cutoffs(cutoffs: Sequence[int], num_bands: int,
                  num_items: int) -> None:
  """Cutoffs must be n - 1 increasing ids in 2..V-1 (every band non-empty;
  the head holds padding and at least one item)."""
  cutoffs = list(cutoffs)
  if len(cutoffs) != num_bands - 1:
    raise JaxrecError(f"model.band_cutoffs={cutoffs}: expected "
                      f"{num_bands - 1} cutoffs for model.num_bands="
                      f"{num_bands}")
  bounds = [1] + cutoffs + ([num_items] if num_items else [])
  if not all(a < b for a, b in zip(bounds, bounds[1:])):
    top = f"V-1={num_items - 1}" if num_items else "V-1"
    raise JaxrecError(f"model.band_cutoffs={cutoffs}: expected increasing "
                      f"item ids in 2..{top}, each band non-empty")


def band_sizes(cutoffs: Sequence[int], num_items: int) -> tuple[int, ...]:
  """k_j: ids per band (the head's count includes padding id 0)."""
  bounds = (0, *cutoffs, num_items)
  return tuple(b - a for a, b in zip(bounds, bounds[1:]))


def band_dims(embed_dim: int, num_bands: int,
              dims: Sequence[int] = ()) -> tuple[int, ...]:
  """d_j: the given dims, else C / 4^j (at least 1)."""
  if dims:
    return tuple(int(d) for d in dims)
  return tuple(max(1, embed_dim // 4 ** j) for j in range(num_bands))


def band_of(ids: jax.Array, cutoffs: Sequence[int]) -> jax.Array:
  """The band of each id (0 = head; padding is in the head)."""
  out = jnp.zeros(jnp.shape(ids), jnp.int32)
  for c in cutoffs:
    out = out + (ids >= c).astype(jnp.int32)
  return out
