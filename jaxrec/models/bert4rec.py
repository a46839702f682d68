"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional Transformer over item
ids, trained by cloze (masked item prediction) and asked for the next item
by appending a MASK token to the history.

The param tree (`init(cfg, rng)`), a plain nested dict:

  item_embedding/embedding      [V, C]   id 0 is padding
  tokens/mask                   [C]      the MASK input (id V)
  position_embedding/embedding  [P, C]   slots, right-aligned
  embedding_norm/{scale,bias}   [C]
  blocks/attention/{query,key,value}/{kernel,bias}, out/{kernel,bias}
  blocks/ln_attn/{scale,bias}   [L, C]
  blocks/ffn_in/{kernel,bias}   [L, C, F], [L, F]     F = 4C by default
  blocks/ffn_out/{kernel,bias}  [L, F, C], [L, C]
  blocks/ln_ffn/{scale,bias}    [L, C]
  blocks/alpha_attn, alpha_ffn  [L]      only for residual="alpha"
  output/dense/{kernel,bias}    [C, C], [C]
  output/norm/{scale,bias}      [C]

Input: LN(item_embedding[ids] + position_embedding[slot]), dropout (BERT's
embedding layer). A block, with the slots where methods act (layer1 after
attention, layer2 after the feed-forward, B the branch slot):

  residual="official" (post-LN, as BERT and BERT4Rec):
    x1 = LN_attn(x + B(dropout([layer1](attention(x)))))
    x2 = LN_ffn(x1 + B(dropout([layer2](W2 GELU(W1 x1)))))
  residual="alpha" (pre-LN with learned gates, init 0: a new block is the
  identity, for exact growth and skipping):
    x1 = x + B(alpha_attn * dropout(attention(LN_attn(x))))
    x2 = x1 + B(alpha_ffn * dropout(W2 GELU(W1 LN_ffn(x1))))

Attention sees every real position on both sides (padding keys masked;
padding positions are zeroed). The output layer is BERT4Rec's: GELU(dense)
then LayerNorm, before the head scores the items. Weights are drawn from a
truncated N(0, 0.02^2), as BERT's.

Training and evaluation are the `masked_item` task's (chosen for every
bidirectional backbone): 30% of a row's real items are chosen, replaced by
MASK (80%), a random item (10%) or kept (10%), and the loss is over the
chosen positions; the next item is ranked from [history[1:], MASK].

Where this differs from the official code (FeiSun/BERT4Rec):
- The masking share is the task's 0.3 with BERT's 80/10/10 replacement
  (BERT4Rec's ML-1M setting masks 20%); the official data generator also
  adds training rows whose only masked item is the last one.
- Left padding with right-aligned position slots (the official code pads
  on the right), padding zeroed after every block.
- The output bias and the tying of input and output item embeddings are
  the head's (`--head softmax`, tied or not), not the backbone's.
- `residual="alpha"` is ours.
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
from jaxrec.nn.dropout import input_dropout
from jaxrec.nn.norm import LayerNorm
from jaxrec.nn.stack import scan_blocks

bert_init = nn.initializers.truncated_normal(0.02)


@dataclasses.dataclass(frozen=True)
class BERT4RecConfig(BackboneConfig):
  """BERT4Rec: bidirectional Transformer blocks trained by cloze."""
  name: str = option("bert4rec", "backbone, one of jaxrec.models.names()")
  num_blocks: int = option(2, "Transformer blocks (official ML-1M: 2)")
  num_heads: int = option(2, "attention heads; must divide embed_dim "
                          "(official ML-1M: 2)")
  ffn_dim: int = option(0, "feed-forward width (0: 4 * embed_dim, as BERT)")
  num_positions: int = option(0, "position embeddings P, the longest input "
                              "(0: taken from data.max_len)")
  dropout: float = option(0.1, "dropout on the input, the attention "
                          "weights and each branch (official: 0.1)")
  residual: str = option("official", "official: post-LN blocks (BERT); "
                         "alpha: pre-LN x + a*branch with learned a (init 0: "
                         "a new block is the identity, for exact growth)")
  layer_norm_eps: float = option(1e-12, "LayerNorm epsilon (BERT: 1e-12)")

  def __post_init__(self):
    # Cloze training and next-item queries both need the MASK input.
    if "mask" not in self.special_tokens:
      object.__setattr__(self, "special_tokens",
                         ("mask", *self.special_tokens))

  @property
  def ffn_width(self) -> int:
    return self.ffn_dim or 4 * self.embed_dim

  def is_causal(self) -> bool:
    return False

  def fit_data(self, num_items: int, max_len: int) -> "BERT4RecConfig":
    """Also takes the position table's size from max_len when unset."""
    fitted = dataclasses.replace(self, num_items=num_items)
    if self.num_positions == 0:
      return dataclasses.replace(fitted, num_positions=max_len)
    if self.num_positions < max_len:
      raise JaxrecError(f"model.num_positions={self.num_positions}: "
                        f"expected 0 or at least data.max_len={max_len}")
    return fitted

  def capabilities(self) -> frozenset[str]:
    """Slots layer1, layer2 and branch; a residual gate only with
    residual='alpha' (a post-LN block normalises after its residual, so a
    zero branch still applies the norms); never `causal`."""
    caps = {"block_stack", "own_blocks", "slot:layer1", "slot:layer2",
            "slot:branch"}
    if self.residual == "alpha":
      caps.add("residual_gate")
    return frozenset(caps)

  def capability_hint(self, missing: list[str]) -> str:
    if "causal" in missing:
      return "it is bidirectional (trained by cloze)"
    if "residual_gate" in missing:
      return ("its post-LN blocks normalise after the residual, so a "
              "gated-off block is not skipped; use --residual alpha")
    if "row_local_blocks" in missing:
      return ("its blocks read the batch's padding mask, so rows cannot "
              "run apart; use skipping 'cond' or 'masked'")
    return ""

  def validate(self) -> None:
    super().validate()
    require(self.num_heads >= 1, "model.num_heads", self.num_heads, ">= 1")
    require(self.embed_dim % self.num_heads == 0, "model.embed_dim",
            self.embed_dim, f"a multiple of model.num_heads={self.num_heads}")
    require(self.ffn_dim >= 0, "model.ffn_dim", self.ffn_dim,
            ">= 0 (0: 4 * embed_dim)")
    require(self.num_positions >= 0, "model.num_positions",
            self.num_positions, ">= 0 (0: taken from data.max_len)")
    require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout,
            "in [0, 1)")
    choice("model.residual", self.residual, ("official", "alpha"))
    require(self.layer_norm_eps > 0, "model.layer_norm_eps",
            self.layer_norm_eps, "> 0")


class BERT4RecBlock(nn.Module):
  """One bidirectional Transformer block on x [B, T, C] float32."""
  cfg: BERT4RecConfig

  @nn.compact
  def __call__(self, x: jax.Array, real: jax.Array, slot: Any = None, *,
               deterministic: bool = True) -> jax.Array:
    if slot is None:
      slot = lambda name, x_in, x_out: x_out  # pylint: disable=unnecessary-lambda-assignment
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)

    def dropout(h):
      return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)

    def attention(h):
      mask = real[:, None, None, :]  # Every real key, on both sides.
      a = nn.MultiHeadDotProductAttention(
          num_heads=cfg.num_heads, dtype=dtype, dropout_rate=cfg.dropout,
          broadcast_dropout=False, kernel_init=bert_init, name="attention")(
              h, h, mask=mask, deterministic=deterministic)
      return slot("layer1", h, a.astype(jnp.float32))

    def ffn(h):
      f = nn.Dense(cfg.ffn_width, dtype=dtype, kernel_init=bert_init,
                   name="ffn_in")(h)
      f = nn.Dense(cfg.embed_dim, dtype=dtype, kernel_init=bert_init,
                   name="ffn_out")(nn.gelu(f, approximate=False))
      return slot("layer2", h, f.astype(jnp.float32))

    def branch(h, alpha_name):
      h = dropout(h)
      if cfg.residual == "alpha":
        h = self.param(alpha_name, nn.initializers.zeros, ()) * h
      return slot("branch", x, h)

    ln_attn = LayerNorm(cfg.layer_norm_eps, name="ln_attn")
    ln_ffn = LayerNorm(cfg.layer_norm_eps, name="ln_ffn")
    if cfg.residual == "official":
      x1 = ln_attn(x + branch(attention(x), "alpha_attn"))
      out = ln_ffn(x1 + branch(ffn(x1), "alpha_ffn"))
    else:
      x1 = x + branch(attention(ln_attn(x)), "alpha_attn")
      out = x1 + branch(ffn(ln_ffn(x1)), "alpha_ffn")
    return out * real[..., None]


class OutputLayer(nn.Module):
  """BERT4Rec's output transform: LayerNorm(GELU(dense(h)))."""
  eps: float

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    h = nn.Dense(h.shape[-1], kernel_init=bert_init, name="dense")(h)
    return LayerNorm(self.eps, name="norm")(nn.gelu(h, approximate=False))


def init(cfg: BERT4RecConfig, rng: jax.Array) -> Params:
  """Fresh params: embeddings and their norm, L blocks (each its own
  draw), the output layer."""
  if cfg.num_positions < 1:
    raise ValueError(f"model.num_positions={cfg.num_positions}: set it, or "
                     "take it from the data (fit_data)")
  k_item, k_pos, k_blocks, k_norm, k_out = jax.random.split(rng, 5)
  c = cfg.embed_dim
  dummy, real = jnp.zeros((1, 1, c)), jnp.ones((1, 1), bool)
  blocks = jax.vmap(lambda key: BERT4RecBlock(cfg).init(key, dummy, real)
                    ["params"])(jax.random.split(k_blocks, cfg.num_blocks))
  return {
      "item_embedding": embedding.init(cfg, k_item),
      "position_embedding": {"embedding": bert_init(
          k_pos, (cfg.num_positions, c))},
      "embedding_norm": LayerNorm(cfg.layer_norm_eps).init(
          k_norm, dummy)["params"],
      "blocks": blocks,
      "output": OutputLayer(cfg.layer_norm_eps).init(k_out, dummy)["params"],
  }


def apply(params: Params, cfg: BERT4RecConfig, ids: jax.Array, *,
          train: bool = False, rng: jax.Array | None = None,
          plan: BlockPlan = BlockPlan(), unroll: bool = False) -> jax.Array:
  """Item ids [B, T] (MASK = V) -> hidden states [B, T, C] (float32); see
  SASRec's `apply` for `train`, `rng`, `plan` and `unroll`."""
  if train and rng is None:
    raise ValueError("bert4rec: train=True needs an rng key for dropout")
  t = ids.shape[1]
  if t > cfg.num_positions:
    raise ValueError(f"bert4rec: sequences of length {t} but "
                     f"model.num_positions={cfg.num_positions}: raise it to "
                     "at least data.max_len")
  real = ids != 0
  x = embedding.lookup(params, cfg, ids)
  x = x + params["position_embedding"]["embedding"][cfg.num_positions - t:]
  x = LayerNorm(cfg.layer_norm_eps).apply({"params": params["embedding_norm"]},
                                          x)
  block_keys = None
  if train:
    x, block_keys = input_dropout(x, cfg.dropout, rng, cfg.num_blocks)
  x = x * real[..., None]

  def block(p, x, static, inputs):
    del static
    key, side = inputs["key"], inputs["side"]
    return BERT4RecBlock(cfg).apply(
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
  return OutputLayer(cfg.layer_norm_eps).apply({"params": params["output"]},
                                               x)


BACKBONE = Backbone(
    name="bert4rec", config=BERT4RecConfig, init=init, apply=apply,
    surgery=SurgeryRules(
        stacks=("blocks",), norms=("ln_*/scale", "ln_*/bias"),
        gates=("alpha_attn", "alpha_ffn"),
        layers=(BlockLayer(("attention/*",), ("ln_attn/*",)),
                BlockLayer(("ffn_in/*", "ffn_out/*"), ("ln_ffn/*",)))))
