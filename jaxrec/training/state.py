"""The train state, what each checkpoint kind holds, and restoring params.

A train state is a plain dict: `params`, `opt_state`, `step` and
`first_bad_step` (the first step whose loss was not finite, tracked on
device so the loop names it without syncing every step). `latest`
checkpoints hold the whole state; `best` ones only the params.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

import jax
import numpy as np
import jax.numpy as jnp
import optax

from jaxrec import config as config_lib
from jaxrec import method_api, models
from jaxrec.config import Config
from jaxrec.errors import JaxrecError
from jaxrec.training import checkpoints
from jaxrec.training import checkpoint_meta
from jaxrec.training import orbax_io
from jaxrec.training import optim

State = dict[str, Any]


@dataclasses.dataclass
class Progress:
  """What a resume needs besides the arrays: early stopping and the clock."""
  best_metric: float = -1.0
  best_step: int = -1
  evals_since_best: int = 0
  train_time_s: float = 0.0
  best_valid: dict[str, float] | None = None

  def record(self, valid: dict[str, float], metric: str, step: int) -> bool:
    """Takes one validation; True if it is the best so far."""
    improved = valid[metric] > self.best_metric
    if improved:
      self.best_metric, self.best_step = valid[metric], step
      self.evals_since_best, self.best_valid = 0, valid
    else:
      self.evals_since_best += 1
    return improved

  def stopped(self, patience: int) -> bool:
    """Early stopping: `patience` validations without a gain (0: never)."""
    return bool(patience) and self.evals_since_best >= patience


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


def stored_params(params: models.Params, cfg: Config) -> models.Params:
  """What a checkpoint holds of `params`: all of them, or only the
  trainable leaves when the frozen ones live in another run's checkpoint
  (`train.frozen_from`: a fine-tuning stores its patches and head, not a
  second copy of the pretrained backbone)."""
  if not cfg.train.frozen_from:
    return params
  return select(params, optim.trainable_labels(params, cfg.train.freeze),
                optim.TRAIN)


def frozen_params(params: models.Params, cfg: Config) -> models.Params:
  """The frozen leaves of `params` (by `train.freeze`), as a nested dict."""
  return select(params, optim.trainable_labels(params, cfg.train.freeze),
                optim.FROZEN)


def select(tree: Any, labels: Any, want: str) -> Any:
  """The nested dict of `tree`'s leaves labelled `want` (empty dicts
  dropped)."""
  if not isinstance(tree, dict):
    return tree if labels == want else None
  out = {}
  for key, sub in tree.items():
    picked = select(sub, labels[key], want)
    if picked is not None and not (isinstance(picked, dict) and not picked):
      out[key] = picked
  return out


def graft(tree: Any, other: Any) -> Any:
  """The union of two nested dicts with disjoint leaves."""
  if not isinstance(other, dict) or not other:
    return tree
  out = dict(tree)
  for key, sub in other.items():
    out[key] = graft(out[key], sub) if key in out else sub
  return out


def storable(state: State, cfg: Config) -> State:
  """The train state as a `latest` checkpoint holds it."""
  return {**state, "params": stored_params(state["params"], cfg)}


def abstract_state(cfg: Config, kind: str = "latest",
                   sharding: Any = None) -> Any:
  """The tree a checkpoint of `kind` holds, as ShapeDtypeStructs placed by
  `sharding`: one Sharding for every leaf, or a function from the tree to
  a tree of them (`Sharder.shardings`: tables split by rows)."""
  def build():
    params = models.init_params(cfg, jax.random.key(0))
    if kind != "latest":
      return {"params": stored_params(params, cfg)}
    return storable(init_state(params, optimizer_for(cfg, params)[0]), cfg)

  tree = jax.eval_shape(build)
  if sharding is None:
    # Orbax refuses to restore a checkpoint saved on another topology (8
    # devices, several hosts) without a placement: default to one device.
    sharding = _default_sharding()
  if not isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        tree, sharding(tree))
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      tree)


def restore_params(opened: checkpoints.Opened, cfg: Config, origin: str,
                   sharding: Any = None) -> models.Params:
  """The params of an opened checkpoint, in the tree `cfg` implies.

  Current checkpoints restore straight into the tree their kind holds
  (placed by `sharding`); legacy ones are restored as saved, converted and
  checked.
  """
  if not saved_layout_differs(opened.meta, cfg):
    state, _ = orbax_io.restore(
        opened.mngr, opened.step,
        target=abstract_state(cfg, opened.kind, sharding))
    if cfg.train.frozen_from:
      return graft(state["params"],
                   load_frozen(cfg, opened.meta, origin, sharding))
    return state["params"]
  raw, _ = orbax_io.restore(opened.mngr, opened.step)
  if not isinstance(raw, dict) or "params" not in raw:
    raise JaxrecError(f"{origin}: checkpoint state holds no params")
  params = convert_saved_params(raw["params"], opened.meta, cfg)
  models.require_fit(params, cfg, f"{origin}: the converted params")
  if sharding is not None:
    params = jax.device_put(params, sharding)
  return params


def load_params(run_dir: str, kind: str | None = None,
                sharding: Any = None, params_only: bool = True,
                step: int | None = None
                ) -> tuple[models.Params, Config, dict]:
  """(params, config, meta) of a run's checkpoint: the notebook entry point.

  `kind` is best (default when the run validated) or latest; `sharding`
  (e.g. a NamedSharding of another mesh; default: the first device) places
  every leaf, or `Sharder(make_mesh(spec=...)).shardings` splits the
  tables by rows over that mesh's `model` axis (any mesh: a checkpoint
  trained on 8 devices opens on 1, and the other way round). `step`
  defaults to the best (or newest latest) one.
  `params_only` (default) reads the params alone: a `latest` checkpoint's
  optimizer state (twice the params, for Adam) is never read (Orbax
  partial restore). `params_only=False` returns the whole saved state
  instead of the params (`params`, `opt_state`, `step`, ... for `latest`),
  e.g. to look at Adam's moments. A fine-tuning that stores only its
  trainable leaves comes back whole: its frozen leaves are read from the
  pretrained checkpoint it records, and checked against the fingerprint
  taken when fine-tuning began.
  """
  opened = checkpoints.open_checkpoint(run_dir, kind, step)
  cfg = checkpoint_meta.config_from_meta(opened.meta, run_dir)
  if not params_only:
    if saved_layout_differs(opened.meta, cfg):
      raise JaxrecError(f"{run_dir}: params_only=False reads a current "
                        "checkpoint's state; this one is in an older layout")
    state, _ = orbax_io.restore(
        opened.mngr, opened.step,
        target=abstract_state(cfg, opened.kind, sharding))
    return state, cfg, opened.meta
  if opened.kind == "latest" and not saved_layout_differs(opened.meta, cfg):
    target = abstract_state(cfg, "best", sharding or _default_sharding())
    params = orbax_io.restore_subtree(opened.mngr, opened.step, "params",
                                      target["params"])
    if cfg.train.frozen_from:
      params = graft(params, load_frozen(cfg, opened.meta, run_dir,
                                         sharding))
    return params, cfg, opened.meta
  return (restore_params(opened, cfg, run_dir, sharding), cfg,
          opened.meta)


def saved_layout_differs(meta: dict[str, Any], cfg: Config) -> bool:
  """Whether the saved params are laid out otherwise than `cfg` implies:
  jaxrec 0.1's, or config version 2's with methods whose leaves have moved
  since (`Method.param_moves`). Such a checkpoint is restored as saved and
  converted (`convert_saved_params`): Orbax cannot restore into another
  structure."""
  version = (meta.get("config") or {}).get("version",
                                            config_lib.CONFIG_VERSION)
  moved = version < 3 and any(method_api.get(m.NAME).param_moves
                              for m in cfg.methods)
  return checkpoint_meta.is_legacy(meta) or moved


def convert_saved_params(params: models.Params, meta: dict[str, Any],
                         cfg: Config) -> models.Params:
  """Saved params in the current layout (see `saved_layout_differs`)."""
  if checkpoint_meta.is_legacy(meta):
    params = checkpoint_meta.convert_legacy_params(params)
  return method_api.move_legacy_params(params, cfg.methods)


def refuse_finetuning(cfg: Config, origin: str, what: str) -> None:
  """A fine-tuning's tree (its own head, patches, CLS) and data belong to
  its downstream task: training it as a sequence model, or saving a
  surgery of it whose config still points at frozen leaves elsewhere,
  would break it."""
  if cfg.train.task != "auto":
    raise JaxrecError(f"{origin}: a fine-tuning ({cfg.train.task}); {what} "
                      "starts from a pretraining run (continue this one "
                      "with jaxrec finetune --resume)")


FINETUNE_OP = "finetune"  # The lineage entry that names a frozen backbone.


def frozen_source(meta: dict[str, Any], origin: str) -> dict[str, Any]:
  """The lineage entry of the fine-tuning whose backbone stays frozen."""
  for entry in reversed(meta.get("lineage") or []):
    if entry.get("op") == FINETUNE_OP:
      return entry
  raise JaxrecError(f"{origin}: stores only trainable leaves but its "
                    "lineage names no pretrained checkpoint to read the "
                    "frozen ones from")


def tree_fingerprint(tree: Any) -> str:
  """SHA-256 (16 hex digits) of every leaf's path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    arr = np.asarray(jax.device_get(leaf))
    h.update(f"{optim.path_name(path)}:{arr.dtype}:{arr.shape};".encode())
    h.update(arr.tobytes())
  return h.hexdigest()[:16]


def load_frozen(cfg: Config, meta: dict[str, Any], origin: str,
                sharding: Any = None) -> models.Params:
  """The frozen leaves of a fine-tuning, read from its pretrained run."""
  src = frozen_source(meta, origin)
  where = f"{src['dir']} ({src['kind']} step {src['step']})"
  if not os.path.isdir(src["dir"]):
    raise JaxrecError(f"{origin}: its frozen backbone {src['dir']} is gone; "
                      "the fine-tuning stores only its trainable leaves")
  pretrained, _, _ = load_params(src["dir"], src["kind"], sharding,
                                 step=src["step"])
  wanted = frozen_params(models.abstract_params(cfg), cfg)
  try:
    frozen = select_like(pretrained, wanted)
  except KeyError as e:
    raise JaxrecError(f"{origin}: its frozen backbone {where} has no leaf "
                      f"{e.args[0]!r}") from None
  if tree_fingerprint(frozen) != src["frozen_fingerprint"]:
    raise JaxrecError(f"{origin}: its frozen backbone {where} changed since "
                      "the fine-tuning began (fingerprint differs)")
  return frozen


def select_like(tree: Any, like: Any) -> Any:
  """`tree`'s leaves at the paths of `like` (KeyError names a missing key)."""
  if not isinstance(like, dict):
    return tree
  return {k: select_like(tree[k], sub) for k, sub in like.items()}


def _default_sharding() -> Any:
  """Where a restore puts arrays when the caller names no sharding (a
  partial restore needs one, or it returns numpy arrays)."""
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])
