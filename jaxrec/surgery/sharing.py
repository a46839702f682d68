"""CpRec layer sharing as tree surgery: untying a shared model.

A shared NextItNet stores S <= L blocks and runs position i on stored block
`source[i]` (`NextItNetConfig.source_map`). Untying gathers the stored
blocks by that map, so each position owns a copy: the same function, with
every position free to train apart. It is exactly StackRec's stacking
(`growth.gather_blocks`), so a shared model is a grown model that has not
been trained apart yet:

  deep, deep_cfg = sharing.untie(params, cfg)
"""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxrec.config import Config
from jaxrec.errors import JaxrecError
from jaxrec.nn.stack import gather_blocks

Params = dict[str, Any]


def is_shared(model_cfg: Any) -> bool:
  """Whether a backbone config shares blocks or a block's layers."""
  return model_cfg.source_map() is not None or model_cfg.shares_layers()


def untie(params: Params, cfg: Config) -> tuple[Params, Config]:
  """(params, cfg) of the unshared model computing the same function."""
  model = cfg.model
  if not is_shared(model):
    raise JaxrecError(f"untie: {model.name} with model.share="
                      f"{getattr(model, 'share', 'none')!r} shares nothing")
  blocks = params["blocks"]
  source = model.source_map()
  if source is not None:
    blocks = gather_blocks(blocks, source)
  blocks = {**blocks, **params.get("block_norms", {})}
  if model.shares_layers():
    blocks["conv2"] = blocks["conv1"]
    blocks.setdefault("ln2", blocks["ln1"])
  out = {k: v for k, v in params.items() if k != "block_norms"}
  out["blocks"] = blocks
  return out, cfg.replace(model=dataclasses.replace(
      model, share="none", block_source=()))
