"""GRec (Yuan et al., WWW 2020, "Future Data Helps Training"): a gap-filling
encoder-decoder of NextItNet blocks.

The param tree (`init(cfg, rng)`), a plain nested dict:

  encoder_embedding/embedding  [V, C]     the encoder's own item table
  tokens/mask                  [C]        MASK (id V): a gap in the encoder
  encoder_blocks/...           [L, ...]   NextItNet blocks, centred convs
  adapter/{down,up}/{kernel,bias}         [C, A], [A]; [A, C], [C]
  item_embedding/embedding     [V, C]     the decoder's item table
  blocks/...                   [L, ...]   NextItNet blocks, causal convs

Both stacks are `jaxrec.models.nextitnet`'s block (`NextItNetBlock`, one
implementation): the encoder is the bidirectional network PeterRec's masked
pretraining trains (`--model nextitnet --causal false`), the decoder a
NextItNet. With `ids` x and the encoder's view `encoder_ids` g (x with the
predicted items cut out as MASK: `jaxrec.tasks.gap_filling`):

  e   = encoder(encoder_embedding[g])              sees both sides of a gap
  z   = e + item_embedding[x]
  z   = z + up(GELU(down(z)))                      the official "adapter"
  out = decoder(z)                                 causal: h_t predicts x_{t+1}

so position t predicts x_{t+1} from x_{<=t} and, through the encoder,
from the items after the gap at t+1 ("future data helps training").
Evaluation and serving pass the history alone: g = x (nothing after the
last item exists). Methods (StackRec, SkipRec, PeterRec's patches, CpRec)
act on the decoder stack, the one `blocks` names; StackRec grows both
stacks by the same map.

Where this differs from the official code (fajieyuan/WWW2020-grec):
- Padding positions are zeroed between the convs and after every block
  of both stacks, so a left-padded history reads as the convs' own zero
  padding and a row's states do not depend on how much padding it has
  (the official code pads with an item id and lets the convs mix it in).
- Residuals are StackRec's gated ones by default (`--residual plain`: the
  official x + h); dropout as jaxrec's NextItNet (the official: none).
- The decoder's output is scored by jaxrec's heads (the official: ReLU,
  then a 1x1 conv to item logits) with the full softmax; no L2 term.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrec.config import BackboneConfig, choice, option, require
from jaxrec.method_api import BlockPlan
from jaxrec.models import nextitnet
from jaxrec.models.backbone import (Backbone, BlockLayer, Params,
                                    SurgeryRules)
from jaxrec.nn import embedding
from jaxrec.nn.dropout import input_dropout


@dataclasses.dataclass(frozen=True)
class GRecConfig(BackboneConfig):
  """GRec: a gap-filling encoder and a causal decoder of NextItNet blocks."""
  name: str = option("grec", "backbone, one of jaxrec.models.names()")
  num_blocks: int = option(4, "blocks in the encoder, and as many in the "
                           "decoder (official: dilations 1,4,1,4)")
  kernel_size: int = option(3, "conv width k (odd: the encoder's window is "
                            "centred)")
  dilations: tuple[int, ...] = option(
      (1, 4), "first-conv dilation of each block, cycled (the second conv "
      "uses twice it)")
  residual: str = option("alpha", "alpha: x + a*h (StackRec, a init 0); "
                         "plain: x + h (the official GRec block)")
  dropout: float = option(0.2, "dropout on the input embeddings and each "
                          "block's branch, in training")
  layer_norm_eps: float = option(1e-8, "LayerNorm epsilon (official: 1e-8)")
  adapter_dim: int = option(0, "the adapter's hidden width (0: 2C, as the "
                            "official get_adapter(x, 2C))")

  def __post_init__(self):
    if "mask" not in self.special_tokens:  # The encoder's gaps.
      object.__setattr__(self, "special_tokens",
                         ("mask", *self.special_tokens))

  def is_causal(self) -> bool:
    return False  # The encoder reads the items after each position.

  def training_task(self) -> str:
    return "gap_filling"

  def stack(self, causal: bool) -> nextitnet.NextItNetConfig:
    """The NextItNet config of the encoder (causal=False) or decoder."""
    shared = {f.name: getattr(self, f.name)
              for f in dataclasses.fields(BackboneConfig) if f.name != "name"}
    if not causal:  # The encoder keeps a full table of its own.
      shared["embedding"] = "full"
    return nextitnet.NextItNetConfig(
        **shared, kernel_size=self.kernel_size, dilations=self.dilations,
        residual=self.residual, dropout=self.dropout,
        layer_norm_eps=self.layer_norm_eps, causal=causal)

  def block_dilations(self) -> tuple[int, ...]:
    return self.stack(True).block_dilations()

  def capabilities(self) -> frozenset[str]:
    """The decoder's: NextItNet's, without `causal` (the encoder reads
    later items)."""
    return self.stack(True).capabilities() - {"causal"}

  def capability_hint(self, missing: list[str]) -> str:
    if "causal" in missing:
      return "its encoder reads the items after each position"
    return ""

  def layer_pairs(self) -> dict[str, str]:
    return self.stack(True).layer_pairs()

  def derived(self) -> dict[str, Any]:
    return {"dilations": list(self.block_dilations())}

  def validate(self) -> None:
    super().validate()
    choice("model.residual", self.residual, ("alpha", "plain"))
    require(self.adapter_dim >= 0, "model.adapter_dim", self.adapter_dim,
            ">= 0 (0: 2 * embed_dim)")
    self.stack(False).validate()
    self.stack(True).validate()


class Adapter(nn.Module):
  """z + up(GELU(down(z))), 1x1 convs as dense layers."""
  width: int

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    init = nn.initializers.truncated_normal(0.02)  # The official conv1d's.
    h = nn.Dense(self.width, kernel_init=init, name="down")(z)
    h = nn.Dense(z.shape[-1], kernel_init=init, name="up")(
        nn.gelu(h, approximate=True))
    return z + h


def init(cfg: GRecConfig, rng: jax.Array) -> Params:
  """Fresh params: two tables, two stacks of L blocks and the adapter."""
  k_enc, k_enc_blocks, k_adapter, k_dec, k_dec_blocks = jax.random.split(
      rng, 5)
  c = cfg.embed_dim
  dummy = jnp.zeros((1, 1, c))
  encoder_cfg, decoder_cfg = cfg.stack(False), cfg.stack(True)

  def stack(part, key):
    return jax.vmap(lambda k: nextitnet.NextItNetBlock(part, 1).init(
        k, dummy)["params"])(jax.random.split(key, cfg.num_blocks))

  return {
      "encoder_embedding": embedding.init(encoder_cfg, k_enc),
      "encoder_blocks": stack(encoder_cfg, k_enc_blocks),
      "adapter": Adapter(cfg.adapter_dim or 2 * c).init(
          k_adapter, dummy)["params"],
      "item_embedding": embedding.init(decoder_cfg, k_dec),
      "blocks": stack(decoder_cfg, k_dec_blocks),
  }


def apply(params: Params, cfg: GRecConfig, ids: jax.Array, *,
          train: bool = False, rng: jax.Array | None = None,
          plan: BlockPlan = BlockPlan(), unroll: bool = False,
          encoder_ids: jax.Array | None = None) -> jax.Array:
  """Item ids [B, T] (and the encoder's gap-filled view of them, default
  the ids themselves) -> the decoder's hidden states [B, T, C] (float32)."""
  dropping = train and cfg.dropout > 0
  if dropping and rng is None:
    raise ValueError("grec: train=True with dropout needs an rng key")
  decoder = cfg.stack(True)
  real = (ids != 0)[..., None]
  gapped = ids if encoder_ids is None else encoder_ids
  k_enc = k_dec = None
  if dropping:
    k_enc, k_dec = jax.random.split(rng)

  # The encoder is a bidirectional NextItNet, run as one (`encoder`).
  encoder_params, encoder_cfg = encoder(params, cfg)
  e = nextitnet.apply(encoder_params, encoder_cfg, gapped, train=dropping,
                      rng=k_enc, unroll=unroll)
  z = e + embedding.lookup(params, decoder, ids)
  z = Adapter(cfg.adapter_dim or 2 * cfg.embed_dim).apply(
      {"params": params["adapter"]}, z)
  keys = None
  if dropping:
    z, keys = input_dropout(z, cfg.dropout, k_dec, cfg.num_blocks)
  # Padding zeroed inside and after each block, as in the encoder.
  return nextitnet.run_blocks(plan.run_blocks(params), decoder, z * real,
                              plan=plan, keys=keys, real=real, unroll=unroll)


def encoder(params: Params, cfg: GRecConfig
            ) -> tuple[Params, nextitnet.NextItNetConfig]:
  """GRec's encoder as a model of its own: the params and config of the
  bidirectional NextItNet it is (`--model nextitnet --causal false`, what
  PeterRec's masked pretraining trains). A view: the leaves are GRec's.
  `jaxrec extract --part encoder` saves it as a run PeterRec fine-tunes."""
  return ({"item_embedding": params["encoder_embedding"],
           "blocks": params["encoder_blocks"], "tokens": params["tokens"]},
          cfg.stack(False))


def grown_config(cfg: GRecConfig, sources: tuple[int, ...],
                 carry: bool) -> GRecConfig:
  """NextItNet's growth rule, on both stacks (they share the depth and
  the dilations)."""
  deep = nextitnet.grown_config(cfg.stack(True), sources, carry)
  return dataclasses.replace(cfg, num_blocks=deep.num_blocks,
                             dilations=deep.dilations)


BACKBONE = Backbone(
    name="grec", config=GRecConfig, init=init, apply=apply,
    surgery=SurgeryRules(stacks=("encoder_blocks", "blocks"),
                         norms=("ln*/scale", "ln*/bias"), gates=("alpha",),
                         layers=(BlockLayer(("conv1/*",), ("ln1/*",)),
                                 BlockLayer(("conv2/*",), ("ln2/*",)))),
    grown_config=grown_config, extra_inputs=("encoder_ids",),
    parts={"encoder": encoder})
