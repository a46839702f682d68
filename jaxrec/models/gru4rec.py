"""GRU4Rec (Hidasi et al., ICLR 2016; Hidasi & Karatzoglou, CIKM 2018): a
recurrent network over the item sequence, trained with cross-entropy over
all items (jaxrec's `softmax` head with the full loss, as RecBole and the
official PyTorch port (hidasib/GRU4Rec_PyTorch_Official) train it).

The param tree (`init(cfg, rng)`), a plain nested dict:

  item_embedding/embedding      [V, C]   id 0 is padding
  blocks/gru/{ir,iz,in}/kernel  [L, C, C]   flax's GRUCell: input to reset,
  blocks/gru/{hr,hz,hn}/kernel  [L, C, C]   update, candidate; hidden to them
  blocks/gru/{ir,iz,in,hn}/bias [L, C]
  blocks/alpha                  [L]      only for residual="alpha"

Input: item_embedding[ids], dropout (`dropout_embed`). Each of the L layers
is one GRU over time, run under `lax.scan` (no Python loop), and the layers
form a block stack (all of width C) scanned like any other:

  h_t   = GRU(h_{t-1}, x_t)  at a real item; h_t = h_{t-1} at padding
  y     = [layer1](dropout(h))                     dropout_hidden
  out   = y                      residual="official" (stacked GRU layers)
  out   = x + B(alpha * y)       residual="alpha"    (B = the branch slot)
  out   = out * (ids != 0)

Sequences are left-padded, so the state stays at its zero start until the
first item and a batch of histories of any lengths runs as one padded
batch (the "padded-batch" form; the paper's session-parallel mini-batches
are a way to feed a GRU without padding, and train the same recurrence).

Where this differs from the official code:
- Hidden width = embedding width C (`--embed-dim`), so layers stack and
  the head scores h . e_i; the official code has a separate hidden size
  (its ML setups: one layer of 100-480 units) and scores against an output
  embedding of that size.
- flax's GRUCell initialisers (LeCun normal input kernels, orthogonal
  recurrent kernels) instead of the official uniform draw.
- `residual="alpha"` is ours: gated residual layers, so StackRec's
  function-preserving growth and SkipRec's skipping apply to a GRU stack.
  The official form ("official") has no residual: a zero gate there would
  not be a skip, so only "alpha" offers the `residual_gate` capability.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.config import BackboneConfig, choice, option, require
from jaxrec.method_api import BlockPlan
from jaxrec.models.backbone import (Backbone, BlockLayer, Params,
                                    SurgeryRules)
from jaxrec.nn import embedding
from jaxrec.nn.dropout import input_dropout
from jaxrec.nn.stack import scan_blocks


@dataclasses.dataclass(frozen=True)
class GRU4RecConfig(BackboneConfig):
  """GRU4Rec: stacked GRU layers over item embeddings."""
  name: str = option("gru4rec", "backbone, one of jaxrec.models.names()")
  num_blocks: int = option(1, "GRU layers (the official setups: 1)")
  dropout_embed: float = option(0.0, "dropout on the item embeddings "
                                "(official code: dropout_p_embed)")
  dropout_hidden: float = option(0.2, "dropout on each layer's output "
                                 "(official code: dropout_p_hidden)")
  residual: str = option("official", "official: stacked GRU layers; alpha: "
                         "x + a*GRU(x) with learned a (init 0: a new layer is "
                         "the identity, for exact growth and skipping)")

  def capabilities(self) -> frozenset[str]:
    caps = {"block_stack", "own_blocks", "causal", "slot:layer1",
            "slot:branch", "any_length"}
    if self.residual == "alpha":
      caps.add("residual_gate")
    return frozenset(caps)

  def capability_hint(self, missing: list[str]) -> str:
    if "residual_gate" in missing:
      return ("stacked GRU layers have no residual path, so a gated-off "
              "layer is not skipped; use --residual alpha")
    if "row_local_blocks" in missing:
      return ("its layers read the batch's padding mask, so rows cannot run "
              "apart; use skipping 'cond' or 'masked'")
    return ""

  def validate(self) -> None:
    super().validate()
    for name in ("dropout_embed", "dropout_hidden"):
      value = getattr(self, name)
      require(0.0 <= value < 1.0, f"model.{name}", value, "in [0, 1)")
    choice("model.residual", self.residual, ("official", "alpha"))


class GRULayer(nn.Module):
  """One GRU over time on x [B, T, C]; padding steps keep the state."""
  cfg: GRU4RecConfig

  @nn.compact
  def __call__(self, x: jax.Array, real: jax.Array, slot: Any = None, *,
               deterministic: bool = True) -> jax.Array:
    if slot is None:
      slot = lambda name, x_in, x_out: x_out  # pylint: disable=unnecessary-lambda-assignment
    cfg = self.cfg
    c = x.shape[-1]

    def step(cell, h, inputs):
      x_t, real_t = inputs
      h_new, _ = cell(h, x_t)
      h = jnp.where(real_t[:, None], h_new, h)
      return h, h

    # One GRU cell, its params shared over time (broadcast into the scan).
    over_time = nn.scan(step, variable_broadcast="params",
                        split_rngs={"params": False}, in_axes=1, out_axes=1)
    cell = nn.GRUCell(features=c, dtype=jnp.dtype(cfg.dtype),
                      param_dtype=jnp.float32, name="gru")
    h0 = jnp.zeros((x.shape[0], c), jnp.float32)
    _, hs = over_time(cell, h0, (x, real))
    y = nn.Dropout(cfg.dropout_hidden)(hs.astype(jnp.float32),
                                       deterministic=deterministic)
    y = slot("layer1", x, y)
    if cfg.residual == "alpha":
      out = x + slot("branch", x,
                     self.param("alpha", nn.initializers.zeros, ()) * y)
    else:
      out = slot("branch", x, y)
    return out * real[..., None]


def init(cfg: GRU4RecConfig, rng: jax.Array) -> Params:
  """Fresh params: the item embedding and L GRU layers (each its own
  draw)."""
  k_item, k_blocks = jax.random.split(rng)
  dummy, real = jnp.zeros((1, 1, cfg.embed_dim)), jnp.ones((1, 1), bool)
  blocks = jax.vmap(lambda key: GRULayer(cfg).init(key, dummy, real)
                    ["params"])(jax.random.split(k_blocks, cfg.num_blocks))
  return {"item_embedding": embedding.init(cfg, k_item), "blocks": blocks}


def apply(params: Params, cfg: GRU4RecConfig, ids: jax.Array, *,
          train: bool = False, rng: jax.Array | None = None,
          plan: BlockPlan = BlockPlan(), unroll: bool = False) -> jax.Array:
  """Item ids [B, T] -> hidden states [B, T, C] (float32); see SASRec's
  `apply` for `train`, `rng`, `plan` and `unroll`."""
  if train and rng is None:
    raise ValueError("gru4rec: train=True needs an rng key for dropout")
  real = ids != 0
  x = embedding.lookup(params, cfg, ids)
  block_keys = None
  if train:
    x, block_keys = input_dropout(x, cfg.dropout_embed, rng, cfg.num_blocks)
  x = x * real[..., None]

  def block(p, x, static, inputs):
    del static
    key, side = inputs["key"], inputs["side"]
    return GRULayer(cfg).apply(
        {"params": p}, x, real,
        lambda name, x_in, x_out: plan.at(name, x_in, x_out, side),
        deterministic=key is None,
        rngs=None if key is None else {"dropout": key})

  if plan.wrap is not None:
    block = plan.wrap(block)
  return scan_blocks(block, plan.run_blocks(params), x,
                     statics=(None,) * cfg.num_blocks,
                     xs={"key": block_keys, "side": plan.side},
                     remat=cfg.remat, unroll=unroll)


BACKBONE = Backbone(
    name="gru4rec", config=GRU4RecConfig, init=init, apply=apply,
    surgery=SurgeryRules(stacks=("blocks",), norms=(), gates=("alpha",),
                         layers=(BlockLayer(("gru/*",)),)))
