"""CpRec's block storage: a shared model stores S <= L blocks and runs
position i on stored block `source[i]`; with layer sharing a block's second
layer runs its first layer's kernel.

  params["blocks"]        [S, ...]  the stored blocks (the second layer of a
                                    pair absent when layers share)
  params["block_norms"]   [L, ...]  norms and gates per position, when
                                    `leaves=convs` (the rest is shared)

`init` turns a fresh backbone tree (L blocks) into that storage: stored
block s is the fresh block at the first position that runs it. `run_blocks`
gives the backbone the tree of every run position, [L, ...], by gathering
the stored blocks by the map (the gradient of a shared block is then the
sum of its positions'), so the backbone needs no notion of sharing.
Untying (`sharing.untie`) is exactly this gather, saved.
"""
from __future__ import annotations

import fnmatch
from typing import Any

import jax

from jaxrec import models
from jaxrec.methods.cprec.config import CpRecConfig
from jaxrec.nn.stack import gather_blocks

NAME = CpRecConfig.NAME
FRESH = -1  # StackRec's index-map entry of a new block.
Params = dict[str, Any]


def _norm_leaf(path: str, cfg: Any) -> bool:
  """Whether a block leaf is a norm or a gate (per position with convs)."""
  rules = models.get(cfg.model.name).surgery
  return any(fnmatch.fnmatchcase(path, p) for p in rules.norms + rules.gates)


def _split(blocks: Params, cfg: Any) -> tuple[Params, Params]:
  """(shared leaves, per-position leaves) of a block tree, by top key."""
  def per_position(key, sub):
    leaves = jax.tree_util.tree_leaves_with_path(sub)
    names = [key + "".join(f"/{k.key}" for k in p) for p, _ in leaves]
    return all(_norm_leaf(n, cfg) for n in names)

  rest = {k: v for k, v in blocks.items() if per_position(k, v)}
  return {k: v for k, v in blocks.items() if k not in rest}, rest


def _pairs(cfg: Any, mcfg: CpRecConfig) -> dict[str, str]:
  """second layer -> first layer, for the layers that share (norm pairs
  only when whole blocks are shared)."""
  if not mcfg.shares_layers():
    return {}
  pairs = cfg.model.layer_pairs()
  if mcfg.leaves == "all":
    return pairs
  return {second: first for second, first in pairs.items()
          if not _norm_leaf(f"{second}/scale", cfg)}


def init(params: Params, cfg: Any, rng: jax.Array) -> Params:
  """A fresh backbone tree in shared storage (see the module docstring)."""
  del rng
  mcfg, depth = cfg.method(NAME), cfg.model.num_blocks
  blocks = params["blocks"]
  blocks = {k: v for k, v in blocks.items() if k not in _pairs(cfg, mcfg)}
  out = dict(params)
  source = mcfg.source_map(depth)
  if source is not None:
    first = [source.index(s) for s in range(mcfg.stored_blocks(depth))]
    shared = gather_blocks(blocks, first)
    if mcfg.split_norms(depth):
      shared, _ = _split(shared, cfg)
      _, out["block_norms"] = _split(blocks, cfg)
    blocks = shared
  out["blocks"] = blocks
  return out


def run_blocks(params: Params, cfg: Any) -> Params:
  """The block tree of every run position, [L, ...]."""
  mcfg = cfg.method(NAME)
  blocks = params["blocks"]
  source = mcfg.source_map(cfg.model.num_blocks)
  if source is not None:
    blocks = gather_blocks(blocks, source)
  blocks = {**blocks, **params.get("block_norms", {})}
  for second, first in _pairs(cfg, mcfg).items():
    blocks.setdefault(second, blocks[first])
  return blocks


def stacks(cfg: Any) -> tuple[str, ...]:
  """Per-position subtrees (the stored `blocks` follow `block_map`)."""
  mcfg = cfg.method(NAME)
  return ("block_norms",) if mcfg.split_norms(cfg.model.num_blocks) else ()


def block_map(cfg: Any) -> tuple[int, ...] | None:
  return cfg.method(NAME).source_map(cfg.model.num_blocks)


def grown(cfg: Any, sources: tuple[int, ...]) -> CpRecConfig:
  """The sharing of a model grown by StackRec's map `sources` (deep
  position -> shallow position, FRESH = new): a copy runs its source's
  stored block (no new array); each fresh position gets a new stored block
  on top."""
  mcfg = cfg.method(NAME)
  shared = mcfg.source_map(cfg.model.num_blocks)
  if shared is None:
    return mcfg
  stored = mcfg.stored_blocks(cfg.model.num_blocks)
  fresh = iter(range(stored, stored + len(sources)))
  return CpRecConfig(
      share=mcfg.share, period=mcfg.period, leaves=mcfg.leaves,
      block_source=tuple(shared[j] if j != FRESH else next(fresh)
                         for j in sources))


def report(params: Params, cfg: Any, data: Any) -> dict[str, Any]:
  """The compression ratio against the unshared model."""
  del params, data
  return {"compression_ratio": models.compression_ratio(cfg)}

