"""The full softmax cross entropy over item tiles, with a custom VJP.

With V in the millions the [N, V] logit matrix does not fit in memory, so
`softmax_cross_entropy` scans over item tiles with an online logsumexp and a
custom VJP that recomputes each tile's logits in the backward pass; peak
memory is O(N * chunk_size + V * C). `naive_softmax_cross_entropy` holds
all logits: the reference, and fine for a small catalogue. Conventions
(padding, masking, dtypes) are in `softmax_common`.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.heads import softmax_common as common


def naive_softmax_cross_entropy(h: jax.Array,
                                w: jax.Array,
                                b: jax.Array,
                                targets: jax.Array,
                                mask: jax.Array,
                                *,
                                label_smoothing: float = 0.0,
                                logits_dtype: Any = None) -> jax.Array:
  """Full softmax cross entropy that materialises all [N, V] logits.

  The reference for the chunked version, and fine for a small catalogue.
  """
  common.check_output_layer(h, w, b)
  h, targets, mask = common.flatten(h, targets, mask)
  cdt = common.compute_dtype(h, logits_dtype)
  logits = common.logits(h.astype(cdt), w, b, cdt)
  # The true logit is read before excluding id 0 so that a (never counted)
  # padding target gives a finite value rather than inf.
  true = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
  lse = jax.nn.logsumexp(logits.at[:, 0].set(-jnp.inf), axis=1)
  # Smoothing spreads eps over the V-1 real items: CE against
  # (1-eps) onehot + eps/(V-1), = (1-eps)(lse - z_t) + eps(lse - mean z).
  mean_real = jnp.mean(logits[:, 1:], axis=1)
  ce = ((1 - label_smoothing) * (lse - true)
        + label_smoothing * (lse - mean_real))
  return common.masked_mean(ce, targets, mask)


def softmax_cross_entropy(h: jax.Array,
                          w: jax.Array,
                          b: jax.Array,
                          targets: jax.Array,
                          mask: jax.Array,
                          *,
                          chunk_size: int = 16384,
                          label_smoothing: float = 0.0,
                          logits_dtype: Any = None) -> jax.Array:
  """Full softmax cross entropy over item tiles of at most `chunk_size`.

  Never holds more than [N, chunk_size] logits: the forward pass is a scan
  with an online logsumexp and the backward pass recomputes each tile.

  Args:
    h: [..., C] hidden states, in the compute dtype.
    w: [V, C] output weights.
    b: [V] output bias.
    targets: [...] int item ids; 0 (padding) is never counted.
    mask: [...] float or bool token weights.
    chunk_size: most items per tile. V is split into ceil(V / chunk_size)
      equal tiles (padded with -inf items), so padding stays below one tile.
    label_smoothing: eps; the target distribution is (1-eps) on the target
      plus eps spread evenly over the V-1 real items.
    logits_dtype: dtype of the matmul operands; None = h's dtype. The
      matmuls accumulate, and the logsumexp runs, in float32 either way.

  Returns:
    The masked mean cross entropy, a float32 scalar.
  """
  common.check_output_layer(h, w, b)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: expected >= 1")
  h, targets, mask = common.flatten(h, targets, mask)
  v, c = w.shape
  num_tiles = -(-v // chunk_size)
  tile = -(-v // num_tiles)
  pad = num_tiles * tile - v
  # Padding outside the custom VJP: jnp.pad's transpose drops the padded
  # rows' gradients for free.
  w_tiles = jnp.pad(w, ((0, pad), (0, 0))).reshape(num_tiles, tile, c)
  b_tiles = jnp.pad(b, (0, pad)).reshape(num_tiles, tile)
  ce = _tiled_ce(h, w_tiles, b_tiles, targets, v,
                 common.compute_dtype(h, logits_dtype),
                 float(label_smoothing))
  return common.masked_mean(ce, targets, mask)


def _tile_ids(k: jax.Array, tile: int, num_items: int) -> tuple[jax.Array,
                                                               jax.Array]:
  """Item ids of tile k, and which of them are real classes."""
  ids = k * tile + jnp.arange(tile, dtype=jnp.int32)
  return ids, (ids > 0) & (ids < num_items)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tiled_ce(h: jax.Array, w_tiles: jax.Array, b_tiles: jax.Array,
              targets: jax.Array, num_items: int, cdt: np.dtype,
              smoothing: float) -> jax.Array:
  """Per-token cross entropy [N] over tiled items (w_tiles [K, T, C])."""
  return _tiled_ce_fwd(h, w_tiles, b_tiles, targets, num_items, cdt,
                       smoothing)[0]


def _tiled_ce_fwd(h: jax.Array, w_tiles: jax.Array, b_tiles: jax.Array,
                  targets: jax.Array, num_items: int, cdt: np.dtype,
                  smoothing: float) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Scan over tiles with an online logsumexp; keeps only lse [N] for bwd.

  With label smoothing eps it also sums the real items' logits:
  ce = (1-eps)(lse - z_t) + eps(lse - sum_real z / (V-1)).
  """
  n = h.shape[0]
  num_tiles, tile, _ = w_tiles.shape
  h_c = h.astype(cdt)

  def body(carry, xs):
    m, s, true, total = carry
    k, w_tile, b_tile = xs
    ids, valid = _tile_ids(k, tile, num_items)
    logits = common.logits(h_c, w_tile, b_tile, cdt)
    # Read before the -inf exclusion, as in the naive version.
    hit = ids[None, :] == targets[:, None]
    true = true + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
    if smoothing:
      total = total + jnp.sum(jnp.where(valid[None, :], logits, 0.0), axis=1)
    logits = jnp.where(valid[None, :], logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    # Until a row has seen a real item its max is -inf; shifting by 0 then
    # avoids exp(-inf - -inf) = nan.
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    s = s * jnp.exp(m - shift) + jnp.sum(
        jnp.exp(logits - shift[:, None]), axis=1)
    return (m_new, s, true, total), None

  zeros = jnp.zeros((n,), common.F32)
  init = (jnp.full((n,), -jnp.inf, common.F32), zeros, zeros, zeros)
  xs = (jnp.arange(num_tiles, dtype=jnp.int32), w_tiles, b_tiles)
  (m, s, true, total), _ = jax.lax.scan(body, init, xs)
  lse = m + jnp.log(s)
  ce = lse - true
  if smoothing:
    ce = (1 - smoothing) * ce + smoothing * (lse - total / (num_items - 1))
  return ce, (h, w_tiles, b_tiles, targets, lse)


def _tiled_ce_bwd(num_items: int, cdt: np.dtype, smoothing: float,
                  res: tuple[jax.Array, ...],
                  g: jax.Array) -> tuple[jax.Array | None, ...]:
  """Recomputes each tile's logits:
  dlogits = g * (softmax - (1-eps) onehot - eps/(V-1) on real items)."""
  h, w_tiles, b_tiles, targets, lse = res
  num_tiles, tile, _ = w_tiles.shape
  h_c = h.astype(cdt)
  g = g.astype(common.F32)

  def body(dh, xs):
    k, w_tile, b_tile = xs
    ids, valid = _tile_ids(k, tile, num_items)
    logits = common.logits(h_c, w_tile, b_tile, cdt)
    p = jnp.where(valid[None, :], jnp.exp(logits - lse[:, None]), 0.0)
    hit = ids[None, :] == targets[:, None]
    target = (1 - smoothing) * hit
    if smoothing:
      target = target + smoothing / (num_items - 1) * valid[None, :]
    dlogits = g[:, None] * (p - target)
    d_c = dlogits.astype(cdt)
    dh = dh + jnp.einsum("nt,tc->nc", d_c, w_tile.astype(cdt),
                         preferred_element_type=common.F32)
    dw = jnp.einsum("nt,nc->tc", d_c, h_c, preferred_element_type=common.F32)
    return dh, (dw, jnp.sum(dlogits, axis=0))

  xs = (jnp.arange(num_tiles, dtype=jnp.int32), w_tiles, b_tiles)
  dh, (dw, db) = jax.lax.scan(body, jnp.zeros(h.shape, common.F32), xs)
  # Integer targets get no cotangent.
  return (dh.astype(h.dtype), dw.astype(w_tiles.dtype),
          db.astype(b_tiles.dtype), None)


_tiled_ce.defvjp(_tiled_ce_fwd, _tiled_ce_bwd)
