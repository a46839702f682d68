"""NextItNet (Yuan et al., WSDM 2019) with StackRec's alpha-residual block.

The param tree (`init(cfg, rng)`), a plain nested dict:

  item_embedding/embedding   [V, C]       id 0 is padding (its input is zeroed)
  blocks/conv1/kernel        [L, k, C, C] causal dilated conv, dilation d
  blocks/conv1/bias          [L, C]
  blocks/ln1/{scale,bias}    [L, C]
  blocks/conv2/{kernel,bias} [L, k, C, C], [L, C]   dilation 2d
  blocks/ln2/{scale,bias}    [L, C]
  blocks/alpha               [L]          only for residual="alpha"

Block (official StackRec `nextitnet_residual_block_alpha`, post-norm):

  x -> conv(k, d) -> LayerNorm -> ReLU -> conv(k, 2d) -> LayerNorm -> ReLU
    -> dropout -> x + gate * alpha * h
                                (alpha learned, init 0; gate per sequence,
                                 1 unless a skipping policy passes gates)

Dilations are config: a cycle of first-conv dilations ([1, 4] gives conv
dilations 1,2,4,8,1,2,4,8,...), or one per block to pin each (StackRec's
`carry` growth policy writes such a list).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.config import BackboneConfig, choice, option, require
from jaxrec.models.backbone import Backbone, Params, SurgeryRules
from jaxrec.nn.conv import CausalConv, weight_init
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

  def block_dilations(self) -> tuple[int, ...]:
    """The first-conv dilation of every block, bottom to top."""
    return tuple(self.dilations[i % len(self.dilations)]
                 for i in range(self.num_blocks))

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


class NextItNetBlock(nn.Module):
  """One residual block on the float32 residual stream x [B, T, C]."""
  cfg: NextItNetConfig
  dilation: int

  @nn.compact
  def __call__(self, x: jax.Array, gate: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    c, k = cfg.embed_dim, cfg.kernel_size
    h = CausalConv(c, k, self.dilation, name="conv1")(x.astype(dtype))
    h = jax.nn.relu(LayerNorm(cfg.layer_norm_eps, name="ln1")(h))
    h = CausalConv(c, k, 2 * self.dilation, name="conv2")(h.astype(dtype))
    h = jax.nn.relu(LayerNorm(cfg.layer_norm_eps, name="ln2")(h))
    h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    if cfg.residual == "alpha":
      # Each new block starts as the identity (ReZero, dynamical isometry).
      h = self.param("alpha", nn.initializers.zeros, ()) * h
    if gate is not None:
      h = gate[:, None, None] * h
    return x + h


def init(cfg: NextItNetConfig, rng: jax.Array) -> Params:
  """Fresh params: the item embedding and L blocks, each its own draw."""
  k_emb, k_blocks = jax.random.split(rng)
  dummy = jnp.zeros((1, 1, cfg.embed_dim))
  blocks = jax.vmap(lambda key: NextItNetBlock(cfg, 1).init(key, dummy)
                    ["params"])(jax.random.split(k_blocks, cfg.num_blocks))
  return {"item_embedding": {"embedding": weight_init(
      k_emb, (cfg.num_items, cfg.embed_dim))}, "blocks": blocks}


def apply(params: Params, cfg: NextItNetConfig, ids: jax.Array, *,
          train: bool = False, rng: jax.Array | None = None,
          source: tuple[int, ...] | None = None,
          gates: jax.Array | None = None, unroll: bool = False) -> jax.Array:
  """Item ids [B, T] -> hidden states [B, T, C] (float32).

  With `train` and `model.dropout` > 0, dropout draws from `rng`.
  """
  dropping = train and cfg.dropout > 0
  if dropping and rng is None:
    raise ValueError("nextitnet: train=True with dropout needs an rng key")
  x = params["item_embedding"]["embedding"][ids]
  block_keys = None
  if dropping:
    x, block_keys = input_dropout(x, cfg.dropout, rng, cfg.num_blocks)
  # Zeroing padding makes a left-padded sequence see exactly the causal
  # conv's own zero padding at the bottom of the stack.
  x = x * (ids != 0)[..., None]

  def block(p, x, dilation, inputs):
    key, gate = inputs
    return NextItNetBlock(cfg, dilation).apply(
        {"params": p}, x, gate, deterministic=key is None,
        rngs=None if key is None else {"dropout": key})

  return scan_blocks(block, params["blocks"], x,
                     statics=cfg.block_dilations(), source=source,
                     xs=(block_keys, gates), remat=cfg.remat, unroll=unroll)


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
    surgery=SurgeryRules(stacks=("blocks",), norms=("ln*/scale", "ln*/bias"),
                         gates=("alpha",)),
    grown_config=grown_config)
