"""Next-item prediction: teacher forcing over every position, full ranking.

Training: inputs `row[:-1]`, targets `row[1:]` (autoregressive), padding
targets masked; the loss is the head's (chunked full softmax or sampled).
Evaluation: the last position's hidden state ranks the target against every
item through the head's `tile_scores` (`jaxrec.ranking`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from jaxrec import heads, method_api, models, sharding
from jaxrec.data import sequences
from jaxrec.heads import sampled_softmax
from jaxrec import ranking

NAME = "next_item"


def batch(data: sequences.SequenceData, step: int, batch_size: int,
          seed: int) -> dict[str, np.ndarray]:
  """The training batch of `step`: a pure function of (seed, step); it
  holds each row's user when the data has users."""
  return sequences.train_batch(data.train, step, batch_size, seed,
                               users=data.train_users)


def loss_parts(params: models.Params, cfg: Any,
               batch_arrays: dict[str, jax.Array], rng: jax.Array,
               sampler: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(the training loss, the active methods' terms in it by `NAME/term`):
  the masked mean next-item cross entropy over every position of the batch
  (the positions the active methods let it score), plus the methods' loss
  terms (`jaxrec.method_api`). The loop logs each term."""
  k_model, k_head = jax.random.split(rng)
  h, aux = models.forward(params, cfg, batch_arrays["inputs"], train=True,
                          rng=k_model, extra=batch_arrays)
  h = h.reshape(-1, cfg.model.embed_dim).astype(cfg.model.dtype)
  targets = batch_arrays["targets"]
  mask = method_api.score_mask(aux, targets != 0).reshape(-1)
  ce = heads.get(cfg.head.name).loss(params, cfg, h, targets.reshape(-1),
                                     mask, rng=k_head, sampler=sampler)
  terms = method_api.loss_terms(params, cfg, aux, batch_arrays)
  return ce + method_api.total_extra_loss(terms), terms


def loss(params: models.Params, cfg: Any, batch_arrays: dict[str, jax.Array],
         rng: jax.Array, sampler: Any = None) -> jax.Array:
  """The training loss of `loss_parts`, alone."""
  return loss_parts(params, cfg, batch_arrays, rng, sampler)[0]


def last_hidden(params: models.Params, cfg: Any, inputs: jax.Array,
                users: jax.Array | None = None) -> jax.Array:
  """The representation that predicts the next item: h at the last slot.
  `users` [B] (0: unseen) reach a backbone that reads them (SSE-PT);
  without them (serving a bare history) every row is an unseen user."""
  extra = None if users is None else {"users": users}
  h = models.hidden_states(params, cfg, inputs, extra=extra)[:, -1]
  return h.astype(cfg.model.dtype)


# (params, cfg, inputs [B, T], users [B] or None) -> [B, C].
Represent = Callable[..., jax.Array]
represent: Represent = last_hidden  # What scores the outputs (serving).


def rank_fn(cfg: Any, represent: Represent = last_hidden
            ) -> Callable[..., jax.Array]:
  """(params, inputs, targets, users=None) -> 0-based full-ranking ranks
  of targets among every output of the head; `represent(params, cfg,
  inputs, users)` is the [B, C] representation that scores them (other
  tasks pass their own)."""
  head = heads.get(cfg.head.name)
  mask_history = cfg.train.mask_history

  def ranks(params, inputs, targets, users=None):
    ctx = head.prepare(params, cfg, represent(params, cfg, inputs, users))
    if head.sharded_ranks is not None and sharding.model_shards() > 1:
      return head.sharded_ranks(params, cfg, ctx, targets,
                                inputs if mask_history else None,
                                cfg.train.loss_chunk)
    return ranking.target_ranks(
        lambda start, size: head.tile_scores(params, cfg, ctx, start, size),
        cfg.head.num_outputs(cfg.model), targets,
        inputs if mask_history else None, tile=cfg.train.loss_chunk)

  return ranks


def sampled_rank_fn(cfg: Any, represent: Represent = last_hidden
                    ) -> Callable[..., jax.Array]:
  """(params, inputs, targets, negatives [B, N], users=None) -> ranks
  among 1 + N."""
  head = heads.get(cfg.head.name)

  def ranks(params, inputs, targets, negatives, users=None):
    ctx = head.prepare(params, cfg, represent(params, cfg, inputs, users))
    target = head.item_scores(params, cfg, ctx, targets[:, None])[:, 0]
    return ranking.sampled_ranks(
        target, head.item_scores(params, cfg, ctx, negatives))

  return ranks


def sampler_for(cfg: Any, data: sequences.SequenceData) -> Any:
  """The negative sampler `train.loss=sampled` needs (None for `full`)."""
  if cfg.train.loss != "sampled":
    return None
  return sampled_softmax.make_sampler(
      cfg.train.sampler, cfg.head.num_outputs(cfg.model), data.item_counts)




def report(params: models.Params, cfg: Any, data: Any) -> dict[str, Any]:
  """What the task adds to metrics.json: nothing (methods add theirs)."""
  del params, cfg, data
  return {}
