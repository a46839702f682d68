"""The head contract's record (see `jaxrec.heads` for what each field does)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Head:
  name: str
  config: type
  init: Callable[..., Any]
  loss: Callable[..., Any]
  tile_scores: Callable[..., Any]
  item_scores: Callable[..., Any]
  prepare: Callable[..., Any] = lambda params, cfg, h: h
  sharded_ranks: Callable[..., Any] | None = None
  topk: Callable[..., Any] | None = None
