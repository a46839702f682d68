"""Samplers over item ids and the sampled softmax with logQ correction.

Conventions (padding, masking, dtypes) are in `softmax_common`.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.errors import JaxrecError
from jaxrec.heads import softmax_common as common

SAMPLERS = ("uniform", "log_uniform", "unigram")
# Samples are drawn by inverse CDF on 32 random bits: float32 CDFs lose the
# tail of a million-item catalogue (eps 6e-8 near 1.0), 2**-32 steps do not.
_BITS = 2**32


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
  return Sampler(log_q=jnp.asarray(log_q, common.F32),
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
  common.check_output_layer(h, w, b)
  if num_samples < 1:
    raise ValueError(f"num_samples={num_samples}: expected >= 1")
  if isinstance(sampler, str):
    sampler = make_sampler(sampler, w.shape[0], item_counts)
  if sampler.num_items != w.shape[0]:
    raise ValueError(f"sampler covers {sampler.num_items} ids but the "
                     f"output layer has {w.shape[0]}")
  h, targets, mask = common.flatten(h, targets, mask)
  cdt = common.compute_dtype(h, logits_dtype)
  h_c = h.astype(cdt)
  ids = sampler.sample(rng, num_samples)
  log_expected = jnp.log(jnp.asarray(num_samples, common.F32)) + sampler.log_q
  # A padding target has log q = -inf; read id 1 instead so an uncounted
  # token stays finite.
  safe_t = jnp.where(targets > 0, targets, 1)
  true = jnp.einsum("nc,nc->n", h_c, w[safe_t].astype(cdt),
                    preferred_element_type=common.F32)
  true = true + b[safe_t].astype(common.F32) - log_expected[safe_t]
  sampled = common.logits(h_c, w[ids], b[ids], cdt) - log_expected[ids]
  sampled = jnp.where(ids[None, :] == targets[:, None], -jnp.inf, sampled)
  logits = jnp.concatenate([true[:, None], sampled], axis=1)
  ce = jax.nn.logsumexp(logits, axis=1) - true
  return common.masked_mean(ce, targets, mask)
