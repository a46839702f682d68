"""Adding a SkipRec policy to a backbone: SkipRec starts from a trained
NextItNet (alpha blocks) and trains backbone and policy jointly.

`add_policy(params, cfg, rng, **options)` is the function;
`attach_checkpoint(src, out, ...)` saves the result as step 0 of a new run
(`jaxrec train --init-from OUT`); `policy_if_asked` lets `jaxrec train
--init-from TRAINED --skip gumbel ...` do the same in one go.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxrec.errors import JaxrecError
from jaxrec.skip import policy

SKIP_FIELDS = ("skip", "skip_lambda", "skip_tau", "skip_train_split",
               "skip_confine", "skip_rl_penalty", "skip_init_embedding")
STRUCTURAL = ("skip_policy_dim",)  # Fields that shape the policy's params.


def skip_options(model_cfg: Any, structural: bool = True) -> dict[str, Any]:
  names = SKIP_FIELDS + (STRUCTURAL if structural else ())
  return {k: getattr(model_cfg, k) for k in names}


def add_policy(params: dict, cfg: Any, rng: jax.Array,
               **options: Any) -> tuple[dict, Any]:
  """(params with a fresh `policy` subtree, cfg with the skip options).

  The backbone and head leaves are returned as they are. With
  `skip_init_embedding` (default) the policy's embedding is a copy of the
  backbone's, as the official `--use_pre`.
  """
  if not hasattr(cfg.model, "skip"):
    raise JaxrecError(f"model.skip: backbone {cfg.model.name!r} has no "
                      "SkipRec support (nextitnet has)")
  if "policy" in params:
    raise JaxrecError("model.skip: the model already has a policy")
  model = dataclasses.replace(cfg.model, **options)
  if model.skip == "none":
    raise JaxrecError("model.skip='none': name a policy (gumbel or rl)")
  model.validate()
  if getattr(model, "residual", "alpha") != "alpha":
    raise JaxrecError(f"model.residual={model.residual!r}: SkipRec starts "
                      "from an alpha-residual NextItNet (NextItNet+)")
  new_cfg = cfg.replace(model=model)
  fresh = policy.init(model, rng)
  if model.skip_init_embedding:
    fresh = policy.embedding_from_backbone(fresh, params, model)
  return {**params, "policy": fresh}, new_cfg


def policy_if_asked(requested_model: Any, cfg: Any, params: dict,
                    lineage: list, with_opt_state: bool
                    ) -> tuple[Any, dict, list]:
  """`train --init-from` takes the source's model config; SkipRec options
  asked for this run (model.skip != none) would be lost silently. They are
  applied here: a policy is added to a plain backbone; a SkipRec source
  keeps its policy and takes the new training options (lambda, tau, ...)."""
  if getattr(requested_model, "skip", "none") == "none":
    return cfg, params, lineage
  if "policy" in params:
    model = dataclasses.replace(
        cfg.model, **skip_options(requested_model, structural=False))
    return cfg.replace(model=model), params, lineage
  if with_opt_state:
    raise JaxrecError("--init-opt-state: the source has no SkipRec policy, "
                      "so its optimizer state has no moments for one; drop "
                      "--init-opt-state")
  params, cfg = add_policy(params, cfg, jax.random.key(cfg.train.seed),
                           **skip_options(requested_model))
  return cfg, params, lineage + [{"op": "add_policy",
                                  **skip_options(requested_model)}]


def attach_checkpoint(src_dir: str, out_dir: str, seed: int = 0,
                      **options: Any) -> Any:
  """Adds a policy to a run's checkpoint; saves step 0 of `out_dir`."""
  from jaxrec.surgery.checkpoint import apply_to_checkpoint  # pylint: disable=import-outside-toplevel

  def fn(params, cfg):
    return add_policy(params, cfg, jax.random.key(seed), **options)

  return apply_to_checkpoint(src_dir, out_dir, fn,
                             {"op": "add_policy", "seed": seed, **options})
