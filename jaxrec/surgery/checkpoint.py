"""Applying a surgery to a saved run: restore as saved, transform, save.

Orbax cannot restore into a different structure, so every surgery (grow,
new output head, later untie and patch insertion) goes the same way:
restore the source checkpoint into the tree its own config implies,
transform it with jax, check the result against the new config, and save
it as step 0 of a new run directory with the lineage extended.
`jaxrec train --init-from NEW_DIR` starts from it.

The new directory appears whole or not at all (`staged_output`): a
surgery writes `OUT.partial` and renames it to OUT when everything is on
disk, so a surgery killed at any point leaves only `OUT.partial`, which
the same command run again clears and writes anew.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from typing import Any, Callable, Iterator

from jaxrec import method_api, models
from jaxrec.config import Config
from jaxrec.data import vocabulary as vocab_lib
from jaxrec.errors import JaxrecError
from jaxrec.training import checkpoints, lock, rundir
from jaxrec.training import checkpoint_meta
from jaxrec.training import orbax_io
from jaxrec.training import state as state_lib

# (params, cfg) -> (new params, new cfg)
ParamsFn = Callable[[models.Params, Config], tuple[models.Params, Config]]
# (opt_state, old cfg, new cfg) -> new opt_state
OptStateFn = Callable[[Any, Config, Config], Any]


def apply_to_checkpoint(src_dir: str, out_dir: str, fn: ParamsFn,
                        lineage: dict[str, Any], *, kind: str | None = None,
                        opt_fn: OptStateFn | None = None) -> Config:
  """Runs `fn` on `src_dir`'s `kind` checkpoint; saves the result to
  `out_dir` (which must hold no checkpoint); returns the new Config.

  `kind`: best (default when the run validated) or latest. With `opt_fn`
  the latest checkpoint's optimizer state is transformed too and saved for
  `train --init-opt-state`; otherwise the new run's optimizer state is
  fresh. `lineage` (the op and its options) is appended to the source's.
  """
  with staged_output(out_dir, str(lineage.get("op", "surgery"))) as stage:
    return _apply_staged(src_dir, stage, fn, lineage, kind, opt_fn)


STAGING_SUFFIX = ".partial"


@contextlib.contextmanager
def staged_output(out_dir: str, verb: str) -> Iterator[str]:
  """Yields the directory to write a new run into, `OUT.partial` (its
  writer lock held), and renames it to `out_dir` once the block ends
  without error.

  `out_dir` must hold nothing: a surgery never writes beside another
  run's files, even when that run's checkpoints are gone. A leftover
  `OUT.partial` whose lock is free is a killed attempt's: cleared, not
  refused (a rerun of a killed `grow` used to be refused as "already
  holds checkpoints", for a checkpoint Orbax had never committed)."""
  refuse_occupied(out_dir)  # Before any work.
  stage = os.path.normpath(out_dir) + STAGING_SUFFIX
  with lock.hold(stage, verb):
    for name in os.listdir(stage):
      if name != lock.LOCK_NAME:  # The lock we hold stays.
        path = os.path.join(stage, name)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path)
        else:
          os.remove(path)
    try:
      yield stage
    except BaseException:
      # A refused or failed surgery leaves nothing behind (a kill leaves
      # the partial directory, which the next attempt clears).
      shutil.rmtree(stage, ignore_errors=True)
      raise
    commit_staged(stage, out_dir)


def commit_staged(stage: str, out_dir: str) -> None:
  """Renames the finished `stage` to `out_dir`: OUT appears whole."""
  refuse_occupied(out_dir)  # Another command may have written there.
  if os.path.isdir(out_dir):  # Empty, or an unheld lock file alone.
    lock_file = os.path.join(out_dir, lock.LOCK_NAME)
    if os.path.exists(lock_file):
      os.remove(lock_file)
    os.rmdir(out_dir)
  os.rename(stage, out_dir)


def refuse_occupied(out_dir: str) -> None:
  """Refuses an `out_dir` that holds anything but an unheld lock file."""
  if not os.path.exists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise JaxrecError(f"--out {out_dir}: exists and is not a directory")
  lock.refuse_if_held(out_dir)
  held = sorted(set(os.listdir(out_dir)) - {lock.LOCK_NAME})
  if held:
    shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
    raise JaxrecError(f"--out {out_dir}: already holds files ({shown}); a "
                      "surgery writes a new directory: choose another --out")


def _apply_staged(src_dir: str, out_dir: str, fn: ParamsFn,
                  lineage: dict[str, Any], kind: str | None,
                  opt_fn: OptStateFn | None) -> Config:
  """`apply_to_checkpoint` into the staging directory `out_dir`."""
  if kind not in (None, "best", "latest"):
    raise JaxrecError(f"--source={kind!r}: expected 'best' or 'latest'")
  if opt_fn is not None:
    if kind == "best":
      raise JaxrecError("mapping the optimizer state needs --source latest: "
                        "only the latest checkpoint holds it")
    kind = "latest"
  opened = checkpoints.open_checkpoint(src_dir, kind)
  cfg = checkpoint_meta.config_from_meta(opened.meta, src_dir)
  state_lib.refuse_finetuning(cfg, src_dir, "a surgery")
  opt_state = None
  if opt_fn is None:
    params = state_lib.restore_params(opened, cfg, src_dir)
  else:
    checkpoint_meta.check_format(opened.meta, src_dir, legacy_ok=False)
    state, _ = orbax_io.restore(
        opened.mngr, opened.step,
        target=state_lib.abstract_state(cfg, "latest"))
    params, opt_state = state["params"], state["opt_state"]
  new_params, new_cfg = fn(params, cfg)
  models.require_fit(new_params, new_cfg,
                     f"the params surgery {lineage.get('op')!r} made")
  new_opt = None if opt_fn is None else opt_fn(opt_state, cfg, new_cfg)
  entry = {"dir": os.path.abspath(src_dir), "kind": opened.kind,
           "step": int(opened.step), **lineage}
  shared = method_api.block_map(new_cfg)
  if shared is not None:  # A shared (CpRec) model: the map it now runs.
    entry["block_source"] = list(shared)
  chain = list(opened.meta.get("lineage") or []) + [entry]
  # The ids mean what they meant in the source: its vocabulary goes along.
  vocab = vocab_lib.find(src_dir)
  if vocab is not None:
    vocab.check_matches(opened.meta.get("vocabulary"), src_dir)
  save_start_checkpoint(out_dir, new_cfg, new_params,
                        opened.meta["data_fingerprint"], chain, new_opt,
                        vocab=vocab)
  return new_cfg


def save_start_checkpoint(out_dir: str, cfg: Config, params: models.Params,
                          data_fingerprint: str, lineage: list[dict],
                          opt_state: Any = None,
                          vocab: vocab_lib.Vocabulary | None = None) -> None:
  """Saves step 0 of a model made by surgery.

  A full train state in out_dir/checkpoints/latest (the optimizer state
  fresh unless given) plus out_dir/config.json, and out_dir/vocabulary.json
  when `vocab` is given. Refuses a directory that already holds
  checkpoints, and returns only once the checkpoint is on disk.
  """
  rundir.refuse_existing_checkpoints(out_dir)
  state = state_lib.init_state(params,
                               state_lib.optimizer_for(cfg, params)[0])
  if opt_state is not None:
    state["opt_state"] = opt_state
  meta = checkpoint_meta.make_meta(
      cfg, data_fingerprint, 0, lineage,
      vocabulary=None if vocab is None else vocab.meta(),
      progress=dataclasses.asdict(state_lib.Progress()))
  os.makedirs(out_dir, exist_ok=True)
  if vocab is not None:  # Before the checkpoint: a checkpoint naming a
    vocab.save(out_dir)  # vocabulary never lacks its file.
  mngr = orbax_io.manager(out_dir, "latest", keep=1)
  orbax_io.save(mngr, 0, state, meta)
  orbax_io.wait(mngr, 0, None)
  mngr.close()
  checkpoints.write_json(os.path.join(out_dir, "config.json"), cfg.to_dict())
