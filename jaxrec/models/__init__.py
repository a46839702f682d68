"""The backbone registry, and the whole model (backbone + head) as functions.

`get(name)` returns a registered `Backbone` (see `backbone.py` for the
contract); `model.name` in the config picks one. A model's param tree is
the backbone's tree plus `head` (the output head's params, `jaxrec.heads`):

  params = models.init_params(cfg, rng)          # cfg: a jaxrec Config
  h = models.hidden_states(params, cfg, ids)     # [B, T, C] float32

Adding a backbone: write `models/NAME.py` (config, block, init, apply,
surgery rules; `sasrec.py` is the worked example) and add its `BACKBONE`
to `_BACKBONES` below.
"""
from __future__ import annotations

from typing import Any

import chex
import jax
import numpy as np

from jaxrec.errors import JaxrecError, first_line
from jaxrec.models import nextitnet, sasrec
from jaxrec.models.backbone import Backbone, Params, SurgeryRules
from jaxrec.nn import embedding
from jaxrec.skip import policy

__all__ = ["Backbone", "Params", "SurgeryRules", "get", "names",
           "init_params", "hidden_states", "check_params", "require_fit",
           "count_params", "abstract_params", "uncompressed",
           "compression_ratio"]

_BACKBONES = {b.name: b for b in (nextitnet.BACKBONE, sasrec.BACKBONE)}


def names() -> tuple[str, ...]:
  return tuple(_BACKBONES)


def get(name: str, option: str = "model.name") -> Backbone:
  """The registered backbone `name`; a one-line error names the option."""
  if name not in _BACKBONES:
    raise JaxrecError(f"{option}={name!r}: expected one of {list(names())}")
  return _BACKBONES[name]


def init_params(cfg: Any, rng: jax.Array) -> Params:
  """A fresh model: the backbone's tree plus `head`."""
  from jaxrec import heads  # pylint: disable=import-outside-toplevel
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
  if policy.enabled(cfg):
    # A key of its own, so adding a policy leaves the other leaves as they were.
    params["policy"] = policy.init(cfg.model, jax.random.fold_in(rng, 10))
  return params


def hidden_states(params: Params, cfg: Any, ids: jax.Array,
                  **kwargs: Any) -> jax.Array:
  """The backbone's apply: ids [B, T] -> hidden states [B, T, C] (float32).

  Keyword arguments (train, rng, source, gates, unroll) go to the backbone.
  A model with a SkipRec policy (`model.skip`) and no `gates` given runs
  with the policy's deterministic inference gates.
  """
  if policy.enabled(cfg) and kwargs.get("gates") is None:
    kwargs["gates"] = policy.inference_gates(params, cfg, ids)
  return get(cfg.model.name).apply(params, cfg.model, ids, **kwargs)


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
  sharing, a flat softmax head (the reference of a compression ratio)."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from jaxrec import heads  # pylint: disable=import-outside-toplevel
  model = dataclasses.replace(cfg.model, embedding="full")
  if hasattr(model, "share"):
    model = dataclasses.replace(model, share="none", block_source=())
  head = cfg.head
  if head.uses_bands:
    head = heads.get("softmax").config()
  return cfg.replace(model=model, head=head)


def compression_ratio(cfg: Any) -> float:
  """Params of the uncompressed equivalent / params of this model."""
  return (count_params(abstract_params(uncompressed(cfg)))
          / count_params(abstract_params(cfg)))
