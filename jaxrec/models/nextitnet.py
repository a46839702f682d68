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

`causal=False` makes both convs centred (GRec's encoder: a position sees
(k-1)d/2 items on each side), trained as masked item prediction
(`jaxrec.tasks.masked_item`).

Dilations are config: a cycle of first-conv dilations ([1, 4] gives conv
dilations 1,2,4,8,1,2,4,8,...), or one per block to pin each (StackRec's
`carry` growth policy writes such a list).

Layer sharing (CpRec, `model.share`), as index maps over the stored block
axis (`jaxrec.nn.stack.scan_blocks(source=...)`); a block's dilation always
follows its run position:

  cross_block     position i runs stored block i mod P (P = share_period)
  adjacent_block  position i runs stored block i // 2
  adjacent_layer  the two convs of a block share one kernel (conv2, and
                  with share_leaves=all ln2, are absent)
  cross_layer     one stored block for every position, its two convs
                  shared (ALBERT)

With `share_leaves=all` (the paper's) whole blocks are shared; with `convs`
only the conv kernels are, and the norms and gates stay per position in
`block_norms` [L, ...]. `block_source` pins the map explicitly (growth of
a shared model writes it); `sharing.untie` gathers a shared model into the
equal unshared one.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from typing import Any

from jaxrec.config import BackboneConfig, choice, option, require
from jaxrec.method_api import BlockPlan
from jaxrec.models.backbone import Backbone, Params, SurgeryRules
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
  share: str = option("none", "CpRec layer sharing: none | cross_layer | "
                      "cross_block | adjacent_layer | adjacent_block")
  share_period: int = option(2, "cross_block: stored blocks P (position i "
                             "runs block i mod P); must divide num_blocks")
  share_leaves: str = option("all", "what sharing shares: all (whole "
                             "blocks, the paper) | convs (norms and gates "
                             "stay per position)")
  block_source: tuple[int, ...] = option(
      (), "explicit map run position -> stored block (one per block); "
      "growing a shared model writes it")
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

  def source_map(self) -> tuple[int, ...] | None:
    """Run position -> stored block, or None when every block is its own."""
    l = self.num_blocks
    if self.block_source:
      return tuple(self.block_source)
    if self.share == "cross_layer":
      return (0,) * l
    if self.share == "cross_block":
      return tuple(i % self.share_period for i in range(l))
    if self.share == "adjacent_block":
      return tuple(i // 2 for i in range(l))
    return None

  def shares_layers(self) -> bool:
    """Whether a block's two convs share one kernel."""
    return self.share in ("adjacent_layer", "cross_layer")

  def is_causal(self) -> bool:
    return self.causal

  def capabilities(self) -> frozenset[str]:
    """Slots layer1/layer2 (after each conv) and branch; the residual
    gate holds for both residuals (x + g * h is x at g = 0); whole
    blocks share no state across rows, so rows can run alone."""
    caps = {"block_stack", "slot:layer1", "slot:layer2", "slot:branch",
            "residual_gate", "row_local_blocks"}
    if self.source_map() is None:
      caps.add("own_blocks")  # Every run position has its own block.
    if self.causal:
      caps.add("causal")
    return frozenset(caps)

  def capability_hint(self, missing: list[str]) -> str:
    if "own_blocks" in missing:
      return (f"it shares blocks (model.share={self.share!r}); untie it "
              "first (jaxrec.surgery.sharing.untie)")
    if "causal" in missing:
      return "it is bidirectional (model.causal=False)"
    return ""

  def derived(self) -> dict[str, Any]:
    return {"dilations": list(self.block_dilations())}

  def uncompressed_fields(self) -> dict[str, Any]:
    return {"share": "none", "block_source": ()}

  def split_norms(self) -> bool:
    """Whether norms and gates live per position beside shared convs."""
    return self.share_leaves == "convs" and self.source_map() is not None

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
    self.validate_sharing()
    if not self.causal:
      require(self.kernel_size % 2 == 1, "model.kernel_size",
              self.kernel_size, "an odd width for causal=False (a centred "
              "window)")

  def validate_sharing(self) -> None:
    l = self.num_blocks
    choice("model.share", self.share, ("none", "cross_layer", "cross_block",
                                       "adjacent_layer", "adjacent_block"))
    choice("model.share_leaves", self.share_leaves, ("all", "convs"))
    if self.block_source:
      src = list(self.block_source)
      require(len(src) == l and set(src) == set(range(max(src) + 1)),
              "model.block_source", src,
              f"{l} stored-block indices covering 0..S-1")
      return  # An explicit map (a grown shared model) replaces the scheme's.
    if self.share == "cross_block":
      require(1 <= self.share_period < l and l % self.share_period == 0,
              "model.share_period", self.share_period,
              f"a divisor of model.num_blocks={l} below it")
    if self.share == "adjacent_block":
      require(l % 2 == 0, "model.num_blocks", l,
              "an even depth for share='adjacent_block'")


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
               deterministic: bool = True) -> jax.Array:
    slot = slot or _no_slot
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    c, k, d = cfg.embed_dim, cfg.kernel_size, self.dilation
    conv1 = CausalConv(c, k, d, cfg.causal, name="conv1")
    ln1 = LayerNorm(cfg.layer_norm_eps, name="ln1")
    shared = cfg.shares_layers()
    conv2 = conv1 if shared else CausalConv(c, k, 2 * d, cfg.causal,
                                            name="conv2")
    ln2 = (ln1 if shared and cfg.share_leaves == "all"
           else LayerNorm(cfg.layer_norm_eps, name="ln2"))
    z = x.astype(dtype)
    h = jax.nn.relu(ln1(slot("layer1", z, conv1(z, None))))
    h = h.astype(dtype)
    h = jax.nn.relu(ln2(slot("layer2", h, conv2(h, 2 * d))))
    h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    if cfg.residual == "alpha":
      # Each new block starts as the identity (ReZero, dynamical isometry).
      h = self.param("alpha", nn.initializers.zeros, ()) * h
    return x + slot("branch", z, h)


def init(cfg: NextItNetConfig, rng: jax.Array) -> Params:
  """Fresh params: the item embedding and the stored blocks, each its own
  draw (and per-position norms when sharing splits them off)."""
  k_emb, k_blocks = jax.random.split(rng)
  dummy = jnp.zeros((1, 1, cfg.embed_dim))

  def blocks(num):
    return jax.vmap(lambda key: NextItNetBlock(cfg, 1).init(key, dummy)
                    ["params"])(jax.random.split(k_blocks, num))

  out = {"item_embedding": embedding.init(cfg, k_emb),
         "blocks": blocks(cfg.stored_blocks())}
  if cfg.split_norms():
    out["blocks"], _ = split_block_leaves(out["blocks"])
    _, out["block_norms"] = split_block_leaves(blocks(cfg.num_blocks))
  return out


def split_block_leaves(blocks: Params) -> tuple[Params, Params]:
  """(conv leaves, the rest: norms and gates) of a block tree."""
  convs = {k: v for k, v in blocks.items() if k.startswith("conv")}
  return convs, {k: v for k, v in blocks.items() if k not in convs}


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
  x = x * (ids != 0)[..., None]

  def block(p, x, dilation, inputs):
    key, side, norms = inputs["key"], inputs["side"], inputs["norms"]
    return NextItNetBlock(cfg, dilation).apply(
        {"params": p if norms is None else {**p, **norms}}, x,
        lambda name, x_in, x_out: plan.at(name, x_in, x_out, side),
        deterministic=key is None,
        rngs=None if key is None else {"dropout": key})

  if plan.wrap is not None:
    block = plan.wrap(block)
  return scan_blocks(block, params["blocks"], x,
                     statics=cfg.block_dilations(), source=cfg.source_map(),
                     xs={"key": block_keys, "side": plan.side,
                         "norms": params.get("block_norms")},
                     remat=cfg.remat, unroll=unroll)


def grown_config(cfg: NextItNetConfig, sources: tuple[int, ...],
                 carry: bool) -> NextItNetConfig:
  """Depth from the source map; with `carry` every block keeps its source's
  dilation (an explicit per-block list), else the cycle goes on by
  position (the official code). Fresh blocks get their positional one."""
  deep = dataclasses.replace(cfg, num_blocks=len(sources))
  shared = cfg.source_map()
  if shared is not None:
    # Composed maps: a copy re-uses its source's stored block (no new
    # array); each fresh position gets a new stored block on top.
    fresh = iter(range(cfg.stored_blocks(), cfg.stored_blocks() + len(sources)))
    deep = dataclasses.replace(deep, block_source=tuple(
        shared[j] if j != FRESH else next(fresh) for j in sources))
  if carry:
    src, positional = cfg.block_dilations(), deep.block_dilations()
    deep = dataclasses.replace(deep, dilations=tuple(
        src[j] if j != FRESH else positional[i]
        for i, j in enumerate(sources)))
  return deep


BACKBONE = Backbone(
    name="nextitnet", config=NextItNetConfig, init=init, apply=apply,
    surgery=SurgeryRules(stacks=("blocks", "block_norms"),
                         norms=("ln*/scale", "ln*/bias"), gates=("alpha",),
                         stored_stacks=("blocks",)),
    grown_config=grown_config)
