"""The train state, what each checkpoint kind holds, and restoring params.

A train state is a plain dict: `params`, `opt_state`, `step` and
`first_bad_step` (the first step whose loss was not finite, tracked on
device so the loop names it without syncing every step). `latest`
checkpoints hold the whole state; `best` ones only the params.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxrec import models
from jaxrec.config import Config
from jaxrec.errors import JaxrecError
from jaxrec.training import checkpoints
from jaxrec.training import optim

State = dict[str, Any]


def optimizer_for(cfg: Config, params: Any,
                  total_steps: int | None = None) -> tuple[Any, Any]:
  """(optimizer, labels) of a run: `train.freeze` decides the labels;
  `total_steps` is the schedule's horizon (structure does not depend on it)."""
  labels = optim.trainable_labels(params, cfg.train.freeze)
  return optim.make_optimizer(cfg.train, labels, total_steps), labels


def init_state(params: models.Params,
               opt: optax.GradientTransformation) -> State:
  return {"params": params, "opt_state": opt.init(params),
          "step": jnp.zeros((), jnp.int32),
          "first_bad_step": jnp.full((), -1, jnp.int32)}


def abstract_state(cfg: Config, kind: str = "latest",
                   sharding: Any = None) -> Any:
  """The tree a checkpoint of `kind` holds, as ShapeDtypeStructs."""
  def build():
    params = models.init_params(cfg, jax.random.key(0))
    if kind != "latest":
      return {"params": params}
    return init_state(params, optimizer_for(cfg, params)[0])

  tree = jax.eval_shape(build)
  if sharding is not None:
    tree = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        tree)
  return tree


def restore_params(opened: checkpoints.Opened, cfg: Config, origin: str,
                   sharding: Any = None) -> models.Params:
  """The params of an opened checkpoint, in the tree `cfg` implies.

  Current checkpoints restore straight into the tree their kind holds
  (placed by `sharding`); legacy ones are restored as saved, converted and
  checked.
  """
  if not checkpoints.is_legacy(opened.meta):
    state, _ = checkpoints.restore(
        opened.mngr, opened.step,
        target=abstract_state(cfg, opened.kind, sharding))
    return state["params"]
  raw, _ = checkpoints.restore(opened.mngr, opened.step)
  if not isinstance(raw, dict) or "params" not in raw:
    raise JaxrecError(f"{origin}: checkpoint state holds no params")
  params = checkpoints.convert_legacy_params(raw["params"])
  models.require_fit(params, cfg, f"{origin}: the converted params")
  if sharding is not None:
    params = jax.device_put(params, sharding)
  return params


def load_params(run_dir: str, kind: str | None = None,
                sharding: Any = None, params_only: bool = True
                ) -> tuple[models.Params, Config, dict]:
  """(params, config, meta) of a run's checkpoint: the notebook entry point.

  `kind` is best (default when the run validated) or latest; `sharding`
  (e.g. a NamedSharding of another mesh; default: the first device) places
  every leaf. `params_only` (default) reads the params alone: a `latest`
  checkpoint's optimizer state (twice the params, for Adam) is never read
  (Orbax partial restore). `params_only=False` returns the whole saved
  state instead of the params (`params`, `opt_state`, `step`, ... for
  `latest`), e.g. to look at Adam's moments.
  """
  opened = checkpoints.open_checkpoint(run_dir, kind)
  cfg = checkpoints.config_from_meta(opened.meta, run_dir)
  if not params_only:
    if checkpoints.is_legacy(opened.meta):
      raise JaxrecError(f"{run_dir}: params_only=False reads a current "
                        "checkpoint's state; this one is jaxrec 0.1's")
    state, _ = checkpoints.restore(
        opened.mngr, opened.step,
        target=abstract_state(cfg, opened.kind, sharding))
    return state, cfg, opened.meta
  if opened.kind == "latest" and not checkpoints.is_legacy(opened.meta):
    target = abstract_state(cfg, "best", sharding or _default_sharding())
    params = checkpoints.restore_subtree(opened.mngr, opened.step, "params",
                                         target["params"])
    return params, cfg, opened.meta
  return (restore_params(opened, cfg, run_dir, sharding), cfg,
          opened.meta)


def _default_sharding() -> Any:
  """Where a restore puts arrays when the caller names no sharding (a
  partial restore needs one, or it returns numpy arrays)."""
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])
