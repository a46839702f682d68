"""NextItNet (Yuan et al., WSDM 2019) with StackRec's alpha-residual block.

The param tree (`init(cfg, rng)`), a plain nested dict:

  item_embedding/embedding   [V, C]       id 0 is padding (its input is zeroed;
                                          CpRec's adaptive bands: nn/embedding.py)
  blocks/conv1/kernel        [L, k, C, C] causal dilated conv, dilation d
  blocks/conv1/bias          [L, C]
  blocks/ln1/{scale,bias}    [L, C]
  blocks/conv2/{kernel,bias} [L, k, C, C], [L, C]   dilation 2d
  blocks/ln2/{scale,bias}    [L, C]
  blocks/alpha               [L]          only for residual="alpha"
  tokens/{mask,cls}          [C]          special tokens (model.special_tokens)

Block (official StackRec `nextitnet_residual_block_alpha`, post-norm), with
the slots where methods act (`jaxrec.method_api`: PeterRec's patches at
layer1/layer2 or branch, SkipRec's gate at branch):

  z = x -> conv(k, d) -> [layer1] -> LayerNorm -> ReLU
        -> conv(k, 2d) -> [layer2] -> LayerNorm -> ReLU -> dropout
        -> alpha * h -> [branch] -> x + h
                                (alpha learned, init 0)

`causal=False` makes both convs centred (a position sees (k-1)d/2 items
on each side), trained as masked item prediction
(`jaxrec.tasks.masked_item`); padding is zeroed between the convs and
after every block, so a left-padded row reads as the row alone. This is
GRec's encoder, the one implementation (`jaxrec.models.grec` runs it;
`grec.encoder` takes it out of a trained GRec as a model of its own).

Dilations are config: a cycle of first-conv dilations ([1, 4] gives conv
dilations 1,2,4,8,1,2,4,8,...), or one per block to pin each (StackRec's
`carry` growth policy writes such a list).

Layer sharing (CpRec, `jaxrec.methods.cprec`) is the method's: it stores
fewer blocks and hands the block scan the tree of every run position, so
this module runs L blocks and knows no sharing; a block's dilation always
follows its run position.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from typing import Any

from jaxrec.config import BackboneConfig, choice, option, require
from jaxrec.method_api import BlockPlan
from jaxrec.models.backbone import (Backbone, BlockLayer, Params,
                                    SurgeryRules)
from jaxrec.nn import embedding
from jaxrec.nn.conv import CausalConv
from jaxrec.nn.dropout import input_dropout
from jaxrec.nn.norm import LayerNorm
from jaxrec.nn.stack import scan_blocks

FRESH = -1


@dataclasses.dataclass(frozen=True)
class NextItNetConfig(BackboneConfig):
  """NextItNet with the StackRec residual block."""
  name: str = option("nextitnet", "backbone, one of jaxrec.models.names()")
  kernel_size: int = option(3, "conv kernel width k")
  dilations: tuple[int, ...] = option(
      (1, 4), "cycle of first-conv dilations, e.g. '1,4' (the second conv "
      "uses 2d); as long as --num-blocks to pin every block")
  residual: str = option("alpha", "alpha: x + a*h with learned a (init 0, "
                         "StackRec); plain: x + h (NextItNet)")
  layer_norm_eps: float = option(1e-8, "LayerNorm epsilon (official code: "
                                 "1e-8)")
  dropout: float = option(0.2, "dropout on the input embedding and on each "
                          "block's residual branch, in training (the "
                          "official code has none; 0.2 chosen on validation, "
                          "RESULTS.md)")
  causal: bool = option(True, "causal convs (next-item training); false: "
                        "centred convs seeing both sides, trained as masked "
                        "item prediction (GRec's encoder, PeterRec's masked "
                        "pretraining)")
  def __post_init__(self):
    # A bidirectional model trains masked: it needs the MASK token.
    if not self.causal and "mask" not in self.special_tokens:
      object.__setattr__(self, "special_tokens",
                         ("mask", *self.special_tokens))

  def block_dilations(self) -> tuple[int, ...]:
    """The first-conv dilation of every block, bottom to top."""
    return tuple(self.dilations[i % len(self.dilations)]
                 for i in range(self.num_blocks))

  def is_causal(self) -> bool:
    return self.causal

  def capabilities(self) -> frozenset[str]:
    """Slots layer1/layer2 (after each conv) and branch; the residual
    gate holds for both residuals (x + g * h is x at g = 0); whole
    blocks share no state across rows, so rows can run alone; convs have
    no position table, so any input length reads the same weights."""
    caps = {"block_stack", "own_blocks", "slot:layer1", "slot:layer2",
            "slot:branch", "residual_gate", "row_local_blocks", "layer_pair",
            "any_length"}
    if self.causal:
      caps.add("causal")
    return frozenset(caps)

  def capability_hint(self, missing: list[str]) -> str:
    if "causal" in missing:
      return "it is bidirectional (model.causal=False)"
    return ""

  def derived(self) -> dict[str, Any]:
    return {"dilations": list(self.block_dilations())}

  def layer_pairs(self) -> dict[str, str]:
    return {"conv2": "conv1", "ln2": "ln1"}

  def validate(self) -> None:
    super().validate()
    require(self.kernel_size >= 1, "model.kernel_size", self.kernel_size,
            ">= 1")
    require(len(self.dilations) >= 1 and all(
        isinstance(d, int) and d >= 1 for d in self.dilations),
            "model.dilations", list(self.dilations),
            "a non-empty list of positive integers")
    choice("model.residual", self.residual, ("alpha", "plain"))
    require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout,
            "in [0, 1)")
    require(self.layer_norm_eps > 0, "model.layer_norm_eps",
            self.layer_norm_eps, "> 0")
    if not self.causal:
      require(self.kernel_size % 2 == 1, "model.kernel_size",
              self.kernel_size, "an odd width for causal=False (a centred "
              "window)")


def _no_slot(name: str, x_in: jax.Array, x_out: jax.Array) -> jax.Array:
  del name, x_in
  return x_out


class NextItNetBlock(nn.Module):
  """One residual block on the float32 residual stream x [B, T, C];
  `slot(name, x_in, x_out)` runs the methods' code at each slot."""
  cfg: NextItNetConfig
  dilation: int

  @nn.compact
  def __call__(self, x: jax.Array, slot: Any = None, *,
               deterministic: bool = True,
               real: jax.Array | None = None) -> jax.Array:
    """`real` [B, T, 1] (1 at items, 0 at padding), where given, zeroes
    the padding between the convs and at the output: a conv then reads
    the padding as its own zero padding, and a row's states do not depend
    on how much padding it has."""
    slot = slot or _no_slot
    keep = (lambda v: v) if real is None else (lambda v: v * real)
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    c, k, d = cfg.embed_dim, cfg.kernel_size, self.dilation
    conv1 = CausalConv(c, k, d, cfg.causal, name="conv1")
    ln1 = LayerNorm(cfg.layer_norm_eps, name="ln1")
    conv2 = CausalConv(c, k, 2 * d, cfg.causal, name="conv2")
    ln2 = LayerNorm(cfg.layer_norm_eps, name="ln2")
    z = x.astype(dtype)
    h = keep(jax.nn.relu(ln1(slot("layer1", z, conv1(z, None)))))
    h = h.astype(dtype)
    h = jax.nn.relu(ln2(slot("layer2", h, conv2(h, 2 * d))))
    h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    if cfg.residual == "alpha":
      # Each new block starts as the identity (ReZero, dynamical isometry).
      h = self.param("alpha", nn.initializers.zeros, ()) * h
    return keep(x + slot("branch", z, h))


def init(cfg: NextItNetConfig, rng: jax.Array) -> Params:
  """Fresh params: the item embedding and L blocks, each its own draw."""
  k_emb, k_blocks = jax.random.split(rng)
  dummy = jnp.zeros((1, 1, cfg.embed_dim))
  blocks = jax.vmap(lambda key: NextItNetBlock(cfg, 1).init(key, dummy)
                    ["params"])(jax.random.split(k_blocks, cfg.num_blocks))
  return {"item_embedding": embedding.init(cfg, k_emb), "blocks": blocks}


def apply(params: Params, cfg: NextItNetConfig, ids: jax.Array, *,
          train: bool = False, rng: jax.Array | None = None,
          plan: BlockPlan = BlockPlan(), unroll: bool = False) -> jax.Array:
  """Item ids [B, T] -> hidden states [B, T, C] (float32).

  With `train` and `model.dropout` > 0, dropout draws from `rng`. `plan`
  carries the methods' side inputs and slot code (`jaxrec.method_api`).
  """
  dropping = train and cfg.dropout > 0
  if dropping and rng is None:
    raise ValueError("nextitnet: train=True with dropout needs an rng key")
  x = embedding.lookup(params, cfg, ids)
  block_keys = None
  if dropping:
    x, block_keys = input_dropout(x, cfg.dropout, rng, cfg.num_blocks)
  # Zeroing padding makes a left-padded sequence see exactly the causal
  # conv's own zero padding at the bottom of the stack.
  real = (ids != 0)[..., None]
  # A centred conv carries values into the padding and back out of it into
  # the row's first items: without `real` a bidirectional model read a row
  # differently by how much padding it had. The causal model keeps the
  # official code's behaviour (padding states pass forward).
  return run_blocks(plan.run_blocks(params), cfg, x * real, plan=plan,
                    keys=block_keys, real=None if cfg.causal else real,
                    unroll=unroll)


def run_blocks(blocks: Params, cfg: NextItNetConfig, x: jax.Array, *,
               plan: BlockPlan = BlockPlan(), keys: jax.Array | None = None,
               real: jax.Array | None = None, unroll: bool = False
               ) -> jax.Array:
  """The block stack `blocks` (leading block axis) over the residual
  stream x [B, T, C] under one scan: `keys` the per-block dropout keys
  (None: no dropout), `real` the padding mask each block zeroes (None:
  none), `plan` the methods' side inputs and slot code. GRec's decoder
  runs its stack through this too."""

  def block(p, x, dilation, inputs):
    key, side = inputs["key"], inputs["side"]
    return NextItNetBlock(cfg, dilation).apply(
        {"params": p}, x,
        lambda name, x_in, x_out: plan.at(name, x_in, x_out, side),
        deterministic=key is None,
        rngs=None if key is None else {"dropout": key}, real=real)

  if plan.wrap is not None:
    block = plan.wrap(block)
  return scan_blocks(block, blocks, x, statics=cfg.block_dilations(),
                     xs={"key": keys, "side": plan.side},
                     remat=cfg.remat, unroll=unroll)


def grown_config(cfg: NextItNetConfig, sources: tuple[int, ...],
                 carry: bool) -> NextItNetConfig:
  """Depth from the source map; with `carry` every block keeps its source's
  dilation (an explicit per-block list), else the cycle goes on by
  position (the official code). Fresh blocks get their positional one."""
  deep = dataclasses.replace(cfg, num_blocks=len(sources))
  if carry:
    src, positional = cfg.block_dilations(), deep.block_dilations()
    deep = dataclasses.replace(deep, dilations=tuple(
        src[j] if j != FRESH else positional[i]
        for i, j in enumerate(sources)))
  return deep


BACKBONE = Backbone(
    name="nextitnet", config=NextItNetConfig, init=init, apply=apply,
    surgery=SurgeryRules(stacks=("blocks",),
                         norms=("ln*/scale", "ln*/bias"), gates=("alpha",),
                         # Each conv with the LayerNorm after it.
                         layers=(BlockLayer(("conv1/*",), ("ln1/*",)),
                                 BlockLayer(("conv2/*",), ("ln2/*",)))),
    grown_config=grown_config)
