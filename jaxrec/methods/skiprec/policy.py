"""SkipRec's policy network (Chen et al., AAAI 2021) and its gates.

The policy is its own subtree `skiprec` of the model's params:

  skiprec/embedding         [V, P]       its own item embedding (id 0 zeroed)
  skiprec/blocks/...        [2, ...]     two alpha-residual NextItNet blocks
                                         (dilations 1 and 4, kernel 3),
                                         width P, whatever the backbone
  skiprec/head/kernel       [L, P, 2]    one row per backbone block: logits
  skiprec/head/bias         [L, 2]       (skip, keep) of block l

`logits` pools the blocks' output by a masked mean over the positions it may
read (by default every non-padding one) and maps it to [B, L, 2] logits z.
Gates [L, B] (1 keeps block l, 0 skips it) go to the backbone as
per-position side inputs of the block scan; the `branch` slot scales block
l's residual branch by gate_l, so block l computes
`x + gate_l * alpha_l * h_l(x)` (`jaxrec.methods.skiprec`).

- Training (`gumbel_gates`): straight-through Gumbel-softmax. The forward
  pass is the hard one-hot `onehot(argmax(z + g))` (so a skipped block is
  exactly skipped), the backward pass the gradient of
  `softmax((z + g) / tau)`. The hard sample does not depend on tau.
- Inference (`argmax_gates`): deterministic argmax of z, no noise (the
  official code samples at test time, which makes evaluation stochastic).
- `confine` reproduces the official `softmax(sigmoid(z))`, which keeps
  every keep probability inside [0.269, 0.731]; off by default.

The per-block head rows carry a leading block axis, so StackRec growth moves
them with the backbone's index map (the method's `stacks`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.errors import JaxrecError
from jaxrec.methods.skiprec.config import SkipRecConfig
from jaxrec.models import nextitnet
from jaxrec.nn import embedding
from jaxrec.nn.conv import weight_init

Params = dict[str, Any]
SKIP, KEEP = 0, 1  # Action indices of the last logit axis.
POLICY_DILATIONS = (1, 4)  # Two residual blocks, as the official policy.
# Keep logit minus skip logit at init: a policy starting on a trained
# backbone keeps a block with probability sigmoid(1) = 0.73 in training and
# always at inference (argmax), while the policy can still move in a few
# hundred steps.
KEEP_BIAS = 1.0


def policy_config(model_cfg: Any, mcfg: SkipRecConfig
                  ) -> nextitnet.NextItNetConfig:
  """The NextItNet config of the policy's two blocks (width P, no dropout,
  no sharing, alpha residual), for a backbone of any kind."""
  return nextitnet.NextItNetConfig(
      num_items=model_cfg.num_items, embed_dim=mcfg.width(model_cfg),
      num_blocks=len(POLICY_DILATIONS), dilations=POLICY_DILATIONS,
      dropout=0.0, residual="alpha")


def init(model_cfg: Any, mcfg: SkipRecConfig, rng: jax.Array) -> Params:
  """A fresh policy subtree for a backbone config."""
  pcfg = policy_config(model_cfg, mcfg)
  k_emb, k_blocks, k_head = jax.random.split(rng, 3)
  blocks = nextitnet.init(pcfg, k_blocks)["blocks"]
  num_blocks = model_cfg.num_blocks
  return {
      "embedding": weight_init(k_emb, (model_cfg.num_items, pcfg.embed_dim)),
      "blocks": blocks,
      "head": {
          "kernel": weight_init(k_head, (num_blocks, pcfg.embed_dim, 2)),
          "bias": jnp.zeros((num_blocks, 2)).at[:, KEEP].set(KEEP_BIAS)}}


def logits(policy: Params, model_cfg: Any, mcfg: SkipRecConfig,
           ids: jax.Array, read: jax.Array | None = None) -> jax.Array:
  """Keep/skip logits [B, L, 2] of sequences ids [B, T].

  `read` [B, T] (bool) says which positions the mean pools (default: the
  non-padding ones). The blocks are causal, so pooling positions < c reads
  only items < c: the training split relies on this to keep each gate off
  the targets it is trained on.
  """
  # The policy's two blocks are a small NextItNet over its own embedding.
  x = nextitnet.apply({"item_embedding": {"embedding": policy["embedding"]},
                       "blocks": policy["blocks"]},
                      policy_config(model_cfg, mcfg), ids)
  present = ids != 0
  mask = (present if read is None else read & present)[..., None]
  pooled = (x * mask).sum(1) / jnp.maximum(mask.sum(1), 1)
  head = policy["head"]
  z = jnp.einsum("bp,lpk->blk", pooled, head["kernel"]) + head["bias"]
  if mcfg.confine:
    z = jax.nn.sigmoid(z)  # The official trap, only on request.
  return z


def gumbel_gates(z: jax.Array, rng: jax.Array, tau: float) -> jax.Array:
  """Straight-through Gumbel-softmax gates [L, B] of logits z [B, L, 2]:
  exactly 0 or 1 forward, the soft sample's gradient backward."""
  noisy = z + jax.random.gumbel(rng, z.shape, z.dtype)
  soft = jax.nn.softmax(noisy / tau, axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(noisy, axis=-1), 2, dtype=z.dtype)
  # soft - stop_gradient(soft) is exactly 0 forward: the gate is exactly
  # 0 or 1 (hard + soft - sg(soft) would round to 0.99999994).
  action = hard + (soft - jax.lax.stop_gradient(soft))
  return action[..., KEEP].T


def argmax_gates(z: jax.Array) -> jax.Array:
  """Deterministic inference gates [L, B]: keep where z_keep > z_skip."""
  return (jnp.argmax(z, axis=-1) == KEEP).astype(jnp.float32).T


def inference_gates(params: Params, cfg: Any, ids: jax.Array) -> jax.Array:
  """The gates a trained model runs with on ids [B, T]: [L, B] of 0/1."""
  return argmax_gates(logits(params[SkipRecConfig.NAME], cfg.model,
                             cfg.method(SkipRecConfig.NAME), ids))


def block_usage(params: Params, cfg: Any, inputs: np.ndarray,
                batch_size: int = 512) -> np.ndarray:
  """Per-user share of blocks kept [N] under the inference gates."""
  gates_of = jax.jit(lambda p, ids: inference_gates(p, cfg, ids).mean(0))
  out = []
  for start in range(0, inputs.shape[0], batch_size):
    chunk = inputs[start:start + batch_size]
    pad = batch_size - chunk.shape[0]
    if pad:  # One compiled shape for every batch.
      chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]),
                                              chunk.dtype)])
    out.append(np.asarray(gates_of(params, chunk))[:batch_size - pad])
  return np.concatenate(out)


def embedding_from_backbone(policy: Params, params: Params, model_cfg: Any,
                            mcfg: SkipRecConfig) -> Params:
  """The policy with the backbone's item embedding copied in (the official
  `--use_pre`); an adaptive (banded) embedding gives each item's projected
  vector, what the backbone reads. Refuses a policy of another width,
  which would silently truncate."""
  if mcfg.width(model_cfg) != model_cfg.embed_dim:
    raise JaxrecError(
        "methods.skiprec.init_embedding: needs methods.skiprec.policy_dim 0 "
        f"or {model_cfg.embed_dim} (got {mcfg.policy_dim})")
  if model_cfg.embedding == "full":
    table = params["item_embedding"]["embedding"]
  else:
    table = embedding.lookup(params, model_cfg,
                             jnp.arange(model_cfg.num_items))
  # A copy, not the same buffer: a train step donating both leaves would
  # donate one buffer twice.
  return {**policy, "embedding": jnp.array(
      table, dtype=policy["embedding"].dtype, copy=True)}
