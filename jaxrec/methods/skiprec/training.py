"""SkipRec's training: the gates of a training forward pass and the extra
loss terms. The task (next-item prediction) and the loop are the core's;
this module supplies the method's hooks (`jaxrec.method_api`).

`methods.skiprec.mode`:

- gumbel: next-item cross entropy under straight-through Gumbel gates
  (hard forward, soft gradient) plus `lam * mean(gate)`; backbone and
  policy train together.
- rl: self-critical REINFORCE. Gates are sampled from the policy; the
  backbone trains by cross entropy under them; the policy by
  `-(r(sampled) - r(greedy)) * log p(sampled)` with the reward
  r = hit@5 of the last scored position - rl_penalty * usage (a hit
  rewarded, every block used penalised), the greedy (argmax) gates as the
  baseline.

`train_split=half` (default) lets the policy read only the first half of
each training row and the loss score the second half (`SCORE_MASK`):
gates are per sequence, so with the whole row (`all`, the official code)
the gates of early positions are a function of the items they predict.
At inference the policy reads the whole history (argmax gates).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import heads, method_api, models
from jaxrec.methods.skiprec import policy
from jaxrec.methods.skiprec.config import SkipRecConfig
from jaxrec import ranking

NAME = SkipRecConfig.NAME


def split_masks(mcfg: SkipRecConfig, inputs: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """(positions the policy reads, positions the loss scores), both [B, T].

  `half`: a row with n items reads its first floor(n/2) and scores the rest;
  the target of position t is item t + 1, never read (the policy's blocks
  are causal). `all`: everything both ways.
  """
  present = inputs != 0
  if mcfg.train_split == "all":
    return present, jnp.ones_like(present)
  t = inputs.shape[1]
  n = present.sum(1, keepdims=True)
  cut = t - (n + 1) // 2  # First scored position (rows are left-padded).
  pos = jnp.arange(t)[None, :]
  return present & (pos < cut), pos >= cut


def side_inputs(params: models.Params, cfg: Any, ids: jax.Array, *,
                train: bool, rng: jax.Array | None
                ) -> tuple[jax.Array, dict[str, Any]]:
  """Gates [L, B] of one forward pass, and what the loss needs of them."""
  mcfg = cfg.method(NAME)
  if not train:
    return policy.inference_gates(params, cfg, ids), {}
  read, scored = split_masks(mcfg, ids)
  z = policy.logits(params[NAME], cfg.model, mcfg, ids, read)
  aux = {method_api.SCORE_MASK: scored}
  if mcfg.mode == "rl":
    keep_p = jax.nn.softmax(z, axis=-1)[..., policy.KEEP].T  # [L, B]
    sampled = jax.random.bernoulli(rng, jax.lax.stop_gradient(keep_p))
    gates = sampled.astype(jnp.float32)
    return gates, {**aux, "gates": gates, "keep_p": keep_p, "z": z}
  gates = policy.gumbel_gates(z, rng, mcfg.tau)
  return gates, {**aux, "gates": gates}


def gate_branch(x_in: jax.Array, h: jax.Array, gate: jax.Array) -> jax.Array:
  """The `branch` slot: block l's residual branch times its gate [B]."""
  del x_in
  return gate[:, None, None].astype(h.dtype) * h


def loss_terms(params: models.Params, cfg: Any, aux: dict[str, Any],
               batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`usage` (gumbel: lam * mean gate) or `policy` (rl: the policy
  gradient's surrogate)."""
  mcfg = cfg.method(NAME)
  if mcfg.mode == "gumbel":
    return {"usage": mcfg.lam * aux["gates"].mean()}
  inputs, targets = batch["inputs"], batch["targets"]
  sampled, keep_p = aux["gates"], aux["keep_p"]
  greedy = policy.argmax_gates(jax.lax.stop_gradient(aux["z"]))
  frozen = jax.lax.stop_gradient(params)
  advantage = (_reward(frozen, cfg, mcfg, inputs, targets, sampled)
               - _reward(frozen, cfg, mcfg, inputs, targets, greedy))
  log_p = (sampled * jnp.log(keep_p + 1e-9)
           + (1 - sampled) * jnp.log(1 - keep_p + 1e-9)).sum(0)  # [B]
  return {"policy": -jnp.mean(jax.lax.stop_gradient(advantage) * log_p)}


def _reward(params, cfg, mcfg, inputs, targets, gates):
  """Per user: hit@5 of the last position - penalty * share of blocks used."""
  head = heads.get(cfg.head.name)
  h = models.hidden_states(params, cfg, inputs, sides={NAME: gates})[:, -1]
  ctx = head.prepare(params, cfg, h.astype(cfg.model.dtype))
  last = targets[:, -1]
  ranks = ranking.target_ranks(
      lambda start, size: head.tile_scores(params, cfg, ctx, start, size),
      cfg.model.num_items, jnp.maximum(last, 1), tile=cfg.train.loss_chunk)
  hit = ((ranks < 5) & (last != 0)).astype(jnp.float32)
  return hit - mcfg.rl_penalty * gates.mean(0)


def report(params: models.Params, cfg: Any, data: Any) -> dict[str, Any]:
  """Block usage (blocks computed / (blocks x users)) on valid and test."""
  out = {}
  for split in ("valid", "test"):
    usage = policy.block_usage(params, cfg, getattr(data, f"{split}_inputs"),
                               cfg.train.eval_batch_size)
    out[split] = float(np.mean(usage))
  return {"block_usage": out}
