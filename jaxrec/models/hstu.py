"""HSTU (Zhai et al., ICML 2024, "Actions Speak Louder than Words"): the
generative-recommender block, a causal stack with pointwise (SiLU)
attention, a gate and no feed-forward.

The param tree (`init(cfg, rng)`), a plain nested dict:

  item_embedding/embedding      [V, C]   id 0 is padding
  position_embedding/embedding  [P, C]   slots, right-aligned (SASRec's)
  blocks/uvqk/kernel            [L, C, 2*H*dv + 2*H*dqk]   no bias
  blocks/rel_bias               [L, 2P-1] a bias per relative position
  blocks/out/{kernel,bias}      [L, H*dv, C], [L, C]
  blocks/alpha                  [L]      only for residual="alpha"
  final_norm/{scale,bias}       [C]

Input: item_embedding[ids] * sqrt(C) + position_embedding[slot], dropout,
padding zeroed (as SASRec, and as the reference's learnable-position
preprocessor). One block, on the residual stream x [B, T, C]:

  n        = LN(x)                                 no learned scale or bias
  u,v,q,k  = split(SiLU(n @ W_uvqk))               per head: dv, dv, dqk, dqk
  A[t, s]  = SiLU(q_t . k_s + rab[s - t]) / P      for real s <= t, else 0
  y        = [layer1](out(dropout(u * LN(A v))))   LN without learned params
  out      = x + B(y)        residual="official"   (B = the branch slot)
  out      = x + B(a * y)    residual="alpha"      (a learned, init 0)

then a final LayerNorm. The attention is not a softmax: each weight is a
SiLU of its logit, divided by the longest input P, so a user's history
counts by how much of it matches rather than being renormalised to one
(the paper's argument for recommendation's non-stationary vocabularies).
The residual branch is the block's only path, so a zero gate (the branch
slot's, or `alpha`) makes the block exactly the identity.

Where this differs from the reference (meta-recsys/generative-recommenders,
research/modeling/sequential/hstu.py, "rel_bias" normalisation):
- The relative attention bias is positional only. The reference adds a
  bucketed bias of log time gaps; jaxrec's batches carry item ids and no
  timestamps, so `rab` has no time term.
- Sequences are left-padded with right-aligned position slots (the
  reference right-pads jagged rows); the attention divides by P, the
  longest input, as the reference divides by its padded length N.
- The output is LayerNorm'd and scored by jaxrec's heads (`--head`); the
  reference L2-normalises outputs and item embeddings and divides their dot
  product by a temperature (0.05) in a sampled softmax.
- `out`'s bias starts at 0 (the reference keeps torch's default uniform
  draw); `residual="alpha"` is ours, for StackRec's function-preserving
  growth, as in SASRec.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.config import BackboneConfig, choice, option, require
from jaxrec.errors import JaxrecError
from jaxrec.method_api import BlockPlan
from jaxrec.models.backbone import (Backbone, BlockLayer, Params,
                                    SurgeryRules)
from jaxrec.nn import embedding
from jaxrec.nn.attention import dense_init
from jaxrec.nn.conv import weight_init
from jaxrec.nn.dropout import input_dropout
from jaxrec.nn.norm import LayerNorm, layer_norm
from jaxrec.nn.stack import scan_blocks

# The reference draws W_uvqk and the relative bias from N(0, 0.02^2).
small_normal = nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class HSTUConfig(BackboneConfig):
  """HSTU: gated pointwise-attention blocks over item and position
  embeddings."""
  name: str = option("hstu", "backbone, one of jaxrec.models.names()")
  num_blocks: int = option(2, "HSTU blocks in the stack (reference "
                           "MovieLens configs: 2; its large ones: 8)")
  num_heads: int = option(1, "attention heads (reference MovieLens: 1)")
  attention_dim: int = option(0, "per-head width of q and k, dqk (0: "
                              "embed_dim / num_heads)")
  linear_dim: int = option(0, "per-head width of u and v, dv (0: "
                           "embed_dim / num_heads)")
  num_positions: int = option(0, "position embeddings P, the longest input "
                              "(0: taken from data.max_len)")
  dropout: float = option(0.2, "dropout on the input and on u * LN(A v) "
                          "(reference MovieLens: 0.2)")
  residual: str = option("official", "official: x + block(x); alpha: x + "
                         "a*block(x) with learned a (init 0: a new block is "
                         "the identity, for exact growth)")
  layer_norm_eps: float = option(1e-6, "LayerNorm epsilon (reference: "
                                 "1e-6)")

  @property
  def qk_width(self) -> int:
    return self.attention_dim or self.embed_dim // self.num_heads

  @property
  def v_width(self) -> int:
    return self.linear_dim or self.embed_dim // self.num_heads

  def fit_data(self, num_items: int, max_len: int) -> "HSTUConfig":
    """Takes the position table's size from max_len when unset."""
    fitted = dataclasses.replace(self, num_items=num_items)
    if self.num_positions == 0:
      return dataclasses.replace(fitted, num_positions=max_len)
    if self.num_positions < max_len:
      raise JaxrecError(f"model.num_positions={self.num_positions}: "
                        f"expected 0 or at least data.max_len={max_len}")
    return fitted

  def capabilities(self) -> frozenset[str]:
    """One layer (slot layer1) and the branch slot; the branch is the
    block's only path, so a zero gate skips it in either residual form."""
    return frozenset({"block_stack", "own_blocks", "causal", "slot:layer1",
                      "slot:branch", "residual_gate"})

  def capability_hint(self, missing: list[str]) -> str:
    if "row_local_blocks" in missing:
      return ("its blocks read the batch's padding mask, so rows cannot "
              "run apart; use skipping 'cond' or 'masked'")
    return ""

  def validate(self) -> None:
    super().validate()
    require(self.num_heads >= 1, "model.num_heads", self.num_heads, ">= 1")
    for name, value in (("attention_dim", self.attention_dim),
                        ("linear_dim", self.linear_dim)):
      require(value >= 0, f"model.{name}", value, ">= 0 (0: embed_dim / "
              "num_heads)")
      if value == 0:
        require(self.embed_dim % self.num_heads == 0, "model.embed_dim",
                self.embed_dim, f"a multiple of model.num_heads="
                f"{self.num_heads} (or set model.{name})")
    require(self.num_positions >= 0, "model.num_positions",
            self.num_positions, ">= 0 (0: taken from data.max_len)")
    require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout,
            "in [0, 1)")
    choice("model.residual", self.residual, ("official", "alpha"))
    require(self.layer_norm_eps > 0, "model.layer_norm_eps",
            self.layer_norm_eps, "> 0")


def relative_bias(table: jax.Array, t: int) -> jax.Array:
  """[2P-1] -> [T, T]: entry (t, s) is table[P-1 + s - t]."""
  p = (table.shape[0] + 1) // 2
  offsets = jnp.arange(t)[None, :] - jnp.arange(t)[:, None]
  return table[p - 1 + offsets]


class HSTUBlock(nn.Module):
  """One HSTU block on the float32 residual stream x [B, T, C]."""
  cfg: HSTUConfig

  @nn.compact
  def __call__(self, x: jax.Array, real: jax.Array, slot: Any = None, *,
               deterministic: bool = True) -> jax.Array:
    """x [B, T, C] float32, real [B, T] bool, `slot(name, x_in, x_out)` the
    methods' code (None: none) -> [B, T, C] float32."""
    if slot is None:
      slot = lambda name, x_in, x_out: x_out  # pylint: disable=unnecessary-lambda-assignment
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    h, dqk, dv = cfg.num_heads, cfg.qk_width, cfg.v_width
    b, t, c = x.shape
    ones, zeros = jnp.ones((c,)), jnp.zeros((c,))
    normed = layer_norm(x, ones, zeros, cfg.layer_norm_eps)
    uvqk = nn.silu(nn.Dense(2 * h * (dv + dqk), use_bias=False, dtype=dtype,
                            kernel_init=small_normal, name="uvqk")(normed))
    u, v, q, k = jnp.split(uvqk, [h * dv, 2 * h * dv, 2 * h * dv + h * dqk],
                           axis=-1)
    q, k = q.reshape(b, t, h, dqk), k.reshape(b, t, h, dqk)
    v = v.reshape(b, t, h, dv)
    table = self.param("rel_bias", small_normal,
                       (2 * cfg.num_positions - 1,))
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32)
    logits = logits + relative_bias(table, t)
    visible = jnp.tril(jnp.ones((t, t), bool))[None] & real[:, None, :]
    weights = jnp.where(visible[:, None], nn.silu(logits), 0.0)
    weights = weights / cfg.num_positions
    attended = jnp.einsum("bhts,bshd->bthd", weights.astype(dtype), v)
    attended = attended.reshape(b, t, h * dv)
    width = h * dv
    gated = u.astype(jnp.float32) * layer_norm(
        attended, jnp.ones((width,)), jnp.zeros((width,)), cfg.layer_norm_eps)
    gated = nn.Dropout(cfg.dropout)(gated, deterministic=deterministic)
    y = nn.Dense(c, dtype=dtype, kernel_init=dense_init, name="out")(gated)
    y = slot("layer1", normed, y.astype(jnp.float32))
    if cfg.residual == "alpha":
      y = self.param("alpha", nn.initializers.zeros, ()) * y
    out = x + slot("branch", x, y)
    # Padding positions stay zero, so they feed nothing into the next block.
    return out * real[..., None]


def init(cfg: HSTUConfig, rng: jax.Array) -> Params:
  """Fresh params: the embeddings, L blocks (each its own draw) and the
  final norm."""
  if cfg.num_positions < 1:
    raise ValueError(f"model.num_positions={cfg.num_positions}: set it, or "
                     "take it from the data (fit_data)")
  k_item, k_pos, k_blocks, k_norm = jax.random.split(rng, 4)
  c = cfg.embed_dim
  dummy, real = jnp.zeros((1, 1, c)), jnp.ones((1, 1), bool)
  blocks = jax.vmap(lambda key: HSTUBlock(cfg).init(key, dummy, real)
                    ["params"])(jax.random.split(k_blocks, cfg.num_blocks))
  return {
      "item_embedding": embedding.init(cfg, k_item),
      "position_embedding": {"embedding": weight_init(
          k_pos, (cfg.num_positions, c))},
      "blocks": blocks,
      "final_norm": LayerNorm(cfg.layer_norm_eps).init(k_norm,
                                                       dummy)["params"],
  }


def apply(params: Params, cfg: HSTUConfig, ids: jax.Array, *,
          train: bool = False, rng: jax.Array | None = None,
          plan: BlockPlan = BlockPlan(), unroll: bool = False) -> jax.Array:
  """Item ids [B, T] -> hidden states [B, T, C] (float32); see SASRec's
  `apply` for `train`, `rng`, `plan` and `unroll`."""
  if train and rng is None:
    raise ValueError("hstu: train=True needs an rng key for dropout")
  t = ids.shape[1]
  if t > cfg.num_positions:
    raise ValueError(f"hstu: sequences of length {t} but "
                     f"model.num_positions={cfg.num_positions}: raise it to "
                     "at least data.max_len")
  real = ids != 0
  x = embedding.lookup(params, cfg, ids) * cfg.embed_dim ** 0.5
  x = x + params["position_embedding"]["embedding"][cfg.num_positions - t:]
  block_keys = None
  if train:
    x, block_keys = input_dropout(x, cfg.dropout, rng, cfg.num_blocks)
  x = x * real[..., None]

  def block(p, x, static, inputs):
    del static
    key, side = inputs["key"], inputs["side"]
    return HSTUBlock(cfg).apply(
        {"params": p}, x, real,
        lambda name, x_in, x_out: plan.at(name, x_in, x_out, side),
        deterministic=key is None,
        rngs=None if key is None else {"dropout": key})

  if plan.wrap is not None:
    block = plan.wrap(block)
  x = scan_blocks(block, plan.run_blocks(params), x,
                  statics=(None,) * cfg.num_blocks,
                  xs={"key": block_keys, "side": plan.side},
                  remat=cfg.remat, unroll=unroll)
  return LayerNorm(cfg.layer_norm_eps).apply({"params": params["final_norm"]},
                                             x)


BACKBONE = Backbone(
    name="hstu", config=HSTUConfig, init=init, apply=apply,
    surgery=SurgeryRules(
        stacks=("blocks",), norms=(), gates=("alpha",),
        # One layer: the projections, the relative bias and the output.
        layers=(BlockLayer(("uvqk/*", "rel_bias", "out/*")),)))
