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
from jax.sharding import PartitionSpec as P

from jaxrec import sharding
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


def _tile_ids(k: jax.Array, tile: int, num_items: int, offset: Any = 0,
              rows: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Item ids of tile k, and which of them are real classes. On a shard,
  the tiles cover `rows` local rows whose ids start at `offset`; the local
  padding past `rows` is never a class (its ids belong to the next shard)."""
  local = k * tile + jnp.arange(tile, dtype=jnp.int32)
  ids = local + offset
  valid = (ids > 0) & (ids < num_items)
  if rows is not None:
    valid = valid & (local < rows)
  return ids, valid


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _tiled_ce(h: jax.Array, w_tiles: jax.Array, b_tiles: jax.Array,
              targets: jax.Array, num_items: int, cdt: np.dtype,
              smoothing: float) -> jax.Array:
  """Per-token cross entropy [N] over tiled items (w_tiles [K, T, C])."""
  return _tiled_ce_fwd(h, w_tiles, b_tiles, targets, num_items, cdt,
                       smoothing)[0]


def _scan_stats(h: jax.Array, w_tiles: jax.Array, b_tiles: jax.Array,
                targets: jax.Array, num_items: int, cdt: np.dtype,
                smoothing: float, offset: Any = 0, rows: int | None = None
                ) -> tuple[jax.Array, ...]:
  """(max, sum of exp(logit - max), target logit, sum of real logits) per
  token [N] over the given tiles: an online logsumexp, one tile at a time."""
  n = h.shape[0]
  num_tiles, tile, _ = w_tiles.shape
  h_c = h.astype(cdt)

  def body(carry, xs):
    m, s, true, total = carry
    k, w_tile, b_tile = xs
    ids, valid = _tile_ids(k, tile, num_items, offset, rows)
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
  out, _ = jax.lax.scan(body, init, xs)
  return out


def _ce_from_stats(lse: jax.Array, true: jax.Array, total: jax.Array,
                   num_items: int, smoothing: float) -> jax.Array:
  ce = lse - true
  if smoothing:
    ce = (1 - smoothing) * ce + smoothing * (lse - total / (num_items - 1))
  return ce


def _tiled_ce_fwd(h: jax.Array, w_tiles: jax.Array, b_tiles: jax.Array,
                  targets: jax.Array, num_items: int, cdt: np.dtype,
                  smoothing: float) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Scan over tiles with an online logsumexp; keeps only lse [N] for bwd.

  With label smoothing eps it also sums the real items' logits:
  ce = (1-eps)(lse - z_t) + eps(lse - sum_real z / (V-1)).
  """
  m, s, true, total = _scan_stats(h, w_tiles, b_tiles, targets, num_items,
                                  cdt, smoothing)
  lse = m + jnp.log(s)
  ce = _ce_from_stats(lse, true, total, num_items, smoothing)
  return ce, (h, w_tiles, b_tiles, targets, lse)


def _scan_grads(h: jax.Array, w_tiles: jax.Array, b_tiles: jax.Array,
                targets: jax.Array, lse: jax.Array, g: jax.Array,
                num_items: int, cdt: np.dtype, smoothing: float,
                offset: Any = 0, rows: int | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dh [N, C] float32, dw [K, T, C], db [K, T]) over the given tiles,
  recomputing each tile's logits:
  dlogits = g * (softmax - (1-eps) onehot - eps/(V-1) on real items)."""
  num_tiles, tile, _ = w_tiles.shape
  h_c = h.astype(cdt)
  g = g.astype(common.F32)

  def body(dh, xs):
    k, w_tile, b_tile = xs
    ids, valid = _tile_ids(k, tile, num_items, offset, rows)
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
  return dh, dw, db


def _tiled_ce_bwd(num_items: int, cdt: np.dtype, smoothing: float,
                  res: tuple[jax.Array, ...],
                  g: jax.Array) -> tuple[jax.Array | None, ...]:
  h, w_tiles, b_tiles, targets, lse = res
  dh, dw, db = _scan_grads(h, w_tiles, b_tiles, targets, lse, g, num_items,
                           cdt, smoothing)
  # Integer targets get no cotangent.
  return (dh.astype(h.dtype), dw.astype(w_tiles.dtype),
          db.astype(b_tiles.dtype), None)


_tiled_ce.defvjp(_tiled_ce_fwd, _tiled_ce_bwd)


# ------------------------------------------------------- sharded over model
#
# With the table split by rows over the mesh's `model` axis, each shard
# scans only its own rows (ids offset by its index) and the per-token
# statistics are combined with pmax / psum over `model`: no shard ever
# holds another's rows or a [tokens, V] matrix. Tokens stay split over
# `data`; a table's gradient sums its shard's tokens over `data`.


def sharded_softmax_cross_entropy(h: jax.Array, w: jax.Array, b: jax.Array,
                                  targets: jax.Array, mask: jax.Array, *,
                                  model_shards: int, chunk_size: int = 16384,
                                  label_smoothing: float = 0.0,
                                  logits_dtype: Any = None) -> jax.Array:
  """`softmax_cross_entropy` with w and b split by rows over the `model`
  axis of the mesh being traced under (`model_shards` of them; V must be a
  multiple). Same value and gradients, up to float rounding."""
  common.check_output_layer(h, w, b)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: expected >= 1")
  v = w.shape[0]
  if v % model_shards:
    raise ValueError(f"{v} output rows do not split over {model_shards} "
                     "model shards")
  h, targets, mask = common.flatten(h, targets, mask)
  ce = _sharded_ce(h, w, b, targets, v, model_shards, chunk_size,
                   common.compute_dtype(h, logits_dtype),
                   float(label_smoothing))
  return common.masked_mean(ce, targets, mask)


def _local_tiles(w: jax.Array, b: jax.Array, chunk_size: int
                 ) -> tuple[jax.Array, jax.Array]:
  rows, c = w.shape
  num_tiles = -(-rows // chunk_size)
  tile = -(-rows // num_tiles)
  pad = num_tiles * tile - rows
  return (jnp.pad(w, ((0, pad), (0, 0))).reshape(num_tiles, tile, c),
          jnp.pad(b, (0, pad)).reshape(num_tiles, tile))


def _sharded_specs() -> dict[str, P]:
  return {"tokens": P(sharding.DATA), "h": P(sharding.DATA, None),
          "w": P(sharding.MODEL, None), "b": P(sharding.MODEL)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _sharded_ce(h: jax.Array, w: jax.Array, b: jax.Array, targets: jax.Array,
                num_items: int, shards: int, chunk: int, cdt: np.dtype,
                smoothing: float) -> jax.Array:
  return _sharded_ce_fwd(h, w, b, targets, num_items, shards, chunk, cdt,
                         smoothing)[0]


def _sharded_ce_fwd(h, w, b, targets, num_items, shards, chunk, cdt,
                    smoothing):
  sp = _sharded_specs()
  rows = num_items // shards

  def local(h, w, b, targets):
    offset = jax.lax.axis_index(sharding.MODEL) * rows
    w_tiles, b_tiles = _local_tiles(w, b, chunk)
    m, s, true, total = _scan_stats(h, w_tiles, b_tiles, targets, num_items,
                                    cdt, smoothing, offset, rows)
    m_all = jax.lax.pmax(m, sharding.MODEL)
    # A shard none of whose rows is real (only padding 0) has m = -inf.
    s = jax.lax.psum(jnp.where(jnp.isfinite(m), s * jnp.exp(m - m_all), 0.0),
                     sharding.MODEL)
    true = jax.lax.psum(true, sharding.MODEL)
    total = jax.lax.psum(total, sharding.MODEL)
    lse = m_all + jnp.log(s)
    return _ce_from_stats(lse, true, total, num_items, smoothing), lse

  ce, lse = sharding.shard_map(
      local, in_specs=(sp["h"], sp["w"], sp["b"], sp["tokens"]),
      out_specs=(sp["tokens"], sp["tokens"]))(h, w, b, targets)
  return ce, (h, w, b, targets, lse)


def _sharded_ce_bwd(num_items, shards, chunk, cdt, smoothing, res, g):
  h, w, b, targets, lse = res
  sp = _sharded_specs()
  rows = num_items // shards

  def local(h, w, b, targets, lse, g):
    offset = jax.lax.axis_index(sharding.MODEL) * rows
    w_tiles, b_tiles = _local_tiles(w, b, chunk)
    dh, dw, db = _scan_grads(h, w_tiles, b_tiles, targets, lse, g,
                             num_items, cdt, smoothing, offset, rows)
    # dh sums every shard's items; a shard's rows sum every data shard's
    # tokens.
    dh = jax.lax.psum(dh, sharding.MODEL)
    dw = jax.lax.psum(dw.reshape(-1, w.shape[1])[:rows], sharding.DATA)
    db = jax.lax.psum(db.reshape(-1)[:rows], sharding.DATA)
    return dh.astype(h.dtype), dw.astype(w.dtype), db.astype(b.dtype)

  dh, dw, db = sharding.shard_map(
      local, in_specs=(sp["h"], sp["w"], sp["b"], sp["tokens"], sp["tokens"],
                       sp["tokens"]),
      out_specs=(sp["h"], sp["w"], sp["b"]))(h, w, b, targets, lse, g)
  return dh, dw, db, None


_sharded_ce.defvjp(_sharded_ce_fwd, _sharded_ce_bwd)
