"""CpRec's two-level tree softmax over frequency bands (`head.name=tree_softmax`).

Items are cut into n bands by training frequency (`jaxrec.nn.bands`; band 0,
the head, holds ids 0..c_1-1). The head cluster's softmax is extended with
one token per tail band; a tail band has its own small softmax:

  head/head_kernel        [k_0 + n - 1, C]  head items, then band tokens
  head/head_bias          [k_0 + n - 1]
  head/band_j/projection  [C, d_j]          j = 1..n-1
  head/band_j/kernel      [k_j, d_j]
  head/band_j/bias        [k_j]

d_j is the model's band width (`model.band_dims`, the input embedding's)
unless `head.tail_dims` gives the output tables their own widths (ours, not
the paper's; on the synthetic catalogue narrower output tables than input
ones cost accuracy: RESULTS.md, CpRec band widths).

  log p(i) = hl[i]                                     i in the head
           = hl[token_j] + log_softmax(h Q_j F_j^T + b_j)[i - c_j]   i in band j

with hl = log_softmax(h @ head_kernel^T + head_bias) (padding id 0 never a
class). The distribution is normalised exactly; scores are log-probabilities,
never raw tail logits.

- Training (`loss`): the head softmax over k_0 + n - 1 entries (chunked,
  `jaxrec.heads.chunked_softmax`) plus, for a tail target, its own band's
  softmax only. Tokens are sorted by band and cut into chunks of
  `head.token_chunk`; a chunk computes band j only if it holds a band-j
  target (`lax.cond`), so the cost per token is between O(k_0) and O(V),
  and no [tokens, V] matrix exists.
- Full-ranking evaluation (`prepare` + `tile_scores`): exact normalised
  log-probabilities of every item; each band's normaliser is a logsumexp
  over item tiles, computed once per batch.
- Exact early-exit top-N (`top_n`): let tau be a row's N-th best head-item
  log-probability. A tail band's best item for that row (its token plus
  max logit minus the band's normaliser, cheap to get) either reaches tau
  or the band cannot enter the row's top N; `top_k`, the costly part, runs
  only on the (row, band) pairs that reach it. The result equals the full
  computation bit for bit. The band token alone (our first bound) skips
  only where a band's whole mass is below tau, which a band holding a
  fifth of the mass never is (RESULTS.md, CpRec at C=64).
- Logit-skipping top-N (`top_n(..., index=search_index(params, cfg))`):
  the exit above still computes every band's logits. With an index of
  each band's output rows cut into clusters, a bound on the band's best
  item reads only the cluster summaries (Jensen's inequality below the
  normaliser, the clusters' radii above the max), so a band's logits are
  computed only for the rows the bound cannot rule out.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import HeadConfig, option, require
from jaxrec.errors import JaxrecError
from jaxrec.heads.head import Head
from jaxrec.heads import chunked_softmax
from jaxrec.heads import softmax_common as common
from jaxrec.nn import bands
from jaxrec.nn.conv import weight_init

Params = dict[str, Any]
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TreeSoftmaxConfig(HeadConfig):
  """The bands are the model's (`model.num_bands`, `model.band_cutoffs`,
  `model.band_dims`)."""
  name: str = option("tree_softmax", "output head, one of "
                     "jaxrec.heads.names()")
  token_chunk: int = option(256, "training tokens per chunk of the tail "
                            "softmaxes (a chunk computes only the bands of "
                            "its targets)")
  tail_dims: tuple[int, ...] = option(
      (), "width d_j of each tail band's output table, bands 1..n-1 (the "
      "head cluster reads h); empty: the model's band_dims")
  uses_bands = True  # Class attribute: Config.fit_data resolves the bands.

  def validate(self) -> None:
    require(self.token_chunk >= 1, "head.token_chunk", self.token_chunk,
            ">= 1")
    require(all(d >= 1 for d in self.tail_dims), "head.tail_dims",
            list(self.tail_dims), "positive widths")

  def check_model(self, model: Any) -> None:
    if self.tail_dims and len(self.tail_dims) != model.num_bands - 1:
      raise JaxrecError(
          f"head.tail_dims={list(self.tail_dims)}: expected "
          f"{model.num_bands - 1} widths, one per tail band of "
          f"model.num_bands={model.num_bands}")

  def check_train(self, train: Any) -> None:
    if train.loss != "full" or train.label_smoothing:
      raise JaxrecError(
          f"head.name='tree_softmax': trains its exact loss only; set "
          f"train.loss='full' (got {train.loss!r}) and train.label_smoothing"
          f"=0 (got {train.label_smoothing})")


class Layout(NamedTuple):
  """The static band layout of a model config."""
  cutoffs: tuple[int, ...]  # c_1..c_{n-1}
  sizes: tuple[int, ...]  # k_0..k_{n-1} (k_0 includes padding id 0)
  dims: tuple[int, ...]  # d_0..d_{n-1} (d_0 unused: the head reads h)

  @property
  def num_tail(self) -> int:
    return len(self.cutoffs)

  def start(self, j: int) -> int:
    return 0 if j == 0 else self.cutoffs[j - 1]


def layout(model_cfg: Any, head_cfg: TreeSoftmaxConfig) -> Layout:
  """The model's bands, with output widths from `head.tail_dims` when
  given."""
  if model_cfg.num_bands < 2:
    raise JaxrecError("head.name='tree_softmax': needs model.num_bands >= 2 "
                      f"(got {model_cfg.num_bands})")
  bands.check_cutoffs(model_cfg.band_cutoffs, model_cfg.num_bands,
                      model_cfg.num_items)
  head_cfg.check_model(model_cfg)
  dims = bands.band_dims(model_cfg.embed_dim, model_cfg.num_bands,
                         model_cfg.band_dims)
  if head_cfg.tail_dims:
    dims = (dims[0], *head_cfg.tail_dims)
  return Layout(tuple(model_cfg.band_cutoffs),
                bands.band_sizes(model_cfg.band_cutoffs, model_cfg.num_items),
                dims)


def init(cfg: TreeSoftmaxConfig, model_cfg: Any, rng: jax.Array) -> Params:
  lay = layout(model_cfg, cfg)
  c = model_cfg.embed_dim
  width = lay.sizes[0] + lay.num_tail
  keys = jax.random.split(rng, 1 + 2 * lay.num_tail)
  out = {"head_kernel": weight_init(keys[0], (width, c)),
         "head_bias": jnp.zeros((width,))}
  for j in range(1, lay.num_tail + 1):
    d = lay.dims[j]
    out[f"band_{j}"] = {
        # Unit-variance projection: h Q_j keeps h's scale at any d_j.
        "projection": weight_init(keys[2 * j - 1], (c, d)) * (
            1.0 / (0.02 * c ** 0.5)),
        "kernel": weight_init(keys[2 * j], (lay.sizes[j], d)),
        "bias": jnp.zeros((lay.sizes[j],))}
  return out


# ------------------------------------------------------------------ pieces


def head_log_probs(head: Params, h: jax.Array) -> jax.Array:
  """hl [B, k_0 + n - 1]: log-probabilities of head items and band tokens
  (padding id 0 at -inf)."""
  logits = common.logits(h, head["head_kernel"], head["head_bias"], h.dtype)
  return jax.nn.log_softmax(logits.at[:, 0].set(-jnp.inf), axis=-1)


def band_logits(band: Params, h: jax.Array,
                rows: jax.Array | None = None) -> jax.Array:
  """Unnormalised logits of a tail band: [B, k_j], or of its `rows` ([S]
  shared by the batch -> [B, S], or [B, N] per row -> [B, N]), taken with
  fill: a row outside the band reads zeros."""
  q = jnp.einsum("bc,cd->bd", h, band["projection"].astype(h.dtype),
                 preferred_element_type=F32)
  kernel, bias = band["kernel"], band["bias"]
  if rows is not None:
    kernel = jnp.take(kernel, rows, axis=0, mode="fill", fill_value=0)
    bias = jnp.take(bias, rows, axis=0, mode="fill", fill_value=0)
  spec = "bd,bnd->bn" if kernel.ndim == 3 else "bd,kd->bk"
  return jnp.einsum(spec, q, kernel, preferred_element_type=F32) + bias


def band_log_probs(band: Params, h: jax.Array,
                   token_log_prob: jax.Array) -> jax.Array:
  """log p of every item of a band [B, k_j]: token + within-band softmax."""
  return token_log_prob[:, None] + jax.nn.log_softmax(band_logits(band, h),
                                                      axis=-1)


def band_logsumexp(band: Params, h: jax.Array, size: int,
                   tile: int) -> jax.Array:
  """logsumexp [B] of a band's logits, over item tiles (online)."""
  tile = min(tile, size)
  num_tiles = -(-size // tile)

  def step(acc, start):
    rows = start + jnp.arange(tile)
    z = jnp.where(rows[None, :] < size, band_logits(band, h, rows), -jnp.inf)
    return jnp.logaddexp(acc, jax.nn.logsumexp(z, axis=-1)), None

  init_acc = jnp.full((h.shape[0],), -jnp.inf, F32)
  out, _ = jax.lax.scan(step, init_acc, jnp.arange(num_tiles) * tile)
  return out


# ---------------------------------------------------------------- training


def head_targets(targets: jax.Array, lay: Layout) -> jax.Array:
  """A target's entry in the head softmax: itself, or its band's token."""
  band = bands.band_of(targets, lay.cutoffs)
  return jnp.where(band == 0, targets, lay.sizes[0] + band - 1)


def tail_nll(head: Params, h: jax.Array, targets: jax.Array, lay: Layout,
             chunk: int) -> jax.Array:
  """-log p(target | its band) per token [N] (0 for head targets).

  Tokens are sorted by band so a chunk holds few bands, and a chunk computes
  band j only if one of its targets is in band j.
  """
  n = h.shape[0]
  band = bands.band_of(targets, lay.cutoffs)
  order = jnp.argsort(band, stable=True)
  chunk = min(chunk, n)
  padded = -(-n // chunk) * chunk

  def sorted_chunks(x):
    x = jnp.take(x, order, axis=0)
    x = jnp.pad(x, [(0, padded - n)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((padded // chunk, chunk) + x.shape[1:])

  def one_band(j, h_c, t_c, b_c):
    def compute(h_c, t_c, b_c):
      z = band_logits(head[f"band_{j}"], h_c)
      local = jnp.clip(t_c - lay.start(j), 0, lay.sizes[j] - 1)
      true = jnp.take_along_axis(z, local[:, None], axis=1)[:, 0]
      return jnp.where(b_c == j, jax.nn.logsumexp(z, axis=-1) - true, 0.0)
    return jax.lax.cond(jnp.any(b_c == j), compute,
                        lambda *_: jnp.zeros(chunk, F32), h_c, t_c, b_c)

  @jax.checkpoint  # Keeps no [chunk, k_j] logits for the backward pass.
  def chunk_nll(h_c, t_c, b_c):
    return sum(one_band(j, h_c, t_c, b_c)
               for j in range(1, lay.num_tail + 1))

  # Padding rows carry band 0: no band computes for them.
  nll = jax.lax.map(lambda a: chunk_nll(*a),
                    (sorted_chunks(h), sorted_chunks(targets),
                     sorted_chunks(band)))
  return jnp.zeros(n, F32).at[order].set(nll.reshape(-1)[:n])


def loss(params: Params, cfg: Any, h: jax.Array, targets: jax.Array,
         mask: jax.Array, *, rng: jax.Array | None = None,
         sampler: Any = None) -> jax.Array:
  """Masked mean -log p(target): the head softmax plus the target's band."""
  del rng, sampler
  cfg.head.check_train(cfg.train)
  lay = layout(cfg.model, cfg.head)
  head = params["head"]
  h, targets, mask = common.flatten(h, targets, mask)
  head_ce = chunked_softmax.softmax_cross_entropy(
      h, head["head_kernel"], head["head_bias"], head_targets(targets, lay),
      mask, chunk_size=cfg.train.loss_chunk)
  tail = tail_nll(head, h, targets, lay, cfg.head.token_chunk)
  return head_ce + common.masked_mean(tail, targets, mask)


# -------------------------------------------------------------- evaluation


class ScoreContext(NamedTuple):
  """Per batch, computed once: what every item tile needs."""
  h: jax.Array  # [B, C]
  head_log_probs: jax.Array  # [B, k_0 + n - 1]
  band_lse: jax.Array  # [B, n - 1]: each tail band's normaliser.


def prepare(params: Params, cfg: Any, h: jax.Array) -> ScoreContext:
  lay = layout(cfg.model, cfg.head)
  head = params["head"]
  lse = [band_logsumexp(head[f"band_{j}"], h, lay.sizes[j],
                        cfg.train.loss_chunk)
         for j in range(1, lay.num_tail + 1)]
  return ScoreContext(h, head_log_probs(head, h), jnp.stack(lse, axis=1))


def _log_probs_of(params: Params, cfg: Any, ctx: ScoreContext,
                  ids: jax.Array) -> jax.Array:
  """log p of `ids`: [size] shared by the batch, or [B, N] per row."""
  lay = layout(cfg.model, cfg.head)
  head = params["head"]
  band = bands.band_of(ids, lay.cutoffs)
  head_index = jnp.clip(ids, 0, lay.sizes[0] - 1)
  hl = ctx.head_log_probs
  if ids.ndim == 1:
    out = jnp.take(hl, head_index, axis=1)
  else:
    out = jnp.take_along_axis(hl, head_index, axis=1)
  for j in range(1, lay.num_tail + 1):
    rows = ids - lay.start(j)
    scores = (band_logits(head[f"band_{j}"], ctx.h, rows)
              - ctx.band_lse[:, j - 1:j]
              + hl[:, lay.sizes[0] + j - 1:lay.sizes[0] + j])
    out = jnp.where(band == j, scores, out)
  return out


def tile_scores(params: Params, cfg: Any, ctx: ScoreContext,
                start: jax.Array, size: int) -> jax.Array:
  """Exact log-probabilities [B, size] of ids start..start+size-1."""
  return _log_probs_of(params, cfg, ctx, start + jnp.arange(size))


def item_scores(params: Params, cfg: Any, ctx: ScoreContext,
                ids: jax.Array) -> jax.Array:
  """Exact log-probabilities [B, N] of ids [B, N]."""
  return _log_probs_of(params, cfg, ctx, ids)


# ------------------------------------------------------------ top-N search


def full_log_probs(params: Params, cfg: Any, h: jax.Array) -> jax.Array:
  """log p of every item [B, V] in one piece (top-N's full computation and
  the test reference; small catalogues only)."""
  lay = layout(cfg.model, cfg.head)
  head = params["head"]
  hl = head_log_probs(head, h)
  parts = [hl[:, :lay.sizes[0]]]
  for j in range(1, lay.num_tail + 1):
    parts.append(band_log_probs(head[f"band_{j}"], h,
                                hl[:, lay.sizes[0] + j - 1]))
  return jnp.concatenate(parts, axis=1)


def _padded_top_k(scores: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """top_k that pads with -inf when there are fewer than n columns."""
  if scores.shape[1] < n:
    scores = jnp.pad(scores, ((0, 0), (0, n - scores.shape[1])),
                     constant_values=-jnp.inf)
  return jax.lax.top_k(scores, n)


class _Scored(NamedTuple):
  """Every band's logits and normaliser, and the head items' top n."""
  hl: jax.Array  # [B, k_0 + tail bands]
  scores: jax.Array  # [B, n] the head items' top n log-probabilities
  ids: jax.Array  # [B, n]
  logits: tuple[jax.Array, ...]  # [B, k_j] per tail band
  lse: tuple[jax.Array, ...]  # [B] per tail band
  best: jax.Array  # [B, tail bands] each band's best item's log-prob


def _score(params: Params, lay: Layout, h: jax.Array, n: int) -> _Scored:
  head = params["head"]
  hl = head_log_probs(head, h)
  scores, ids = _padded_top_k(hl[:, :lay.sizes[0]], n)
  logits, lse, best = [], [], []
  for j in range(1, lay.num_tail + 1):
    z = band_logits(head[f"band_{j}"], h)
    norm = jax.nn.logsumexp(z, axis=-1)
    token = hl[:, lay.sizes[0] + j - 1]
    logits.append(z)
    lse.append(norm)
    # Bit for bit the log-probability `_merge` gives the band's top item.
    best.append(token + (jnp.max(z, axis=-1) - norm))
  return _Scored(hl, scores, ids, tuple(logits), tuple(lse),
                 jnp.stack(best, axis=1))


def _merge(lay: Layout, n: int, s: _Scored,
           rows: tuple[Any, ...]) -> tuple[jax.Array, jax.Array]:
  """The top n over the head's and the chosen rows of each band's top n.

  rows[j-1] is band j's rows: `...` every row, None none, or an index
  array (padding entries >= B, dropped).
  """
  batch = s.scores.shape[0]
  cand_scores, cand_ids = [s.scores], [s.ids]
  for j, r in enumerate(rows, start=1):
    if r is None:
      continue
    pick = (lambda x: x) if r is ... else (
        lambda x: jnp.take(x, r, axis=0, mode="clip"))
    token = pick(s.hl[:, lay.sizes[0] + j - 1])[:, None]
    log_p = token + (pick(s.logits[j - 1]) - pick(s.lse[j - 1])[:, None])
    top, ids = _padded_top_k(log_p, n)
    ids = ids + lay.start(j)
    if r is not ...:
      top, ids = _scatter_rows(batch, r, top, ids)
    cand_scores.append(top)
    cand_ids.append(ids)
  return _best_of(cand_scores, cand_ids, n)


def _scatter_rows(batch: int, rows: jax.Array, top: jax.Array,
                  ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A band's top n of some rows back to [B, n]; unscored rows never win."""
  n = top.shape[1]
  top = jnp.full((batch, n), -jnp.inf, top.dtype).at[rows].set(
      top, mode="drop")
  ids = jnp.zeros((batch, n), ids.dtype).at[rows].set(ids, mode="drop")
  return top, ids


def _best_of(cand_scores: list[jax.Array], cand_ids: list[jax.Array],
             n: int) -> tuple[jax.Array, jax.Array]:
  # Candidates are in id order between bands, and top_k prefers the lower
  # index among ties, so ties break by id as in the full computation.
  best, pos = jax.lax.top_k(jnp.concatenate(cand_scores, axis=1), n)
  return best, jnp.take_along_axis(jnp.concatenate(cand_ids, axis=1), pos,
                                   axis=1)


def _bucket(rows: np.ndarray, batch: int) -> np.ndarray | None:
  """Row indices padded with `batch` to a power of two (few programs to
  compile), or None for no row."""
  if not rows.size:
    return None
  size = min(1 << (rows.size - 1).bit_length(), batch)
  return np.pad(rows, (0, size - rows.size), constant_values=batch)


@functools.partial(jax.jit, static_argnums=(1, 3))
def _score_jit(params: Params, cfg: Any, h: jax.Array, n: int) -> _Scored:
  return _score(params, layout(cfg.model, cfg.head), h, n)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merge_jit(lay: Layout, n: int, s: _Scored, rows: tuple[Any, ...]):
  return _merge(lay, n, s, rows)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merge_all_jit(lay: Layout, n: int, s: _Scored):
  return _merge(lay, n, s, (...,) * lay.num_tail)


# ------------------------------------------------ logit-skipping search

# Added to every bound: float32 rounding of the bound's sums (terms of
# magnitude ~10) is ~1e-5, so a bound this much too high costs a row's
# search now and then, and a rounding can never drop an item from a top n.
BOUND_SLACK = 1e-3


class BandIndex(NamedTuple):
  """A tail band's output rows cut into clusters (`search_index`)."""
  centroids: jax.Array  # [M, d_j] each cluster's mean row
  log_count: jax.Array  # [M] log of its number of rows (never empty)
  bias_mean: jax.Array  # [M] its rows' mean bias
  reach: jax.Array  # [M] its largest ||row - centroid||
  bias_max: jax.Array  # [M] its largest bias


def _kmeans(rows: np.ndarray, clusters: int, iters: int,
            seed: int) -> np.ndarray:
  """Cluster ids [k] of rows [k, d] (Lloyd's k-means; no empty cluster)."""
  rng = np.random.default_rng(seed)
  centroids = rows[rng.choice(len(rows), clusters, replace=False)]
  assign = np.zeros(len(rows), np.int64)
  for _ in range(iters):
    dist = ((rows ** 2).sum(1)[:, None] - 2 * rows @ centroids.T
            + (centroids ** 2).sum(1)[None])
    assign = dist.argmin(1)
    for g in range(clusters):
      if (assign == g).any():
        centroids[g] = rows[assign == g].mean(0)
  _, assign = np.unique(assign, return_inverse=True)  # Drop empty ids.
  return assign


def search_index(params: Params, cfg: Any, clusters: int = 256,
                 iters: int = 10, seed: int = 0) -> tuple[BandIndex, ...]:
  """Per tail band, its output rows cut into at most `clusters` clusters
  by k-means, with what the bound needs of each. Built once per params on
  the host (seconds for 10^4 rows); any clustering gives a valid bound, a
  tighter one rules out more rows. The bound holds only for the params it
  was built from: rebuild it after any update of the head (a stale index
  can rule out a row that belongs in the top n)."""
  lay = layout(cfg.model, cfg.head)
  out = []
  for j in range(1, lay.num_tail + 1):
    band = params["head"][f"band_{j}"]
    rows = np.asarray(band["kernel"], np.float64)
    bias = np.asarray(band["bias"], np.float64)
    assign = _kmeans(rows, min(clusters, len(rows)), iters, seed)
    groups = [np.flatnonzero(assign == g) for g in range(assign.max() + 1)]
    centroids = np.stack([rows[g].mean(0) for g in groups])
    reach = [np.linalg.norm(rows[g] - c, axis=1).max()
             for g, c in zip(groups, centroids)]
    out.append(BandIndex(
        jnp.asarray(centroids, F32),
        jnp.asarray(np.log([len(g) for g in groups]), F32),
        jnp.asarray([bias[g].mean() for g in groups], F32),
        jnp.asarray(reach, F32),
        jnp.asarray([bias[g].max() for g in groups], F32)))
  return tuple(out)


def band_bound(band: Params, index: BandIndex, h: jax.Array,
               token: jax.Array) -> jax.Array:
  """An upper bound [B] of the log-probability of a band's best item that
  reads no logit of the band.

  With z_i = q . w_i + b_i (q = h Q_j), cluster g's mean row c_g, and
  z_max, lse the band's max logit and normaliser:
    z_i <= q . c_g + ||q|| reach_g + bias_max_g     (Cauchy-Schwarz)
    lse >= logsumexp_g(log n_g + q . c_g + bias_mean_g)   (Jensen in each
                                                            cluster)
  and the best item's log-probability is token + z_max - lse <= token.
  """
  q = jnp.einsum("bc,cd->bd", h, band["projection"].astype(h.dtype),
                 preferred_element_type=F32)
  at_centroid = q @ index.centroids.T  # [B, M]
  norm = jnp.linalg.norm(q, axis=-1, keepdims=True)
  upper = jnp.max(at_centroid + norm * index.reach + index.bias_max, axis=1)
  lower = jax.nn.logsumexp(at_centroid + index.log_count + index.bias_mean,
                           axis=1)
  return token + jnp.minimum(upper - lower, 0.0) + BOUND_SLACK


class _Bounded(NamedTuple):
  """The head's top n and every tail band's bound, no tail logit."""
  hl: jax.Array
  scores: jax.Array
  ids: jax.Array
  bound: jax.Array  # [B, tail bands]


@functools.partial(jax.jit, static_argnums=(1, 4))
def _bound_jit(params: Params, cfg: Any, index: tuple[BandIndex, ...],
               h: jax.Array, n: int) -> _Bounded:
  lay = layout(cfg.model, cfg.head)
  hl = head_log_probs(params["head"], h)
  scores, ids = _padded_top_k(hl[:, :lay.sizes[0]], n)
  bound = [band_bound(params["head"][f"band_{j}"], index[j - 1], h,
                      hl[:, lay.sizes[0] + j - 1])
           for j in range(1, lay.num_tail + 1)]
  return _Bounded(hl, scores, ids, jnp.stack(bound, axis=1))


class _Gathered(NamedTuple):
  """One band's logits for the rows its bound could not rule out."""
  log_p: jax.Array  # [R, k_j] log-probabilities of the band's items
  best: jax.Array  # [R] the best of them


@functools.partial(jax.jit, static_argnums=(0,))
def _gathered_jit(lay: Layout, head: Params, h: jax.Array, b: _Bounded,
                  rows: tuple[Any, ...]) -> tuple[_Gathered | None, ...]:
  """Per band, the log-probabilities of its `rows` (an index array padded
  with entries >= B, or None): the only tail logits computed."""
  out = []
  for j, r in enumerate(rows, start=1):
    if r is None:
      out.append(None)
      continue
    z = band_logits(head[f"band_{j}"], jnp.take(h, r, axis=0, mode="clip"))
    token = jnp.take(b.hl[:, lay.sizes[0] + j - 1], r, mode="clip")
    log_p = token[:, None] + (z - jax.nn.logsumexp(z, axis=-1)[:, None])
    out.append(_Gathered(log_p, jnp.max(log_p, axis=-1)))
  return tuple(out)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _merge_gathered_jit(lay: Layout, n: int, b: _Bounded,
                        gathered: tuple[_Gathered | None, ...],
                        picks: tuple[Any, ...]):
  """The top n over the head's and each band's picked gathered rows:
  picks[j-1] is None or (positions in the gathered rows, their row ids
  padded with entries >= B)."""
  batch = b.scores.shape[0]
  cand_scores, cand_ids = [b.scores], [b.ids]
  for j, (g, pick) in enumerate(zip(gathered, picks), start=1):
    if pick is None:
      continue
    positions, row_ids = pick
    top, ids = _padded_top_k(jnp.take(g.log_p, positions, axis=0,
                                      mode="clip"), n)
    top, ids = _scatter_rows(batch, row_ids, top, ids + lay.start(j))
    cand_scores.append(top)
    cand_ids.append(ids)
  return _best_of(cand_scores, cand_ids, n)


def _top_n_skipping_logits(params: Params, cfg: Any, h: jax.Array, n: int,
                           index: tuple[BandIndex, ...]
                           ) -> tuple[jax.Array, jax.Array, np.ndarray]:
  """Three programs, two host decisions: the head and the bounds; the
  logits of the rows each bound keeps; `top_k` on the rows whose exact
  best item reaches tau (as the early exit decides)."""
  lay = layout(cfg.model, cfg.head)
  if len(index) != lay.num_tail:
    raise JaxrecError(f"top_n: the index has {len(index)} bands, the model "
                      f"{lay.num_tail} tail bands; build it with "
                      "search_index(params, cfg)")
  batch = h.shape[0]
  b = _bound_jit(params, cfg, index, h, n)
  tau = np.asarray(b.scores[:, n - 1])
  searched = np.asarray(b.bound) >= tau[:, None]
  kept = [np.flatnonzero(searched[:, j]) for j in range(lay.num_tail)]
  rows = tuple(_bucket(r, batch) for r in kept)
  if all(r is None for r in rows):
    return b.scores, b.ids, searched
  gathered = _gathered_jit(lay, params["head"], h, b, rows)
  picks = []
  for r, g in zip(kept, gathered):
    if g is None:
      picks.append(None)
      continue
    # The same test as the early exit's, on the gathered rows' logits.
    reach = np.flatnonzero(np.asarray(g.best)[:len(r)] >= tau[r])
    positions = _bucket(reach, batch)
    picks.append(None if positions is None else
                 (positions, np.pad(r[reach], (0, len(positions) - len(
                     reach)), constant_values=batch)))
  if all(p is None for p in picks):
    return b.scores, b.ids, searched
  return (*_merge_gathered_jit(lay, n, b, gathered, tuple(picks)), searched)


def top_n(params: Params, cfg: Any, h: jax.Array, n: int,
          early_exit: bool = True,
          index: tuple[BandIndex, ...] | None = None
          ) -> tuple[jax.Array, jax.Array, np.ndarray]:
  """The n most probable items: (log-probs [B, n], ids [B, n], scored
  [B, tail bands]), ties broken by id.

  `scored[b, j-1]` says whether tail band j was searched for row b. The
  full computation (`early_exit=False`) runs `top_k` over every band for
  every row. On CPU `top_k` is the costly part, and a band's logits and
  normaliser are cheap ([B, d_j] x [d_j, k_j] with small d_j): skipping
  `top_k` on half the (row, band) pairs made the search 1.4x faster
  (BENCHMARKS.md, CpRec early exit).

  With `early_exit`, every band's logits and normaliser are computed, which
  gives each row's best item in the band, token + max z - logsumexp z,
  exactly. A band can put an item into a row's top n only if that best
  item reaches the row's n-th best head item (on a tie the head item's
  lower id wins), so `top_k` runs only on the rows where it does, gathered
  into a power-of-two bucket. The result equals the full computation bit
  for bit: both read the same logits and normalisers (one program computes
  them) and apply the same ops to each row.

  The decision is taken on the host between two jitted programs (one sync
  per batch): a `lax.cond` per band measured 3x slower than computing
  every band on a 2-core CPU, and reading `top_k`'s values on device in
  the same program made XLA's CPU TopK fall back to a full sort.
  Not traceable: call it outside `jax.jit`.

  With an `index` (`search_index(params, cfg)`, built once per params), a
  band's logits are computed only for the rows whose `band_bound` reaches
  tau (`scored` says which), and `top_k` runs on those whose exact best
  item reaches it, as above: three programs, two host decisions. The ids
  equal the full computation's and the scores agree to float rounding
  (the rows' logits come from a product over the gathered rows).
  """
  if index is not None and early_exit:
    return _top_n_skipping_logits(params, cfg, h, n, index)
  lay = layout(cfg.model, cfg.head)
  s = _score_jit(params, cfg, h, n)
  if not early_exit:
    return (*_merge_all_jit(lay, n, s),
            np.ones((h.shape[0], lay.num_tail), bool))
  scored = np.asarray(s.best) >= np.asarray(s.scores[:, n - 1:n])
  rows = tuple(_bucket(np.flatnonzero(scored[:, j]), h.shape[0])
               for j in range(lay.num_tail))
  if all(r is None for r in rows):
    return s.scores, s.ids, scored
  return (*_merge_jit(lay, n, s, rows), scored)


def top_n_ranks(params: Params, cfg: Any, h: jax.Array, targets: jax.Array,
                n: int, early_exit: bool = True) -> jax.Array:
  """Full-ranking ranks of targets, exact below n (ties against the
  target) and n for every rank >= n: enough for every metric @k <= n."""
  scores, ids, _ = top_n(params, cfg, h, n, early_exit)
  is_target = ids == targets[:, None]
  found = jnp.any(is_target, axis=1)
  t_score = jnp.sum(jnp.where(is_target, scores, 0.0), axis=1)
  # Every item scoring >= a target inside the top n is itself in the top n
  # (fewer than n of them), so counting inside the list is exact.
  ahead = jnp.sum((scores >= t_score[:, None]) & ~is_target, axis=1)
  return jnp.where(found, jnp.minimum(ahead, n), n)


def topk(params: Params, cfg: Any, h: jax.Array, k: int
         ) -> tuple[jax.Array, jax.Array]:
  """The head's `topk` for serving: `top_n` with the early exit."""
  scores, ids, _ = top_n(params, cfg, h, k)
  return scores, ids


HEAD = Head(name="tree_softmax", config=TreeSoftmaxConfig, init=init,
            loss=loss, tile_scores=tile_scores, item_scores=item_scores,
            prepare=prepare, topk=topk)
