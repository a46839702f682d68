"""CpRec layer sharing as tree surgery: untying a shared model.

A shared model stores S <= L blocks and runs position i on stored block
`source[i]` (`CpRecConfig.source_map`). Untying gathers the stored blocks
by that map (`storage.run_blocks`), so each position owns a copy: the same
function, with every position free to train apart. It is exactly
StackRec's stacking (`nn.stack.gather_blocks`), so a shared model is a
grown model that has not been trained apart yet:

  deep, deep_cfg = sharing.untie(params, cfg)
"""
from __future__ import annotations

from typing import Any

from jaxrec.config import Config
from jaxrec.errors import JaxrecError
from jaxrec.methods.cprec import storage
from jaxrec.methods.cprec.config import CpRecConfig

Params = dict[str, Any]
NAME = CpRecConfig.NAME


def untie(params: Params, cfg: Config) -> tuple[Params, Config]:
  """(params, cfg) of the unshared model computing the same function."""
  if cfg.method(NAME) is None:
    raise JaxrecError(f"untie: {cfg.model.name} runs without "
                      "methods.cprec: it shares nothing")
  out = {k: v for k, v in params.items() if k != "block_norms"}
  out["blocks"] = storage.run_blocks(params, cfg)
  return out, cfg.without_method(NAME)
