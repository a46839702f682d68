"""Orbax checkpoints of a run directory, with JSON metadata and lineage.

Layout of a run directory:

  DIR/config.json              the full Config (a resume must match it)
  DIR/checkpoints/latest/N/    state (params, opt_state, step) + meta: for
                               --resume; the newest `keep` are kept
  DIR/checkpoints/best/N/      params + meta of the best validation so far
                               (the step the newest `latest` records)
  DIR/checkpoints/damaged/     steps a resume found unreadable, set aside

Each checkpoint's `meta` item is JSON: the format (`jaxrec/2`), the
backbone and head names, the full config, the data fingerprint, the training
position and the lineage (the checkpoints this one was grown or fine-tuned
from, oldest first). Checkpoints of jaxrec 0.1 (`jaxrec.nextitnet/1`: the
output layer under `softmax`, the head options in the model config) are
converted when their params are loaded; a run in that format cannot be
resumed (its optimizer state has another layout), which says so in one
line. Orbax writes every step into a
temporary directory and renames it when complete, so a kill during a save
leaves the previous checkpoint as the latest one; `RunCheckpoints` orders
a run's saves so the record of the best step and the files always agree.
Every read is verified, and an unreadable step is one `CheckpointDamaged`
line naming DIR/checkpoints/KIND/STEP.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import (preservation_policy,
                                                 save_decision_policy)

from jaxrec import config as config_lib
from jaxrec.errors import (CheckpointDamaged, JaxrecError, describe,
                           reported_as)

FORMAT = "jaxrec/2"
LEGACY_FORMATS = ("jaxrec.nextitnet/1",)


def manager(run_dir: str, kind: str, keep: int | None = 1,
            read_only: bool = False) -> ocp.CheckpointManager:
  """The `latest` or `best` checkpoint manager of a run directory (`keep`
  None: Orbax deletes nothing; `RunCheckpoints` prunes `best` itself).

  Orbax's policies, not its deprecated `max_to_keep`: the newest `keep`
  steps are preserved, and every save the loop asks for is made (the loop
  decides when: at validations, and at a multi-process stop)."""
  path = os.path.join(os.path.abspath(run_dir), "checkpoints", kind)
  options = ocp.CheckpointManagerOptions(
      preservation_policy=(None if keep is None else
                           preservation_policy.LatestN(keep)),
      save_decision_policy=save_decision_policy.FixedIntervalPolicy(1),
      create=not read_only, read_only=read_only,
      enable_async_checkpointing=not read_only,
      cleanup_tmp_directories=not read_only)
  with reported_as(path, "open the checkpoint directory"):
    return ocp.CheckpointManager(path, options=options,
                                 item_names=("state", "meta"))


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  """DIR/checkpoints/KIND/STEP: what every checkpoint error names."""
  return f"{mngr.directory}/{step}"


def save(mngr: ocp.CheckpointManager, step: int, state: Any,
         meta: dict[str, Any]) -> None:
  """Starts an async save; `wait` for it (errors surface there)."""
  with reported_as(step_dir(mngr, step), "save the checkpoint"):
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def wait(mngr: ocp.CheckpointManager, step: int | None,
         last_complete: int | None) -> None:
  """Waits for the pending async save of `step`. A failed save (a full
  disk, a read-only file system) is reported here, naming the step that
  failed and the last complete one, instead of as a traceback one save
  later."""
  try:
    mngr.wait_until_finished()
    if step is not None and step not in mngr.all_steps(read=True):
      raise OSError("the save did not complete")
  except Exception as e:  # pylint: disable=broad-exception-caught
    kept = ("no checkpoint is complete" if last_complete is None else
            f"the last complete checkpoint is step {last_complete}")
    origin = step_dir(mngr, step) if step is not None else mngr.directory
    raise JaxrecError(f"{origin}: cannot save the checkpoint: {describe(e)}; "
                      f"{kept}") from None


def restore(mngr: ocp.CheckpointManager, step: int | None = None,
            target: Any = None) -> tuple[Any, dict[str, Any]]:
  """Restores (state, meta) at `step` (default: the newest), verified.

  `target` is an abstract tree (jax.ShapeDtypeStruct leaves with shardings):
  the state is restored into exactly that structure and placement. Without
  it the tree is restored as saved (e.g. to grow it into another shape).
  Unreadable files raise `CheckpointDamaged` naming DIR/checkpoints/KIND/
  STEP; arrays that read but do not fit `target` are a checkpoint of
  another model.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise JaxrecError(f"{mngr.directory}: no checkpoint found")
  origin = step_dir(mngr, step)
  if step not in mngr.all_steps():
    raise JaxrecError(f"{origin}: no such checkpoint")
  try:
    with reported_as(origin, "read the checkpoint", CheckpointDamaged):
      restored = mngr.restore(step, args=_restore_args(target))
  except CheckpointDamaged:
    if target is None or not _readable_as_saved(mngr, step):
      raise
    raise JaxrecError(f"{origin}: a checkpoint of another model: its arrays "
                      "do not fit the config in its metadata") from None
  state, meta = restored.state, restored.meta
  _verify(origin, state, meta, step)
  return state, meta


def _restore_args(target: Any) -> ocp.args.Composite:
  state_arg = (ocp.args.StandardRestore(target) if target is not None
               else ocp.args.StandardRestore())
  return ocp.args.Composite(state=state_arg, meta=ocp.args.JsonRestore())


def _readable_as_saved(mngr: ocp.CheckpointManager, step: int) -> bool:
  """Whether the arrays read back in their own saved shapes."""
  try:
    mngr.restore(step, args=_restore_args(None))
    return True
  except Exception:  # pylint: disable=broad-exception-caught
    return False


def _verify(origin: str, state: Any, meta: Any, step: int) -> None:
  """Guards against a restore that 'succeeds' with the wrong content: an
  unfilled leaf, metadata of another step, a step counter that disagrees."""
  require_jaxrec_meta(meta, origin)
  abstract = [x for x in jax.tree.leaves(state)
              if isinstance(x, jax.ShapeDtypeStruct)]
  if abstract:  # A partial restore must not leave a leaf unfilled.
    raise CheckpointDamaged(f"{origin}: {len(abstract)} leaves were not "
                            "restored")
  if meta.get("step", step) != step:
    raise CheckpointDamaged(f"{origin}: its metadata names step "
                            f"{meta.get('step')!r}")
  saved_step = state.get("step") if isinstance(state, dict) else None
  if saved_step is not None and int(saved_step) != step:
    raise CheckpointDamaged(f"{origin}: its state holds step "
                            f"{int(saved_step)}")


def restore_subtree(mngr: ocp.CheckpointManager, step: int, name: str,
                    target: Any) -> Any:
  """One top-level subtree (`params`) of a step's state, reading no other
  array (Orbax's partial restore): `jaxrec.training.state.load_params`
  without the optimizer state. `target` is that subtree's abstract tree."""
  origin = step_dir(mngr, step)
  if step not in mngr.all_steps():
    raise JaxrecError(f"{origin}: no such checkpoint")
  item = {name: target}
  path = os.path.join(origin, "state")
  with reported_as(origin, "read the checkpoint", CheckpointDamaged):
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True))
  if not isinstance(restored, dict) or name not in restored:
    raise CheckpointDamaged(f"{origin}: its state holds no {name!r}")
  abstract = [x for x in jax.tree.leaves(restored[name])
              if isinstance(x, jax.ShapeDtypeStruct)]
  if abstract:  # A partial restore must not leave a leaf unfilled.
    raise CheckpointDamaged(f"{origin}: {len(abstract)} leaves were not "
                            "restored")
  return restored[name]


def state_metadata(mngr: ocp.CheckpointManager, step: int) -> Any:
  """A step's state as saved, as ShapeDtypeStructs read from Orbax's
  metadata (no array is read): what `jaxrec inspect` shows."""
  origin = step_dir(mngr, step)
  with reported_as(origin, "read the checkpoint's array metadata",
                   CheckpointDamaged):
    meta = ocp.StandardCheckpointer().metadata(os.path.join(origin, "state"))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                        dict(tree))


class Opened(NamedTuple):
  """A run's checkpoint, opened: its manager, kind, step and meta."""
  mngr: ocp.CheckpointManager
  kind: str
  step: int
  meta: dict[str, Any]


def default_kind(run_dir: str) -> str:
  """`best` when the run has validated, else `latest` (e.g. a grown model)."""
  best = os.path.join(run_dir, "checkpoints", "best")
  return "best" if os.path.isdir(best) else "latest"


def open_checkpoint(run_dir: str, kind: str | None = None,
                    step: int | None = None) -> Opened:
  """Opens a `kind` checkpoint (default: `default_kind`) and reads its JSON
  metadata, without reading any array. The step defaults to the newest
  `latest` one, or the best step the run records (`recorded_best_step`)."""
  kind = kind or default_kind(run_dir)
  mngr = open_existing(run_dir, kind)
  if step is None:
    step = (recorded_best_step(run_dir, mngr) if kind == "best"
            else mngr.latest_step())
  return Opened(mngr, kind, step, read_step_meta(mngr, step))


def read_step_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The JSON metadata of one step; damage is one line naming the step."""
  origin = step_dir(mngr, step)
  if step not in mngr.all_steps():
    raise JaxrecError(f"{origin}: missing")
  with reported_as(origin, "read the checkpoint metadata", CheckpointDamaged):
    meta = mngr.restore(step, args=meta_args()).meta
  require_jaxrec_meta(meta, origin)
  return meta


def recorded_best_step(run_dir: str,
                       best: ocp.CheckpointManager | None = None) -> int:
  """The best step the run records: the newest `latest` checkpoint's
  progress, else (none, or unreadable) metrics.json. Guards against testing
  the newest file in best/, which after a kill can be a step the run's
  record never reached. Missing from best/: one line naming both."""
  best = best or open_existing(run_dir, "best")
  step, source = _best_step_of_latest(run_dir)
  if step is None:
    step, source = _best_step_of_metrics(run_dir)
  if step is None:  # Nothing records it (e.g. a hand-copied best/).
    return best.latest_step()
  if step not in best.all_steps():
    raise JaxrecError(f"{step_dir(best, step)}: missing, but {source} "
                      f"records step {step} as the best")
  return step


def _best_step_of_latest(run_dir: str) -> tuple[int | None, str]:
  path = os.path.join(run_dir, "checkpoints", "latest")
  if not os.path.isdir(path):
    return None, ""
  mngr = manager(run_dir, "latest", read_only=True)
  step = mngr.latest_step()
  if step is None:
    return None, ""
  try:  # Only the newest record counts: an older one names a pruned best.
    meta = read_step_meta(mngr, step)
  except CheckpointDamaged:
    return None, ""
  best = (meta.get("progress") or {}).get("best_step", -1)
  if isinstance(best, int) and best >= 0:
    return best, step_dir(mngr, step)
  return None, ""


def _best_step_of_metrics(run_dir: str) -> tuple[int | None, str]:
  path = os.path.join(run_dir, "metrics.json")
  try:
    with open(path, encoding="utf-8") as f:
      best = json.load(f).get("best_step")
  except (OSError, ValueError, AttributeError):
    return None, ""
  return (best, path) if isinstance(best, int) and best >= 0 else (None, "")


def meta_args() -> ocp.args.Composite:
  """Restore args that read a checkpoint's JSON metadata and no array."""
  return ocp.args.Composite(meta=ocp.args.JsonRestore())


def read_meta(run_dir: str,
              kind: str | None = None) -> tuple[int, dict[str, Any]]:
  """The step `open_checkpoint` picks and its JSON metadata, without
  reading any array."""
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


def require_jaxrec_meta(meta: Any, origin: str) -> None:
  """Metadata that reads back but is not a jaxrec checkpoint's is damage."""
  if not isinstance(meta, dict) or "format" not in meta:
    raise CheckpointDamaged(f"{origin}: its metadata is not a jaxrec "
                            "checkpoint's")


def stored_config(meta: dict[str, Any], origin: str,
                  legacy_ok: bool = True) -> dict[str, Any]:
  """The config dict a checkpoint's metadata holds, its format checked."""
  check_format(meta, origin, legacy_ok=legacy_ok)
  if not isinstance(meta.get("config"), dict):
    raise CheckpointDamaged(f"{origin}: its metadata holds no config")
  return meta["config"]


def config_from_meta(meta: dict[str, Any], origin: str) -> config_lib.Config:
  """The Config a checkpoint was written with (legacy ones upgraded)."""
  return config_lib.from_dict(stored_config(meta, origin),
                              origin=f"{origin}: config")


def convert_legacy_params(params: dict[str, Any]) -> dict[str, Any]:
  """jaxrec.nextitnet/1 params -> the current tree: the output layer moves
  from `softmax` to `head`; the backbone leaves are unchanged."""
  out = {k: v for k, v in params.items() if k != "softmax"}
  out["head"] = params["softmax"]
  return out


def make_meta(cfg: config_lib.Config, data_fingerprint: str, step: int,
              lineage: list[dict[str, Any]],
              vocabulary: dict[str, Any] | None = None,
              **extra: Any) -> dict[str, Any]:
  """A checkpoint's JSON metadata. `vocabulary` is `Vocabulary.meta()` of
  the run's DIR/vocabulary.json (None: the run has none)."""
  return {"format": FORMAT, "backbone": cfg.model.name,
          "head": cfg.head.name, "config": cfg.to_dict(), "step": int(step),
          "data_fingerprint": data_fingerprint, "lineage": lineage,
          "vocabulary": vocabulary, **extra}


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically: a reader never sees half a file."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class RunCheckpoints:
  """A training run's `latest` and `best` checkpoints, written in one order.

  The record of which step is best lives in each `latest` checkpoint's
  progress; the files must always agree with it, whenever a kill comes:

  1. the previous `latest` save is awaited (its failure reported);
  2. a new best is saved and awaited, so no record names a missing step;
  3. the `latest` save starts (async);
  4. `best` keeps only the steps a complete record can name (Orbax's own
     max_to_keep would delete the old best before the new record exists).

  `resume` restores the newest intact `latest` step, setting damaged ones
  aside, and removes what a killed run wrote past it.
  """

  def __init__(self, run_dir: str, keep: int):
    self.run_dir = run_dir
    self.keep = keep
    self.latest = manager(run_dir, "latest", keep=keep)
    self.best = manager(run_dir, "best", keep=None)
    self.pending: int | None = None  # `latest` step being saved.
    self.complete = self.latest.latest_step()
    self.recorded_best: int | None = None  # Named by the newest complete.
    self._next_record: int | None = None  # Named by the pending one.

  def save_validation(self, step: int, state: Any, meta: dict[str, Any],
                      best_step: int) -> None:
    """Saves `latest` at `step` (and `best`, if `best_step` is `step`)."""
    self.settle()
    if best_step == step:
      save(self.best, step, {"params": state["params"]}, meta)
      wait(self.best, step, self.complete)
    save(self.latest, step, state, meta)
    self.pending = step
    self._prune_best({best_step, self.recorded_best})
    self._next_record = best_step

  def settle(self) -> None:
    """Waits for the pending save; then its record is the one on disk."""
    if self.pending is None:
      return
    wait(self.latest, self.pending, self.complete)
    self.complete, self.pending = self.pending, None
    self.recorded_best = self._next_record
    self._prune_best({self.recorded_best})

  def abandon(self) -> None:
    """After a failure: let the pending save end without judging it."""
    try:
      self.latest.wait_until_finished()
      self.best.wait_until_finished()
    except Exception:  # pylint: disable=broad-exception-caught
      pass  # Already failing; the first error is the one to report.

  def _prune_best(self, keep: set[int | None]) -> None:
    for step in self.best.all_steps():
      if step not in keep:
        with reported_as(step_dir(self.best, step), "delete the checkpoint"):
          self.best.delete(step)

  def resume(self, target: Any, check: Any) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of the newest intact `latest` step; `check(meta,
    origin)` refuses a checkpoint of another config before any array is
    read. Damaged newer steps are moved to DIR/checkpoints/damaged, saying
    so, once an older one restored; with none intact nothing is moved."""
    damaged: list[str] = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        meta = read_step_meta(self.latest, step)
        check(meta, step_dir(self.latest, step))
        state, meta = restore(self.latest, step, target)
      except CheckpointDamaged as e:
        damaged.append(str(e))
        continue
      for newer in damaged:
        print(f"jaxrec: warning: {newer}; set aside, resuming from the "
              f"older checkpoint at step {step}", file=sys.stderr)
      for newer in self.latest.all_steps():
        if newer > step:
          self._set_aside(self.latest, newer)
      self._after_resume(step, meta)
      return state, meta
    raise JaxrecError(f"{self.latest.directory}: no intact checkpoint to "
                      f"resume from ({len(damaged)} damaged; the newest: "
                      f"{damaged[0] if damaged else 'none'})")

  def _after_resume(self, step: int, meta: dict[str, Any]) -> None:
    """Removes what the killed run wrote past `step` and what exceeds
    `keep` (a run killed in its final test kept one `latest` too many)."""
    for mngr in (self.latest, self.best):
      listed = set(mngr.all_steps())
      for name in os.listdir(mngr.directory):
        if not name.isdigit() or int(name) <= step:
          continue
        if mngr is self.best and int(name) in listed:
          # A best saved just before the kill, which the replay redoes.
          with reported_as(step_dir(mngr, name), "delete the checkpoint"):
            mngr.delete(int(name))
        else:  # Not a complete checkpoint, yet where the replay saves.
          self._set_aside(mngr, int(name))
    for old in sorted(self.latest.all_steps())[:-self.keep]:
      with reported_as(step_dir(self.latest, old), "delete the checkpoint"):
        self.latest.delete(old)
    self.complete = step
    self.recorded_best = (meta.get("progress") or {}).get("best_step")
    self._prune_best({self.recorded_best})

  def _set_aside(self, mngr: ocp.CheckpointManager, step: int) -> None:
    """Moves DIR/checkpoints/KIND/STEP to DIR/checkpoints/damaged/ (kept
    for a post-mortem, out of Orbax's sight and of the replay's way)."""
    src = step_dir(mngr, step)
    kind = os.path.basename(str(mngr.directory))
    dest_root = os.path.join(self.run_dir, "checkpoints", "damaged")
    dest = os.path.join(dest_root, f"{kind}-{step}")
    n = 1
    while os.path.exists(dest):
      dest, n = os.path.join(dest_root, f"{kind}-{step}.{n}"), n + 1
    with reported_as(src, "set the checkpoint aside"):
      os.makedirs(dest_root, exist_ok=True)
      shutil.move(src, dest)
      mngr.reload()

  def close(self) -> None:
    self.latest.close()
    self.best.close()
