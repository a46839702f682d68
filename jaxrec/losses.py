"""Output-layer losses: a chunked full softmax and a sampled softmax.

Every loss takes hidden states `h` [..., C] (compute dtype, maybe bfloat16),
the output layer `w` [V, C] and `b` [V] (float32 params), int targets [...]
and a float or bool `mask` [...], and returns the masked MEAN cross entropy
as a float32 scalar: sum over counted tokens / max(count, 1).

Item id 0 is padding and never a class: its logit is -inf in every softmax,
and a token whose target is 0 is never counted, whatever its mask says.

With V in the millions the [N, V] logit matrix does not fit in memory, so
`softmax_cross_entropy` scans over item tiles with an online logsumexp and a
custom VJP that recomputes each tile's logits in the backward pass; peak
memory is O(N * chunk_size + V * C).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import TrainConfig
from jaxrec.errors import JaxrecError

SAMPLERS = ("uniform", "log_uniform", "unigram")
_F32 = jnp.float32
# Samples are drawn by inverse CDF on 32 random bits: float32 CDFs lose the
# tail of a million-item catalogue (eps 6e-8 near 1.0), 2**-32 steps do not.
_BITS = 2**32


# ----------------------------------------------------------------------------
# Shared helpers.


def _flatten(h: jax.Array, targets: jax.Array,
             mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Flattens leading dims to tokens: h [N, C], targets [N], mask [N]."""
  if targets.shape != h.shape[:-1] or mask.shape != targets.shape:
    raise ValueError(f"shapes do not match: h {h.shape}, targets "
                     f"{targets.shape}, mask {mask.shape}; expected h "
                     "[..., C] and targets, mask [...]")
  c = h.shape[-1]
  return (h.reshape(-1, c), targets.reshape(-1).astype(jnp.int32),
          mask.reshape(-1))


def _check_output_layer(h: jax.Array, w: jax.Array, b: jax.Array) -> None:
  if w.ndim != 2 or w.shape[1] != h.shape[-1] or b.shape != w.shape[:1]:
    raise ValueError(f"output layer shapes do not match: h {h.shape}, "
                     f"w {w.shape}, b {b.shape}; expected w [V, C], b [V]")
  if w.shape[0] < 2:
    raise ValueError(f"need V >= 2 (padding id 0 and one item), got {w.shape}")


def _masked_mean(ce: jax.Array, targets: jax.Array,
                 mask: jax.Array) -> jax.Array:
  """Mean of per-token `ce` over counted tokens (mask and a real target)."""
  weight = mask.astype(_F32) * (targets > 0)
  # where, not a product: an uncounted token's ce may be inf or nan.
  total = jnp.sum(jnp.where(weight > 0, ce * weight, 0.0))
  return total / jnp.maximum(jnp.sum(weight), 1.0)


def _compute_dtype(h: jax.Array, logits_dtype: Any) -> np.dtype:
  return jnp.dtype(h.dtype if logits_dtype is None else logits_dtype)


def _logits(h_c: jax.Array, w: jax.Array, b: jax.Array,
            cdt: np.dtype) -> jax.Array:
  """h_c [N, C] x w [T, C] -> float32 [N, T]: matmul in cdt, f32 accumulate."""
  out = jnp.einsum("nc,tc->nt", h_c, w.astype(cdt),
                   preferred_element_type=_F32)
  return out + b.astype(_F32)


# ----------------------------------------------------------------------------
# Full softmax.


def naive_softmax_cross_entropy(h: jax.Array,
                                w: jax.Array,
                                b: jax.Array,
                                targets: jax.Array,
                                mask: jax.Array,
                                *,
                                logits_dtype: Any = None) -> jax.Array:
  """Full softmax cross entropy that materialises all [N, V] logits.

  The reference for the chunked version, and fine for a small catalogue.
  """
  _check_output_layer(h, w, b)
  h, targets, mask = _flatten(h, targets, mask)
  cdt = _compute_dtype(h, logits_dtype)
  logits = _logits(h.astype(cdt), w, b, cdt)
  # The true logit is read before excluding id 0 so that a (never counted)
  # padding target gives a finite value rather than inf.
  true = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
  logits = logits.at[:, 0].set(-jnp.inf)
  ce = jax.nn.logsumexp(logits, axis=1) - true
  return _masked_mean(ce, targets, mask)


def softmax_cross_entropy(h: jax.Array,
                          w: jax.Array,
                          b: jax.Array,
                          targets: jax.Array,
                          mask: jax.Array,
                          *,
                          chunk_size: int = 16384,
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
    logits_dtype: dtype of the matmul operands; None = h's dtype. The
      matmuls accumulate, and the logsumexp runs, in float32 either way.

  Returns:
    The masked mean cross entropy, a float32 scalar.
  """
  _check_output_layer(h, w, b)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: expected >= 1")
  h, targets, mask = _flatten(h, targets, mask)
  v, c = w.shape
  num_tiles = -(-v // chunk_size)
  tile = -(-v // num_tiles)
  pad = num_tiles * tile - v
  # Padding outside the custom VJP: jnp.pad's transpose drops the padded
  # rows' gradients for free.
  w_tiles = jnp.pad(w, ((0, pad), (0, 0))).reshape(num_tiles, tile, c)
  b_tiles = jnp.pad(b, (0, pad)).reshape(num_tiles, tile)
  ce = _tiled_ce(h, w_tiles, b_tiles, targets, v,
                 _compute_dtype(h, logits_dtype))
  return _masked_mean(ce, targets, mask)


def _tile_ids(k: jax.Array, tile: int, num_items: int) -> tuple[jax.Array,
                                                               jax.Array]:
  """Item ids of tile k, and which of them are real classes."""
  ids = k * tile + jnp.arange(tile, dtype=jnp.int32)
  return ids, (ids > 0) & (ids < num_items)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _tiled_ce(h: jax.Array, w_tiles: jax.Array, b_tiles: jax.Array,
              targets: jax.Array, num_items: int, cdt: np.dtype) -> jax.Array:
  """Per-token cross entropy [N] over tiled items (w_tiles [K, T, C])."""
  return _tiled_ce_fwd(h, w_tiles, b_tiles, targets, num_items, cdt)[0]


def _tiled_ce_fwd(h: jax.Array, w_tiles: jax.Array, b_tiles: jax.Array,
                  targets: jax.Array, num_items: int,
                  cdt: np.dtype) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Scan over tiles with an online logsumexp; keeps only lse [N] for bwd."""
  n = h.shape[0]
  num_tiles, tile, _ = w_tiles.shape
  h_c = h.astype(cdt)

  def body(carry, xs):
    m, s, true = carry
    k, w_tile, b_tile = xs
    ids, valid = _tile_ids(k, tile, num_items)
    logits = _logits(h_c, w_tile, b_tile, cdt)
    # Read before the -inf exclusion, as in the naive version.
    hit = ids[None, :] == targets[:, None]
    true = true + jnp.sum(jnp.where(hit, logits, 0.0), axis=1)
    logits = jnp.where(valid[None, :], logits, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    # Until a row has seen a real item its max is -inf; shifting by 0 then
    # avoids exp(-inf - -inf) = nan.
    shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    s = s * jnp.exp(m - shift) + jnp.sum(
        jnp.exp(logits - shift[:, None]), axis=1)
    return (m_new, s, true), None

  init = (jnp.full((n,), -jnp.inf, _F32), jnp.zeros((n,), _F32),
          jnp.zeros((n,), _F32))
  xs = (jnp.arange(num_tiles, dtype=jnp.int32), w_tiles, b_tiles)
  (m, s, true), _ = jax.lax.scan(body, init, xs)
  lse = m + jnp.log(s)
  return lse - true, (h, w_tiles, b_tiles, targets, lse)


def _tiled_ce_bwd(num_items: int, cdt: np.dtype, res: tuple[jax.Array, ...],
                  g: jax.Array) -> tuple[jax.Array | None, ...]:
  """Recomputes each tile's logits: dlogits = g * (softmax - onehot)."""
  h, w_tiles, b_tiles, targets, lse = res
  num_tiles, tile, _ = w_tiles.shape
  h_c = h.astype(cdt)
  g = g.astype(_F32)

  def body(dh, xs):
    k, w_tile, b_tile = xs
    ids, valid = _tile_ids(k, tile, num_items)
    logits = _logits(h_c, w_tile, b_tile, cdt)
    p = jnp.where(valid[None, :], jnp.exp(logits - lse[:, None]), 0.0)
    hit = ids[None, :] == targets[:, None]
    dlogits = g[:, None] * (p - hit)
    d_c = dlogits.astype(cdt)
    dh = dh + jnp.einsum("nt,tc->nc", d_c, w_tile.astype(cdt),
                         preferred_element_type=_F32)
    dw = jnp.einsum("nt,nc->tc", d_c, h_c, preferred_element_type=_F32)
    return dh, (dw, jnp.sum(dlogits, axis=0))

  xs = (jnp.arange(num_tiles, dtype=jnp.int32), w_tiles, b_tiles)
  dh, (dw, db) = jax.lax.scan(body, jnp.zeros(h.shape, _F32), xs)
  # Integer targets get no cotangent.
  return (dh.astype(h.dtype), dw.astype(w_tiles.dtype),
          db.astype(b_tiles.dtype), None)


_tiled_ce.defvjp(_tiled_ce_fwd, _tiled_ce_bwd)


# ----------------------------------------------------------------------------
# Samplers and the sampled softmax.


@flax.struct.dataclass
class Sampler:
  """A distribution q over item ids 1..V-1 (q(0) = 0), sampled on device.

  A pytree of arrays only, so it can be passed into a jitted step and every
  sampler over V items shares one compilation. Build it once on the host
  with `make_sampler`.
  """
  log_q: jax.Array  # [V] float32: log q(id); -inf for the padding id 0.
  # [V-1] uint32: floor(CDF(id) * 2**32) for ids 0..V-2. A draw u of 32
  # random bits picks the id with boundaries[id-1] <= u < boundaries[id].
  boundaries: jax.Array

  @property
  def num_items(self) -> int:
    return self.log_q.shape[0]

  def sample(self, rng: jax.Array, n: int) -> jax.Array:
    """`n` int32 ids in 1..V-1, drawn from q with replacement."""
    u = jax.random.bits(rng, (n,), jnp.uint32)
    ids = jnp.searchsorted(self.boundaries, u, side="right")
    # boundaries[0] = 0 already forces ids >= 1; the clip is belt and braces.
    return jnp.clip(ids, 1, self.num_items - 1).astype(jnp.int32)


def sampler_probs(name: str, num_items: int, item_counts: Any = None, *,
                  smoothing: float = 1.0) -> np.ndarray:
  """q as float64 [V] with q[0] = 0 and q[1:] summing to 1.

  uniform: 1 / (V-1). log_uniform: Zipfian for ids sorted by descending
  popularity, q(id) = log((id+1)/id) / log(V) (TF's
  log_uniform_candidate_sampler shifted past the padding id). unigram:
  proportional to item_counts[id] + smoothing, so unseen items keep a
  nonzero probability.
  """
  if name not in SAMPLERS:
    raise JaxrecError(f"train.sampler={name!r}: expected one of "
                      f"{list(SAMPLERS)}")
  if num_items < 2:
    raise JaxrecError(f"num_items={num_items}: a sampler needs at least 2 "
                      "(padding id 0 and one item)")
  ids = np.arange(1, num_items, dtype=np.float64)
  if name == "uniform":
    q = np.ones_like(ids)
  elif name == "log_uniform":
    q = np.log1p(1.0 / ids)  # Sums (telescopes) to log(V).
  else:
    q = _unigram_weights(num_items, item_counts, smoothing)
  return np.concatenate([[0.0], q / q.sum()])


def _unigram_weights(num_items: int, item_counts: Any,
                     smoothing: float) -> np.ndarray:
  if item_counts is None:
    raise JaxrecError("train.sampler='unigram' needs the training item "
                      "counts (item_counts)")
  counts = np.asarray(item_counts, dtype=np.float64)
  if counts.shape != (num_items,):
    raise JaxrecError(f"item_counts has shape {counts.shape}; expected "
                      f"({num_items},), one count per item id")
  if np.any(counts < 0) or not np.all(np.isfinite(counts)):
    raise JaxrecError("item_counts: expected finite counts >= 0")
  if smoothing < 0:
    raise JaxrecError(f"smoothing={smoothing}: expected >= 0")
  q = counts[1:] + smoothing
  if q.sum() <= 0:
    raise JaxrecError("item_counts: all zero and smoothing=0; every item "
                      "would have probability 0")
  return q


def make_sampler(name: str, num_items: int, item_counts: Any = None, *,
                 smoothing: float = 1.0) -> Sampler:
  """Builds a `Sampler` (see `sampler_probs` for the distributions).

  Runs on the host in float64 (item_counts must be concrete, e.g. the numpy
  `SequenceData.item_counts`); build it once, outside the jitted step.
  """
  q = sampler_probs(name, num_items, item_counts, smoothing=smoothing)
  with np.errstate(divide="ignore"):
    log_q = np.log(q)  # log(0) = -inf for the padding id.
  cdf = np.cumsum(q[:-1])
  boundaries = np.minimum(np.floor(cdf * _BITS), _BITS - 1).astype(np.uint32)
  return Sampler(log_q=jnp.asarray(log_q, _F32),
                 boundaries=jnp.asarray(boundaries))


def sampled_softmax_cross_entropy(h: jax.Array,
                                  w: jax.Array,
                                  b: jax.Array,
                                  targets: jax.Array,
                                  mask: jax.Array,
                                  rng: jax.Array,
                                  *,
                                  num_samples: int,
                                  sampler: Sampler | str,
                                  item_counts: Any = None,
                                  logits_dtype: Any = None) -> jax.Array:
  """Sampled softmax with one shared set of negatives per call.

  Draws `num_samples` ids from `sampler.sample(rng, num_samples)` (with
  replacement) and, per token, takes the cross entropy over [true, samples]
  with TF's corrections: every logit, the true one included, minus
  log(num_samples * q(id)) (subtract_log_q), and a sample equal to the
  token's target set to -inf (remove_accidental_hits).

  Args:
    h, w, b, targets, mask: as `softmax_cross_entropy`.
    rng: a PRNG key for the negatives.
    num_samples: negatives per call.
    sampler: a `Sampler`, or a sampler name to build one now (host-side;
      pass a prebuilt `Sampler` inside jit).
    item_counts: [V] counts, only for building a 'unigram' sampler by name.
    logits_dtype: dtype of the matmul operands; None = h's dtype.

  Returns:
    The masked mean sampled cross entropy, a float32 scalar.
  """
  _check_output_layer(h, w, b)
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples}: expected >= 1")
  if isinstance(sampler, str):
    sampler = make_sampler(sampler, w.shape[0], item_counts)
  if sampler.num_items != w.shape[0]:
    raise ValueError(f"sampler covers {sampler.num_items} ids but the "
                     f"output layer has {w.shape[0]}")
  h, targets, mask = _flatten(h, targets, mask)
  cdt = _compute_dtype(h, logits_dtype)
  h_c = h.astype(cdt)
  ids = sampler.sample(rng, num_samples)
  log_expected = jnp.log(jnp.asarray(num_samples, _F32)) + sampler.log_q
  # A padding target has log q = -inf; read id 1 instead so an uncounted
  # token stays finite.
  safe_t = jnp.where(targets > 0, targets, 1)
  true = jnp.einsum("nc,nc->n", h_c, w[safe_t].astype(cdt),
                    preferred_element_type=_F32)
  true = true + b[safe_t].astype(_F32) - log_expected[safe_t]
  sampled = _logits(h_c, w[ids], b[ids], cdt) - log_expected[ids]
  sampled = jnp.where(ids[None, :] == targets[:, None], -jnp.inf, sampled)
  logits = jnp.concatenate([true[:, None], sampled], axis=1)
  ce = jax.nn.logsumexp(logits, axis=1) - true
  return _masked_mean(ce, targets, mask)


# ----------------------------------------------------------------------------
# Dispatcher.


def output_loss(h: jax.Array,
                w: jax.Array,
                b: jax.Array,
                targets: jax.Array,
                mask: jax.Array,
                rng: jax.Array | None,
                cfg_train: TrainConfig,
                sampler: Sampler | None = None) -> jax.Array:
  """The training loss `cfg_train.loss` selects: 'full' or 'sampled'.

  'sampled' uses `sampler` (build it once with `make_sampler`); without one
  it builds `cfg_train.sampler` here, which 'unigram' cannot (no counts).
  """
  if cfg_train.loss == "full":
    return softmax_cross_entropy(h, w, b, targets, mask,
                                 chunk_size=cfg_train.loss_chunk)
  if cfg_train.loss == "sampled":
    if rng is None:
      raise ValueError("train.loss='sampled' needs an rng key")
    if sampler is None:
      sampler = make_sampler(cfg_train.sampler, w.shape[0])
    return sampled_softmax_cross_entropy(h, w, b, targets, mask, rng,
                                         num_samples=cfg_train.num_samples,
                                         sampler=sampler)
  raise JaxrecError(f"train.loss={cfg_train.loss!r}: expected one of "
                    "['full', 'sampled']")
