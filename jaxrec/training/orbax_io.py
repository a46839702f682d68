"""The Orbax adapter: a run directory's checkpoint managers and every
read and write of a step, verified, each failure one line naming
DIR/checkpoints/KIND/STEP.

Orbax writes every step into a temporary directory and renames it when
complete, so a kill during a save leaves the previous checkpoint as the
newest one. Managers keep steps by Orbax's preservation policy; the
training loop decides when to save.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import (preservation_policy,
                                                 save_decision_policy)

from jaxrec.errors import (CheckpointDamaged, JaxrecError, describe,
                           reported_as)
from jaxrec.training.checkpoint_meta import require_jaxrec_meta


def manager(run_dir: str, kind: str, keep: int | None = 1,
            read_only: bool = False) -> ocp.CheckpointManager:
  """The `latest` or `best` checkpoint manager of a run directory (`keep`
  None: Orbax deletes nothing; `RunCheckpoints` prunes `best` itself).

  Orbax's policies, not its deprecated `max_to_keep`: the newest `keep`
  steps are preserved, and every save the loop asks for is made (the loop
  decides when: at validations, and at a multi-process stop)."""
  path = os.path.join(os.path.abspath(run_dir), "checkpoints", kind)
  if "[" in path or "]" in path:
    # Checkpoints under such a path were written, then failed to restore
    # ("metadata ... does not exist"): a run trained for hours and could
    # not be resumed, evaluated or grown.
    raise JaxrecError(f"{run_dir}: a run directory whose path holds '[' or "
                      "']' cannot be read back by Orbax's tensorstore; "
                      "choose a name without brackets")
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


def meta_args() -> ocp.args.Composite:
  """Restore args that read a checkpoint's JSON metadata and no array."""
  return ocp.args.Composite(meta=ocp.args.JsonRestore())


def read_step_meta(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The JSON metadata of one step; damage is one line naming the step."""
  origin = step_dir(mngr, step)
  if step not in mngr.all_steps():
    raise JaxrecError(f"{origin}: missing")
  with reported_as(origin, "read the checkpoint metadata", CheckpointDamaged):
    meta = mngr.restore(step, args=meta_args()).meta
  require_jaxrec_meta(meta, origin)
  return meta


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
