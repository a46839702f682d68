"""Orbax checkpoints of a run directory, with JSON metadata and lineage.

Layout of a run directory:

  DIR/config.json              the full Config (a resume must match it)
  DIR/checkpoints/latest/N/    state (params, opt_state, step) + meta: for
                               --resume; the newest `keep` are kept
  DIR/checkpoints/best/N/      params + meta of the best validation so far

Each checkpoint's `meta` item is JSON: the format (`jaxrec/2`), the
backbone and head names, the full config, the data fingerprint, the training
position and the lineage (the checkpoints this one was grown or fine-tuned
from, oldest first). Checkpoints of jaxrec 0.1 (`jaxrec.nextitnet/1`: the
output layer under `softmax`, the head options in the model config) are
converted when their params are loaded; a run in that format cannot be
resumed (its optimizer state has another layout), which says so in one
line. Orbax writes every step into a
temporary directory and renames it when complete, so a kill during a save
leaves the previous checkpoint as the latest one.
"""
from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from jaxrec import config as config_lib
from jaxrec.errors import JaxrecError, first_line

FORMAT = "jaxrec/2"
LEGACY_FORMATS = ("jaxrec.nextitnet/1",)


def manager(run_dir: str, kind: str, keep: int = 1,
            read_only: bool = False) -> ocp.CheckpointManager:
  """The `latest` or `best` checkpoint manager of a run directory."""
  path = os.path.join(os.path.abspath(run_dir), "checkpoints", kind)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(path, options=options,
                               item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         meta: dict[str, Any]) -> None:
  """Starts an async save; call `mngr.wait_until_finished()` before exit."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def restore(mngr: ocp.CheckpointManager, step: int | None = None,
            target: Any = None) -> tuple[Any, dict[str, Any]]:
  """Restores (state, meta) at `step` (default: the newest).

  `target` is an abstract tree (jax.ShapeDtypeStruct leaves with shardings):
  the state is restored into exactly that structure and placement. Without
  it the tree is restored as saved (e.g. to grow it into another shape).
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise JaxrecError(f"{mngr.directory}: no checkpoint found")
  state_arg = (ocp.args.StandardRestore(target) if target is not None
               else ocp.args.StandardRestore())
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=state_arg, meta=ocp.args.JsonRestore()))
  except ValueError as e:
    if target is None:
      raise
    # Orbax's structure/shape mismatch: the arrays are not those the
    # checkpoint's own config implies (a tampered or foreign checkpoint).
    detail = first_line(e)
    raise JaxrecError(f"{mngr.directory}/{step}: the saved arrays do not "
                      f"fit the checkpoint's config: {detail}") from None
  state = restored.state
  abstract = [x for x in jax.tree.leaves(state)
              if isinstance(x, jax.ShapeDtypeStruct)]
  if abstract:  # A partial restore must not leave a leaf unfilled.
    raise JaxrecError(f"{mngr.directory}/{step}: {len(abstract)} leaves were "
                      "not restored")
  return state, restored.meta


class Opened(NamedTuple):
  """A run's checkpoint, opened: its manager, kind, newest step and meta."""
  mngr: ocp.CheckpointManager
  kind: str
  step: int
  meta: dict[str, Any]


def default_kind(run_dir: str) -> str:
  """`best` when the run has validated, else `latest` (e.g. a grown model)."""
  best = os.path.join(run_dir, "checkpoints", "best")
  return "best" if os.path.isdir(best) else "latest"


def open_checkpoint(run_dir: str, kind: str | None = None) -> Opened:
  """Opens the newest `kind` checkpoint (default: `default_kind`) and reads
  its JSON metadata, without reading any array."""
  kind = kind or default_kind(run_dir)
  mngr = open_existing(run_dir, kind)
  step = mngr.latest_step()
  meta = mngr.restore(step, args=meta_args()).meta
  return Opened(mngr, kind, step, meta)


def meta_args() -> ocp.args.Composite:
  """Restore args that read a checkpoint's JSON metadata and no array."""
  return ocp.args.Composite(meta=ocp.args.JsonRestore())


def read_meta(run_dir: str,
              kind: str | None = None) -> tuple[int, dict[str, Any]]:
  """The newest step and its JSON metadata, without reading any array."""
  opened = open_checkpoint(run_dir, kind)
  return opened.step, opened.meta


def open_existing(run_dir: str, kind: str) -> ocp.CheckpointManager:
  """A read-only manager for a directory that must hold a checkpoint."""
  path = os.path.join(os.path.abspath(run_dir), "checkpoints", kind)
  if not os.path.isdir(path):
    raise JaxrecError(f"{run_dir}: no jaxrec checkpoints here (expected "
                      f"{os.path.join(run_dir, 'checkpoints', kind)})")
  mngr = manager(run_dir, kind, read_only=True)
  if mngr.latest_step() is None:
    raise JaxrecError(f"{path}: holds no complete checkpoint")
  return mngr


def check_format(meta: dict[str, Any], origin: str,
                 legacy_ok: bool = True) -> None:
  """Refuses a checkpoint of another program or of an unreadable version."""
  found = meta.get("format")
  if found == FORMAT or (legacy_ok and found in LEGACY_FORMATS):
    return
  readable = [FORMAT, *LEGACY_FORMATS] if legacy_ok else [FORMAT]
  raise JaxrecError(f"{origin}: checkpoint format {found!r}; expected "
                    + " or ".join(repr(f) for f in readable)
                    + ("" if legacy_ok or found not in LEGACY_FORMATS else
                       " (start a new run from it with --init-from)"))


def is_legacy(meta: dict[str, Any]) -> bool:
  return meta.get("format") in LEGACY_FORMATS


def config_from_meta(meta: dict[str, Any], origin: str) -> config_lib.Config:
  """The Config a checkpoint was written with (legacy ones upgraded)."""
  check_format(meta, origin)
  return config_lib.from_dict(meta["config"], origin=f"{origin}: config")


def convert_legacy_params(params: dict[str, Any]) -> dict[str, Any]:
  """jaxrec.nextitnet/1 params -> the current tree: the output layer moves
  from `softmax` to `head`; the backbone leaves are unchanged."""
  out = {k: v for k, v in params.items() if k != "softmax"}
  out["head"] = params["softmax"]
  return out


def make_meta(cfg: config_lib.Config, data_fingerprint: str, step: int,
              lineage: list[dict[str, Any]],
              **extra: Any) -> dict[str, Any]:
  return {"format": FORMAT, "backbone": cfg.model.name,
          "head": cfg.head.name, "config": cfg.to_dict(), "step": int(step),
          "data_fingerprint": data_fingerprint, "lineage": lineage, **extra}


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically: a reader never sees half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
