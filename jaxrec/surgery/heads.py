"""A new output head on a trained backbone (transfer to a target domain).

The item embedding and the blocks are kept; the `head` subtree is drawn
fresh from the head's init, as StackRec's TF scenario and PeterRec's
fine-tuning do with the pretrained softmax.
"""
from __future__ import annotations

from typing import Any

import jax

from jaxrec import heads
from jaxrec.config import Config
from jaxrec.surgery.checkpoint import apply_to_checkpoint

Params = dict[str, Any]


def new_output_head(params: Params, cfg: Config,
                    rng: jax.Array) -> Params:
  """`params` with `head` re-initialised for `cfg.head`."""
  out = dict(params)
  out["head"] = heads.get(cfg.head.name).init(cfg.head, cfg.model, rng)
  return out


def new_head_checkpoint(src_dir: str, out_dir: str, seed: int = 0) -> Config:
  """Saves `src_dir`'s params with a fresh head as step 0 of `out_dir`."""
  return apply_to_checkpoint(
      src_dir, out_dir,
      lambda params, cfg: (new_output_head(params, cfg,
                                           jax.random.key(seed)), cfg),
      {"op": "new_output_head", "seed": seed})
