"""SkipRec as a task: joint training of a backbone and its skipping policy.

The batches and the evaluation are next-item prediction's; the model's
`hidden_states` runs a SkipRec model with the policy's deterministic argmax
gates (`jaxrec.skip.policy`), so full-ranking evaluation needs nothing more.
The loss depends on `model.skip`:

- gumbel: next-item cross entropy with straight-through Gumbel gates (hard
  forward, soft gradient) plus `skip_lambda * mean(gate)`; backbone and
  policy train together.
- rl: self-critical REINFORCE. Gates are sampled from the policy; the
  backbone trains by cross entropy under them; the policy by
  `-(r(sampled) - r(greedy)) * log p(sampled)` with the reward
  r = hit@5 of the last scored position - skip_rl_penalty * usage
  (a hit rewarded, every block used penalised), the greedy (argmax) gates
  as the baseline.

`model.skip_train_split=half` (default) lets the policy read only the first
half of each training row and scores the loss on the second half: gates
are per sequence, so with the whole row (`all`, the official code) the
gates of early positions are a function of the items they predict.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import heads
from jaxrec import models
from jaxrec.skip import policy
from jaxrec.tasks import next_item, ranking

NAME = "skiprec"
batch = next_item.batch
rank_fn = next_item.rank_fn
sampled_rank_fn = next_item.sampled_rank_fn
sampler_for = next_item.sampler_for
represent = next_item.represent


def split_masks(cfg: Any, inputs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(positions the policy reads, positions the loss scores), both [B, T].

  `half`: a row with n items reads its first floor(n/2) and scores the rest;
  the target of position t is item t + 1, never read (the policy's blocks
  are causal). `all`: everything both ways.
  """
  present = inputs != 0
  if cfg.model.skip_train_split == "all":
    return present, jnp.ones_like(present)
  t = inputs.shape[1]
  n = present.sum(1, keepdims=True)
  cut = t - (n + 1) // 2  # First scored position (rows are left-padded).
  pos = jnp.arange(t)[None, :]
  return present & (pos < cut), pos >= cut


def loss(params: models.Params, cfg: Any, batch_arrays: dict[str, jax.Array],
         rng: jax.Array, sampler: Any = None) -> jax.Array:
  """The training loss of `model.skip` (see the module docstring)."""
  k_model, k_head, k_gate = jax.random.split(rng, 3)
  inputs, targets = batch_arrays["inputs"], batch_arrays["targets"]
  read, scored = split_masks(cfg, inputs)
  z = policy.logits(params["policy"], cfg.model, inputs, read)
  if cfg.model.skip == "rl":
    return _rl_loss(params, cfg, inputs, targets, scored, z, k_model,
                    k_head, k_gate, sampler)
  gates = policy.gumbel_gates(z, k_gate, cfg.model.skip_tau)
  ce = _cross_entropy(params, cfg, inputs, targets, scored, gates, k_model,
                      k_head, sampler)
  return ce + cfg.model.skip_lambda * gates.mean()


def _cross_entropy(params, cfg, inputs, targets, scored, gates, k_model,
                   k_head, sampler):
  h = models.hidden_states(params, cfg, inputs, train=True, rng=k_model,
                           gates=gates)
  h = h.reshape(-1, cfg.model.embed_dim).astype(cfg.model.dtype)
  flat = targets.reshape(-1)
  mask = (flat != 0) & scored.reshape(-1)
  return heads.get(cfg.head.name).loss(params, cfg, h, flat, mask,
                                       rng=k_head, sampler=sampler)


def _rl_loss(params, cfg, inputs, targets, scored, z, k_model, k_head,
             k_gate, sampler):
  keep_p = jax.nn.softmax(z, axis=-1)[..., policy.KEEP].T  # [L, B]
  sampled = jax.random.bernoulli(k_gate, jax.lax.stop_gradient(keep_p))
  sampled = sampled.astype(jnp.float32)
  greedy = policy.argmax_gates(jax.lax.stop_gradient(z))
  ce = _cross_entropy(params, cfg, inputs, targets, scored, sampled, k_model,
                      k_head, sampler)
  frozen = jax.lax.stop_gradient(params)
  advantage = (_reward(frozen, cfg, inputs, targets, sampled)
               - _reward(frozen, cfg, inputs, targets, greedy))
  log_p = (sampled * jnp.log(keep_p + 1e-9)
           + (1 - sampled) * jnp.log(1 - keep_p + 1e-9)).sum(0)  # [B]
  return ce - jnp.mean(jax.lax.stop_gradient(advantage) * log_p)


def _reward(params, cfg, inputs, targets, gates):
  """Per user: hit@5 of the last position - penalty * share of blocks used."""
  head = heads.get(cfg.head.name)
  h = models.hidden_states(params, cfg, inputs, gates=gates)[:, -1]
  ctx = head.prepare(params, cfg, h.astype(cfg.model.dtype))
  last = targets[:, -1]
  ranks = ranking.target_ranks(
      lambda start, size: head.tile_scores(params, cfg, ctx, start, size),
      cfg.model.num_items, jnp.maximum(last, 1), tile=cfg.train.loss_chunk)
  hit = ((ranks < 5) & (last != 0)).astype(jnp.float32)
  return hit - cfg.model.skip_rl_penalty * gates.mean(0)


def report(params: models.Params, cfg: Any, data: Any) -> dict[str, Any]:
  """Block usage (blocks computed / (blocks x users)) on valid and test."""
  out = {}
  for split in ("valid", "test"):
    usage = policy.block_usage(params, cfg, getattr(data, f"{split}_inputs"),
                               cfg.train.eval_batch_size)
    out[split] = float(np.mean(usage))
  return {"block_usage": out}
