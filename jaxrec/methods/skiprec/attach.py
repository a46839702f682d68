"""Adding a SkipRec policy to a trained backbone: SkipRec starts from a
trained model (alpha residuals) and trains backbone and policy jointly.

`add_policy(params, cfg, rng, **options)` is the function;
`attach_checkpoint(src, out, ...)` saves the result as step 0 of a new run
(`jaxrec train --init-from OUT`). `jaxrec train --init-from TRAINED --skip
gumbel ...` does the same in one go (the loop attaches every requested
method the source lacks, `jaxrec.method_api.attach`).
"""
from __future__ import annotations

from typing import Any

import jax

from jaxrec.errors import JaxrecError
from jaxrec.methods.skiprec import policy
from jaxrec.methods.skiprec.config import SkipRecConfig
from jaxrec.surgery.checkpoint import apply_to_checkpoint

NAME = SkipRecConfig.NAME


def init(params: dict, cfg: Any, rng: jax.Array) -> dict:
  """A fresh policy beside a fresh backbone."""
  return {**params, NAME: policy.init(cfg.model, cfg.method(NAME), rng)}


def attach(params: dict, cfg: Any, rng: jax.Array) -> dict:
  """A fresh policy beside a trained backbone; with `init_embedding`
  (default) its embedding is a copy of the backbone's (official
  `--use_pre`)."""
  mcfg = cfg.method(NAME)
  fresh = policy.init(cfg.model, mcfg, rng)
  if mcfg.init_embedding:
    fresh = policy.embedding_from_backbone(fresh, params, cfg.model, mcfg)
  return {**params, NAME: fresh}


def add_policy(params: dict, cfg: Any, rng: jax.Array,
               **options: Any) -> tuple[dict, Any]:
  """(params with a fresh `skiprec` subtree, cfg with SkipRec on)."""
  if NAME in params or cfg.method(NAME) is not None:
    raise JaxrecError("methods.skiprec: the model already has a policy")
  new_cfg = cfg.with_method(SkipRecConfig(**options)).validate()
  return attach(params, new_cfg, rng), new_cfg


def attach_checkpoint(src_dir: str, out_dir: str, seed: int = 0,
                      **options: Any) -> Any:
  """Adds a policy to a run's checkpoint; saves step 0 of `out_dir`."""
  def fn(params, cfg):
    return add_policy(params, cfg, jax.random.key(seed), **options)

  return apply_to_checkpoint(src_dir, out_dir, fn,
                             {"op": "add_policy", "seed": seed, **options})
