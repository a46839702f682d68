"""The backbone registry, and the whole model (backbone + head) as functions.

`get(name)` returns a registered `Backbone` (see `backbone.py` for the
contract); `model.name` in the config picks one. A model's param tree is
the backbone's tree plus `head` (the output head's params, `jaxrec.heads`):

  params = models.init_params(cfg, rng)          # cfg: a jaxrec Config
  h = models.hidden_states(params, cfg, ids)     # [B, T, C] float32
  h, aux = models.forward(params, cfg, ids, train=True, rng=key)

Active methods (`cfg.methods`, `jaxrec.method_api`) add their subtrees at
init and their side inputs and slot code to every forward pass; the
backbone sees only a `BlockPlan`, never a method's name.

Adding a backbone: write `models/NAME.py` (config, block, init, apply,
surgery rules; `sasrec.py` is the worked example) and `register` its
`BACKBONE` (below for the zoo's own; from anywhere for yours).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import numpy as np

from jaxrec import config as config_lib
from jaxrec import heads, method_api
from jaxrec.errors import JaxrecError, first_line
from jaxrec.models import (bert4rec, grec, gru4rec, hstu, nextitnet,
                           sasrec, ssept)
from jaxrec.models.backbone import Backbone, Params, SurgeryRules
from jaxrec.nn import embedding

__all__ = ["Backbone", "Params", "SurgeryRules", "get", "names", "register",
           "init_params", "forward", "hidden_states", "check_params",
           "require_fit", "count_params", "abstract_params", "uncompressed",
           "compression_ratio"]

_BACKBONES: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
  """Adds a backbone (and its config class) to the registry."""
  if backbone.name in _BACKBONES:
    raise AssertionError(f"backbone {backbone.name!r} is registered twice")
  _BACKBONES[backbone.name] = backbone
  config_lib.register_class("model", backbone.name, backbone.config)
  return backbone


register(nextitnet.BACKBONE)
register(sasrec.BACKBONE)
register(hstu.BACKBONE)
register(gru4rec.BACKBONE)
register(bert4rec.BACKBONE)
register(grec.BACKBONE)
register(ssept.BACKBONE)


def names() -> tuple[str, ...]:
  """Every backbone, the plug-in packages loaded first."""
  config_lib.load_plugins()
  return tuple(_BACKBONES)


def get(name: str, option: str = "model.name") -> Backbone:
  """The registered backbone `name`; a one-line error names the option."""
  if name not in _BACKBONES:
    config_lib.load_plugins()
  if name not in _BACKBONES:
    raise JaxrecError(f"{option}={name!r}: expected one of {list(names())}")
  return _BACKBONES[name]


def init_params(cfg: Any, rng: jax.Array) -> Params:
  """A fresh model: the backbone's tree plus `head`, then every active
  method's subtree (`method_api.init`)."""
  cfg.model.validate()
  if cfg.model.num_items < 2:
    raise ValueError(f"model.num_items={cfg.model.num_items}: set it from "
                     "the data")
  k_backbone, k_head = jax.random.split(rng)
  params = get(cfg.model.name).init(cfg.model, k_backbone)
  params["head"] = heads.get(cfg.head.name).init(cfg.head, cfg.model, k_head)
  if cfg.model.special_tokens:
    params["tokens"] = embedding.init_tokens(cfg.model,
                                             jax.random.fold_in(rng, 11))
  return method_api.init(params, cfg, jax.random.fold_in(rng, 12))


def forward(params: Params, cfg: Any, ids: jax.Array, *, train: bool = False,
            rng: jax.Array | None = None, sides: Any = None,
            wrap: Any = None, unroll: bool = False,
            extra: dict[str, jax.Array] | None = None
            ) -> tuple[jax.Array, dict[str, Any]]:
  """ids [B, T] -> (hidden states [B, T, C] float32, aux by method).

  The active methods' side inputs (`sides` overrides some, by method
  name) and slot code run inside the backbone's block scan; `wrap`
  replaces the scanned block function (`method_api.BlockPlan`); `unroll`
  runs the stack as a Python loop (the test oracle). `train` switches
  dropout (and the methods' training behaviour) on and needs `rng`.
  `extra` holds the backbone's `extra_inputs` a batch has (GRec's
  `encoder_ids`); methods see `ids` only.
  """
  backbone = get(cfg.model.name)
  extra = {k: v for k, v in (extra or {}).items()
           if k in backbone.extra_inputs}
  k_plan = None if rng is None else jax.random.fold_in(rng, 1)
  plan, aux = method_api.block_plan(params, cfg, ids, train=train,
                                    rng=k_plan, sides=sides, wrap=wrap)
  h = backbone.apply(params, cfg.model, ids, train=train, rng=rng,
                     plan=plan, unroll=unroll, **extra)
  return h, aux


def hidden_states(params: Params, cfg: Any, ids: jax.Array,
                  **kwargs: Any) -> jax.Array:
  """`forward`'s hidden states alone (evaluation, serving)."""
  return forward(params, cfg, ids, **kwargs)[0]


def abstract_params(cfg: Any) -> Params:
  """The tree `cfg` implies, as ShapeDtypeStructs (no arrays made)."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def check_params(params: Params, cfg: Any) -> None:
  """Asserts the tree has exactly the structure and shapes `cfg` implies.

  Guards a restore or a surgery against silently pairing params with the
  wrong config (another backbone, depth, width, catalogue or head).
  """
  chex.assert_trees_all_equal_shapes(params, abstract_params(cfg))


def require_fit(params: Params, cfg: Any, what: str) -> None:
  """`check_params` as a one-line user error: "{what} do not fit ..."."""
  try:
    check_params(params, cfg)
  except (AssertionError, ValueError, TypeError) as e:
    detail = first_line(e)
    raise JaxrecError(
        f"{what} do not fit the model config ({cfg.model.name}, "
        f"{cfg.model.num_blocks} blocks, C={cfg.model.embed_dim}, "
        f"V={cfg.model.num_items}): {detail}") from None


def count_params(tree: Any) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def uncompressed(cfg: Any) -> Any:
  """The config with CpRec's compressions undone: a full embedding, no
  compressing method (sharing), a flat softmax head (the reference of a
  compression ratio)."""
  model = dataclasses.replace(cfg.model, embedding="full")
  head = cfg.head
  if head.uses_bands:
    head = heads.get("softmax").config()
  return cfg.replace(model=model, head=head, methods=tuple(
      m for m in cfg.methods if not m.COMPRESSES))


def compression_ratio(cfg: Any) -> float:
  """Params of the uncompressed equivalent / params of this model."""
  return (count_params(abstract_params(uncompressed(cfg)))
          / count_params(abstract_params(cfg)))
