"""The softmax output head: a [V, C] weight (or the tied item embedding)
and a [V] bias. Trained with the chunked full softmax (`train.loss=full`)
or the sampled softmax with logQ correction (`train.loss=sampled`).

  head/kernel  [V, C]   absent when tie_embeddings
  head/bias    [V]
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxrec import ranking, sharding
from jaxrec.config import HeadConfig, option, require
from jaxrec.errors import JaxrecError
from jaxrec.heads.head import Head
from jaxrec.heads import chunked_softmax, sampled_softmax
from jaxrec.nn.conv import weight_init

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SoftmaxConfig(HeadConfig):
  name: str = option("softmax", "output head, one of jaxrec.heads.names()")
  tie_embeddings: bool = option(False, "use the item embedding as the "
                                "output softmax matrix")
  num_classes: int = option(0, "rows of the head incl. an unused 0 (0: the "
                            "model's items); a transfer task's target items "
                            "or classes (set by jaxrec finetune)")

  def num_outputs(self, model: Any) -> int:
    return self.num_classes or model.num_items

  def validate(self) -> None:
    require(self.num_classes == 0 or self.num_classes >= 2,
            "head.num_classes", self.num_classes, "0 (the model's items) or "
            ">= 2 (an unused 0 and one class)")
    if self.num_classes and self.tie_embeddings:
      raise JaxrecError("head.tie_embeddings=True: a head with its own "
                        f"vocabulary (head.num_classes={self.num_classes}) "
                        "cannot share the item embedding")


def init(cfg: SoftmaxConfig, model_cfg: Any, rng: jax.Array) -> Params:
  rows = cfg.num_outputs(model_cfg)
  out = {"bias": jnp.zeros((rows,))}
  if not cfg.tie_embeddings:
    out["kernel"] = weight_init(rng, (rows, model_cfg.embed_dim))
  return out


def weights(params: Params, cfg: Any) -> tuple[jax.Array, jax.Array]:
  """The softmax weights [V, C] and bias [V] (tied: the item embedding)."""
  w = (params["item_embedding"]["embedding"] if cfg.head.tie_embeddings
       else params["head"]["kernel"])
  return w, params["head"]["bias"]


def loss(params: Params, cfg: Any, h: jax.Array, targets: jax.Array,
         mask: jax.Array, *, rng: jax.Array | None = None,
         sampler: sampled_softmax.Sampler | None = None) -> jax.Array:
  """Masked mean cross entropy: `cfg.train.loss` full (chunked) or sampled."""
  w, b = weights(params, cfg)
  tcfg = cfg.train
  shards = sharding.model_shards()
  if tcfg.loss == "full" and shards > 1:
    # Each `model` shard scans its own rows of the row-split table.
    return chunked_softmax.sharded_softmax_cross_entropy(
        h, w, b, targets, mask, model_shards=shards,
        chunk_size=tcfg.loss_chunk, label_smoothing=tcfg.label_smoothing)
  if tcfg.loss == "full":
    return chunked_softmax.softmax_cross_entropy(
        h, w, b, targets, mask, chunk_size=tcfg.loss_chunk,
        label_smoothing=tcfg.label_smoothing)
  if tcfg.loss != "sampled":
    raise ValueError(f"train.loss={tcfg.loss!r}: expected 'full' or "
                     "'sampled'")
  if rng is None:
    raise ValueError("train.loss='sampled' needs an rng key")
  if sampler is None:
    sampler = sampled_softmax.make_sampler(tcfg.sampler, w.shape[0])
  return sampled_softmax.sampled_softmax_cross_entropy(
      h, w, b, targets, mask, rng, num_samples=tcfg.num_samples,
      sampler=sampler)


def tile_scores(params: Params, cfg: Any, h: jax.Array, start: jax.Array,
                size: int) -> jax.Array:
  """Scores [B, size] of ids start..start+size-1; rows past V read zeros."""
  w, b = weights(params, cfg)
  ids = start + jnp.arange(size)
  wt = jnp.take(w, ids, axis=0, mode="fill", fill_value=0)
  bt = jnp.take(b, ids, axis=0, mode="fill", fill_value=0)
  return jnp.einsum("bc,vc->bv", h, wt.astype(h.dtype),
                    preferred_element_type=jnp.float32) + bt


def item_scores(params: Params, cfg: Any, h: jax.Array,
                ids: jax.Array) -> jax.Array:
  """Scores [B, N] of ids [B, N]."""
  w, b = weights(params, cfg)
  return jnp.einsum("bc,bnc->bn", h, w[ids].astype(h.dtype),
                    preferred_element_type=jnp.float32) + b[ids]


def sharded_ranks(params: Params, cfg: Any, h: jax.Array, targets: jax.Array,
                  history: jax.Array | None, tile: int) -> jax.Array:
  """Full-ranking ranks [B] with w and b split by rows over the `model`
  axis of the mesh being traced under: each shard scores only its rows
  (`ranking.target_ranks` with the shard's id offset) and the target's
  score and the counts ahead of it are summed over `model`, so no device
  holds the whole table or a [B, V] score matrix."""
  w, b = weights(params, cfg)
  v = w.shape[0]
  rows = v // sharding.model_shards()
  data, model = sharding.DATA, sharding.MODEL

  def local(w, b, h, targets, history):
    offset = jax.lax.axis_index(model) * rows

    def score_tile(start, size):
      ids = start + jnp.arange(size)
      wt = jnp.take(w, ids, axis=0, mode="fill", fill_value=0)
      bt = jnp.take(b, ids, axis=0, mode="fill", fill_value=0)
      return jnp.einsum("bc,vc->bv", h, wt.astype(h.dtype),
                        preferred_element_type=jnp.float32) + bt

    return ranking.target_ranks(score_tile, v, targets, history, tile,
                                offset=offset, rows=rows, axis=model)

  hist = history if history is not None else jnp.zeros_like(targets)[:, None]
  fn = local if history is not None else (
      lambda w, b, h, t, _: local(w, b, h, t, None))
  return sharding.shard_map(
      fn, in_specs=(P(model, None), P(model), P(data, None), P(data),
                    P(data, None)),
      out_specs=P(data))(w, b, h, targets, hist)


HEAD = Head(name="softmax", config=SoftmaxConfig, init=init, loss=loss,
            tile_scores=tile_scores, item_scores=item_scores,
            sharded_ranks=sharded_ranks)
