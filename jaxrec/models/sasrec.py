"""SASRec (Kang & McAuley, ICDM 2018): a causal Transformer over item ids.

The param tree (`init(cfg, rng)`), a plain nested dict:

  item_embedding/embedding      [V, C]   id 0 is padding (its input is zeroed;
                                         CpRec's adaptive bands: nn/embedding.py)
  position_embedding/embedding  [P, C]   slots, right-aligned: the last
                                         input always reads row P-1
  blocks/ln_attn/{scale,bias}   [L, C]
  blocks/attention/{query,key,value}/{kernel,bias}
                                [L, C, H, C/H], [L, H, C/H]
  blocks/attention/out/{kernel,bias}
                                [L, H, C/H, C], [L, C]   absent with
                                         attention_out=False
  blocks/ln_ffn/{scale,bias}    [L, C]
  blocks/ffn_in/{kernel,bias}   [L, C, F], [L, F]
  blocks/ffn_out/{kernel,bias}  [L, F, C], [L, C]
  blocks/alpha_attn             [L]      only for residual="alpha"
  blocks/alpha_ffn              [L]      only for residual="alpha"
  final_norm/{scale,bias}       [C]

Input: item_embedding[ids] * sqrt(C) + position_embedding[slot], dropout,
padding zeroed. Block, in the official order (the authors' TF code and
pmixer/SASRec.pytorch), with the slots where methods act
(`jaxrec.method_api`): layer1 after attention, layer2 after the
feed-forward, and B = the branch slot on each residual branch:

  q  = LN_attn(x)
  a  = [layer1](attention(queries=q, keys/values=x))  causal, padding masked
  residual="official":  x1 = q + B(a);  f = LN_ffn(x1);  x2 = f + B(F(f))
  residual="alpha":     x1 = x + B(alpha_attn*a)
                        x2 = x1 + B(alpha_ffn*F(LN_ffn(x1)))
  out = x2 * (ids != 0)                        padding positions zeroed

  F(f) = [layer2](ffn(f))

  ffn(f) = dropout(Dense_out(ReLU(dropout(Dense_in(f)))))

then a final LayerNorm. Dropout (one rate) acts on the input, the attention
weights and the feed-forward, as in the official code.

The paper's own form is `experiments/configs/sasrec_paper.yaml`
(`jaxrec train --config` it): `attention_out=False` (heads concatenated,
no W^O, as the authors' `multihead_attention`), `init="paper"` (Glorot-
uniform item and position tables) and the softmax head tied to the item
embedding (`head.tie_embeddings`).

Where the defaults differ from the official code:
- An output projection W^O on the attention (flax's and pmixer's PyTorch
  port's), truncated N(0, 0.02) tables, an untied output layer with a bias:
  the paper's form is the preset above; the loss is jaxrec's full softmax
  (the paper: BCE against one sampled negative).
- Sequences are left-padded and position slots are right-aligned: an input
  of length T reads rows P-T..P-1, so the last item always has row P-1,
  also when evaluation feeds shorter inputs than training did (the official
  code uses slots 0..T-1 of its one fixed length). Padding inputs are
  zeroed.
- Padding *targets* are not this module's business: the loss masks them.
- residual="alpha" is ours. The official residuals add the normalised input
  (x1 = q + a), so no setting of a block's weights makes it the identity;
  the alpha block is pre-LN with ReZero-style scalar gates, initialised to
  0, so a fresh block is exactly the identity and StackRec's `preserve`
  growth keeps the function of the model it grows. With "official", a gate
  of 0 at the branch slot drops the branches but not the LayerNorms: it is
  not a skip, so only "alpha" offers the `residual_gate` capability.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from typing import Any

from jaxrec.config import BackboneConfig, choice, option, require
from jaxrec.errors import JaxrecError
from jaxrec.method_api import BlockPlan
from jaxrec.models.backbone import (Backbone, BlockLayer, Params,
                                    SurgeryRules)
from jaxrec.nn.attention import (CausalSelfAttention,
                                 ConcatHeadsSelfAttention, dense_init)
from jaxrec.nn import embedding
from jaxrec.nn.conv import weight_init
from jaxrec.nn.dropout import input_dropout
from jaxrec.nn.norm import LayerNorm
from jaxrec.nn.stack import scan_blocks


@dataclasses.dataclass(frozen=True)
class SASRecConfig(BackboneConfig):
  """SASRec: causal self-attention blocks over item and position
  embeddings."""
  name: str = option("sasrec", "backbone, one of jaxrec.models.names()")
  num_blocks: int = option(2, "Transformer blocks in the stack (official "
                           "code: 2)")
  num_heads: int = option(1, "attention heads; must divide embed_dim "
                          "(official code: 1)")
  ffn_dim: int = option(0, "feed-forward width (0: embed_dim, as the "
                        "official code)")
  num_positions: int = option(0, "position embeddings P, the longest input "
                              "(0: taken from data.max_len)")
  dropout: float = option(0.2, "dropout on the input, the attention weights "
                          "and the feed-forward (official ML-1M: 0.2)")
  residual: str = option("official", "official: residuals add the "
                         "normalised input (x1 = LN(x) + attn); alpha: pre-LN "
                         "x + a*branch with learned a (init 0: a new block "
                         "is the identity, for exact growth)")
  layer_norm_eps: float = option(1e-8, "LayerNorm epsilon (official code: "
                                 "1e-8)")
  attention_out: bool = option(True, "project the concatenated heads (W^O, "
                               "as flax and pmixer's PyTorch port); false: "
                               "concatenate them only, as the authors' TF "
                               "code")
  init: str = option("jaxrec", "jaxrec: truncated N(0, 0.02) item and "
                     "position tables; paper: Glorot-uniform ones, as the "
                     "authors' TF code")

  @property
  def ffn_width(self) -> int:
    return self.ffn_dim or self.embed_dim

  def fit_data(self, num_items: int, max_len: int) -> "SASRecConfig":
    """Also takes the position table's size from max_len when unset; a set
    one shorter than max_len fails now, not at the first batch."""
    fitted = dataclasses.replace(self, num_items=num_items)
    if self.num_positions == 0:
      return dataclasses.replace(fitted, num_positions=max_len)
    if self.num_positions < max_len:
      raise JaxrecError(f"model.num_positions={self.num_positions}: "
                        f"expected 0 or at least data.max_len={max_len}")
    return fitted

  def capabilities(self) -> frozenset[str]:
    """Slots layer1 (attention out), layer2 (feed-forward out) and branch;
    a residual gate only with residual='alpha' (the official residual
    keeps LN_attn(x) and LN_ffn in a gated-off block)."""
    caps = {"block_stack", "own_blocks", "causal", "slot:layer1",
            "slot:layer2", "slot:branch"}
    if self.residual == "alpha":
      caps.add("residual_gate")
    return frozenset(caps)

  def capability_hint(self, missing: list[str]) -> str:
    if "residual_gate" in missing:
      return ("with --residual official a gated-off block still applies "
              "its LayerNorms, so it is not skipped; use --residual alpha")
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
            ">= 0 (0: embed_dim)")
    require(self.num_positions >= 0, "model.num_positions",
            self.num_positions, ">= 0 (0: taken from data.max_len)")
    require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout,
            "in [0, 1)")
    choice("model.residual", self.residual, ("official", "alpha"))
    require(self.layer_norm_eps > 0, "model.layer_norm_eps",
            self.layer_norm_eps, "> 0")
    choice("model.init", self.init, ("jaxrec", "paper"))
    if self.init == "paper" and self.embedding != "full":
      raise JaxrecError("model.init='paper': Glorot-uniform tables need "
                        "model.embedding='full'")


class SASRecBlock(nn.Module):
  """One Transformer block on the float32 residual stream x [B, T, C]."""
  cfg: SASRecConfig

  @nn.compact
  def __call__(self, x: jax.Array, real: jax.Array, slot: Any = None, *,
               deterministic: bool = True) -> jax.Array:
    """x [B, T, C] float32, real [B, T] bool (not padding), `slot(name,
    x_in, x_out)` the methods' code (None: none) -> [B, T, C] float32.
    Dropout draws from the 'dropout' rngs."""
    if slot is None:
      slot = lambda name, x_in, x_out: x_out  # pylint: disable=unnecessary-lambda-assignment
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)

    def dropout(h):
      return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)

    def ffn(f):
      h = nn.Dense(cfg.ffn_width, dtype=dtype, kernel_init=dense_init,
                   name="ffn_in")(f)
      h = nn.relu(dropout(h))
      h = nn.Dense(cfg.embed_dim, dtype=dtype, kernel_init=dense_init,
                   name="ffn_out")(h)
      return slot("layer2", f, dropout(h).astype(jnp.float32))

    def branch(h, alpha_name):
      # The gates of "alpha" and the branch slot's (SkipRec's) both scale
      # only the branch, so either at 0 leaves the residual stream as is.
      if cfg.residual == "alpha":
        h = self.param(alpha_name, nn.initializers.zeros, ()) * h
      return slot("branch", x, h)

    q = LayerNorm(cfg.layer_norm_eps, name="ln_attn")(x)
    # Keys and values read the un-normalised stream, as the official code.
    attention = (CausalSelfAttention if cfg.attention_out
                 else ConcatHeadsSelfAttention)
    a = attention(
        num_heads=cfg.num_heads, dropout_rate=cfg.dropout, dtype=dtype,
        name="attention")(q, x, real, deterministic=deterministic)
    a = branch(slot("layer1", q, a.astype(jnp.float32)), "alpha_attn")
    ln_ffn = LayerNorm(cfg.layer_norm_eps, name="ln_ffn")
    if cfg.residual == "official":
      f = ln_ffn(q + a)
      out = f + branch(ffn(f), "alpha_ffn")
    else:
      x1 = x + a
      out = x1 + branch(ffn(ln_ffn(x1)), "alpha_ffn")
    # Padding positions stay zero, so they feed nothing into the next block.
    return out * real[..., None]


def init(cfg: SASRecConfig, rng: jax.Array) -> Params:
  """Fresh params: the embeddings, L blocks (each its own draw) and the
  final norm."""
  if cfg.num_positions < 1:
    raise ValueError(f"model.num_positions={cfg.num_positions}: set it, or "
                     "take it from the data (fit_data)")
  k_item, k_pos, k_blocks, k_norm = jax.random.split(rng, 4)
  c = cfg.embed_dim
  dummy, real = jnp.zeros((1, 1, c)), jnp.ones((1, 1), bool)
  blocks = jax.vmap(lambda key: SASRecBlock(cfg).init(key, dummy, real)
                    ["params"])(jax.random.split(k_blocks, cfg.num_blocks))
  table_init = (nn.initializers.xavier_uniform() if cfg.init == "paper"
                else weight_init)
  items = (embedding.init(cfg, k_item) if cfg.init == "jaxrec" else
           {"embedding": table_init(k_item, (cfg.num_items, c))})
  return {
      "item_embedding": items,
      "position_embedding": {"embedding": table_init(
          k_pos, (cfg.num_positions, c))},
      "blocks": blocks,
      "final_norm": LayerNorm(cfg.layer_norm_eps).init(k_norm,
                                                       dummy)["params"],
  }


def apply(params: Params, cfg: SASRecConfig, ids: jax.Array, *,
          train: bool = False, rng: jax.Array | None = None,
          plan: BlockPlan = BlockPlan(), unroll: bool = False) -> jax.Array:
  """Item ids [B, T] -> hidden states [B, T, C] (float32).

  `train` switches dropout on and then needs `rng`; without it the model is
  deterministic and needs no key. `plan` carries the methods' side inputs
  and slot code (`jaxrec.method_api`).
  """
  if train and rng is None:
    raise ValueError("sasrec: train=True needs an rng key for dropout")
  t = ids.shape[1]
  if t > cfg.num_positions:
    raise ValueError(f"sasrec: sequences of length {t} but "
                     f"model.num_positions={cfg.num_positions}: raise it to "
                     "at least data.max_len")
  x = embedding.lookup(params, cfg, ids) * cfg.embed_dim ** 0.5
  return encode(params, cfg, x, ids, train=train, rng=rng, plan=plan,
                unroll=unroll)


def encode(params: Params, cfg: SASRecConfig, x: jax.Array, ids: jax.Array,
           *, train: bool, rng: jax.Array | None, plan: BlockPlan,
           unroll: bool) -> jax.Array:
  """The embedded input x [B, T, C] -> hidden states: position embedding,
  input dropout, the block scan, the final norm (SSE-PT, which embeds its
  own input, shares it)."""
  t = ids.shape[1]
  real = ids != 0
  # Right-aligned slots: the most recent item always reads row P-1.
  x = x + params["position_embedding"]["embedding"][cfg.num_positions - t:]
  block_keys = None
  if train:
    x, block_keys = input_dropout(x, cfg.dropout, rng, cfg.num_blocks)
  # As the official code. Real positions would not see padding anyway (its
  # keys are masked, each block zeroes its rows); this keeps the stream zero
  # under padding from the start, whatever row 0 of the embedding holds.
  x = x * real[..., None]

  def block(p, x, static, inputs):
    del static  # No positional statics: every block is the same program.
    key, side = inputs["key"], inputs["side"]
    return SASRecBlock(cfg).apply(
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
    name="sasrec", config=SASRecConfig, init=init, apply=apply,
    surgery=SurgeryRules(
        stacks=("blocks",), norms=("ln_*/scale", "ln_*/bias"),
        gates=("alpha_attn", "alpha_ffn"),
        # Each sublayer with the pre-norm that feeds it.
        layers=(BlockLayer(("attention/*",), ("ln_attn/*",)),
                BlockLayer(("ffn_in/*", "ffn_out/*"), ("ln_ffn/*",)))))
