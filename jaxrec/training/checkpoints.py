"""A run directory's checkpoints: where they live, which step is which,
and the order a run writes them in.

Layout of a run directory:

  DIR/config.json              the full Config (a resume must match it)
  DIR/checkpoints/latest/N/    state (params, opt_state, step) + meta: for
                               --resume; the newest `keep` are kept
  DIR/checkpoints/best/N/      params + meta of the best validation so far
                               (the step the newest `latest` records)
  DIR/checkpoints/damaged/     steps a resume found unreadable, set aside

Each checkpoint's `meta` item is JSON (`checkpoint_meta`: the format,
config, data fingerprint, training position and lineage); every read and
write goes through `orbax_io`. `RunCheckpoints` orders a run's saves so
the record of the best step and the files always agree.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, NamedTuple

import orbax.checkpoint as ocp

from jaxrec.errors import CheckpointDamaged, JaxrecError, reported_as
from jaxrec.training import orbax_io


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
  mngr = orbax_io.open_existing(run_dir, kind)
  if step is None:
    step = (recorded_best_step(run_dir, mngr) if kind == "best"
            else mngr.latest_step())
  return Opened(mngr, kind, step, orbax_io.read_step_meta(mngr, step))


def recorded_best_step(run_dir: str,
                       best: ocp.CheckpointManager | None = None) -> int:
  """The best step the run records: the newest `latest` checkpoint's
  progress, else (none, or unreadable) metrics.json. Guards against testing
  the newest file in best/, which after a kill can be a step the run's
  record never reached. Missing from best/: one line naming both."""
  best = best or orbax_io.open_existing(run_dir, "best")
  step, source = _best_step_of_latest(run_dir)
  if step is None:
    step, source = _best_step_of_metrics(run_dir)
  if step is None:  # Nothing records it (e.g. a hand-copied best/).
    return best.latest_step()
  if step not in best.all_steps():
    raise JaxrecError(f"{orbax_io.step_dir(best, step)}: missing, but "
                      f"{source} records step {step} as the best")
  return step


def _best_step_of_latest(run_dir: str) -> tuple[int | None, str]:
  path = os.path.join(run_dir, "checkpoints", "latest")
  if not os.path.isdir(path):
    return None, ""
  mngr = orbax_io.manager(run_dir, "latest", read_only=True)
  step = mngr.latest_step()
  if step is None:
    return None, ""
  try:  # Only the newest record counts: an older one names a pruned best.
    meta = orbax_io.read_step_meta(mngr, step)
  except CheckpointDamaged:
    return None, ""
  best = (meta.get("progress") or {}).get("best_step", -1)
  if isinstance(best, int) and best >= 0:
    return best, orbax_io.step_dir(mngr, step)
  return None, ""


def _best_step_of_metrics(run_dir: str) -> tuple[int | None, str]:
  path = os.path.join(run_dir, "metrics.json")
  try:
    with open(path, encoding="utf-8") as f:
      best = json.load(f).get("best_step")
  except (OSError, ValueError, AttributeError):
    return None, ""
  return (best, path) if isinstance(best, int) and best >= 0 else (None, "")


def read_meta(run_dir: str,
              kind: str | None = None) -> tuple[int, dict[str, Any]]:
  """The step `open_checkpoint` picks and its JSON metadata, without
  reading any array."""
  opened = open_checkpoint(run_dir, kind)
  return opened.step, opened.meta


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
    self.latest = orbax_io.manager(run_dir, "latest", keep=keep)
    self.best = orbax_io.manager(run_dir, "best", keep=None)
    self.pending: int | None = None  # `latest` step being saved.
    self.complete = self.latest.latest_step()
    self.recorded_best: int | None = None  # Named by the newest complete.
    self._next_record: int | None = None  # Named by the pending one.

  def save_validation(self, step: int, state: Any, meta: dict[str, Any],
                      best_step: int) -> None:
    """Saves `latest` at `step` (and `best`, if `best_step` is `step`)."""
    self.settle()
    if best_step == step:
      orbax_io.save(self.best, step, {"params": state["params"]}, meta)
      orbax_io.wait(self.best, step, self.complete)
    orbax_io.save(self.latest, step, state, meta)
    self.pending = step
    self._prune_best({best_step, self.recorded_best})
    self._next_record = best_step

  def settle(self) -> None:
    """Waits for the pending save; then its record is the one on disk."""
    if self.pending is None:
      return
    orbax_io.wait(self.latest, self.pending, self.complete)
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
        with reported_as(orbax_io.step_dir(self.best, step),
                         "delete the checkpoint"):
          self.best.delete(step)

  def resume(self, target: Any, check: Any) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of the newest intact `latest` step; `check(meta,
    origin)` refuses a checkpoint of another config before any array is
    read. Damaged newer steps are moved to DIR/checkpoints/damaged, saying
    so, once an older one restored; with none intact nothing is moved."""
    damaged: list[str] = []
    for step in sorted(self.latest.all_steps(), reverse=True):
      try:
        meta = orbax_io.read_step_meta(self.latest, step)
        check(meta, orbax_io.step_dir(self.latest, step))
        state, meta = orbax_io.restore(self.latest, step, target)
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
          with reported_as(orbax_io.step_dir(mngr, name),
                           "delete the checkpoint"):
            mngr.delete(int(name))
        else:  # Not a complete checkpoint, yet where the replay saves.
          self._set_aside(mngr, int(name))
    for old in sorted(self.latest.all_steps())[:-self.keep]:
      with reported_as(orbax_io.step_dir(self.latest, old),
                       "delete the checkpoint"):
        self.latest.delete(old)
    self.complete = step
    self.recorded_best = (meta.get("progress") or {}).get("best_step")
    self._prune_best({self.recorded_best})

  def _set_aside(self, mngr: ocp.CheckpointManager, step: int) -> None:
    """Moves DIR/checkpoints/KIND/STEP to DIR/checkpoints/damaged/ (kept
    for a post-mortem, out of Orbax's sight and of the replay's way)."""
    src = orbax_io.step_dir(mngr, step)
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
