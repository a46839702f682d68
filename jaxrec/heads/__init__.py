"""Output heads: hidden states -> a training loss and item scores.

A head is one module with a config dataclass (extending
`jaxrec.config.HeadConfig`, chosen by `head.name`) and a `Head` entry:

- `init(head_cfg, model_cfg, rng) -> params`: the tree under `head`;
- `loss(params, cfg, h, targets, mask, *, rng, sampler) -> scalar`: the
  masked mean training loss of hidden states h [N, C] (never a [N, V]
  matrix for large V); `cfg.train.loss` picks exact or sampled;
- `tile_scores(params, cfg, h, start, size) -> [B, size]`: float32 scores
  of item ids start..start+size-1 for h [B, C] (ids >= V may score
  anything: callers exclude them), so full-ranking evaluation walks any
  head tile by tile;
- `item_scores(params, cfg, h, ids) -> [B, N]`: scores of given ids [B, N]
  (sampled evaluation);
- `sharded_ranks(params, cfg, h, targets, history, tile) -> [B]`
  (optional): full-ranking ranks with the head's tables split by rows over
  the mesh's `model` axis, each shard scoring its own rows (without it,
  XLA partitions `tile_scores` as it sees fit);
- `prepare(params, cfg, h) -> context` (optional): what scoring needs per
  batch, computed once (the tree softmax's band normalisers); evaluation
  passes the context as `h` to `tile_scores` and `item_scores`;
- `topk(params, cfg, h, k) -> (scores [B, k], ids [B, k])` (optional): the
  head's own exact top-k search over every output id (padding included),
  called outside `jax.jit` (it may decide on the host: the tree softmax's
  early exit); serving uses it where it can (`jaxrec.serving`).

`params` is the whole model tree (a tied head reads the item embedding);
`cfg` the whole Config. Adding a head: write `heads/NAME.py` and add its
`HEAD` to `_HEADS` below.
"""
from __future__ import annotations

from jaxrec import config as config_lib
from jaxrec.errors import JaxrecError
from jaxrec.heads import softmax, tree_softmax
from jaxrec.heads.head import Head

__all__ = ["Head", "get", "names"]

_HEADS = {h.name: h for h in (softmax.HEAD, tree_softmax.HEAD)}
for _head in _HEADS.values():
  config_lib.register_class("head", _head.name, _head.config)


def names() -> tuple[str, ...]:
  """Every head, the plug-in packages loaded first."""
  config_lib.load_plugins()
  return tuple(_HEADS)


def get(name: str, option: str = "head.name") -> Head:
  if name not in _HEADS:
    config_lib.load_plugins()
  if name not in _HEADS:
    raise JaxrecError(f"{option}={name!r}: expected one of {list(_HEADS)}")
  return _HEADS[name]
