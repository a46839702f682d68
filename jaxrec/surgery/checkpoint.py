"""Applying a surgery to a saved run: restore as saved, transform, save.

Orbax cannot restore into a different structure, so every surgery (grow,
new output head, later untie and patch insertion) goes the same way:
restore the source checkpoint into the tree its own config implies,
transform it with jax, check the result against the new config, and save
it as step 0 of a new run directory with the lineage extended.
`jaxrec train --init-from NEW_DIR` starts from it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from jaxrec import method_api, models
from jaxrec.config import Config
from jaxrec.data import vocabulary as vocab_lib
from jaxrec.errors import JaxrecError
from jaxrec.training import checkpoints, lock, rundir
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
  with lock.hold(out_dir, str(lineage.get("op", "surgery"))):
    return _apply_locked(src_dir, out_dir, fn, lineage, kind, opt_fn)


def _apply_locked(src_dir: str, out_dir: str, fn: ParamsFn,
                  lineage: dict[str, Any], kind: str | None,
                  opt_fn: OptStateFn | None) -> Config:
  """`apply_to_checkpoint`, holding out_dir's writer lock."""
  rundir.refuse_existing_checkpoints(out_dir)  # Before any work.
  if kind not in (None, "best", "latest"):
    raise JaxrecError(f"--source={kind!r}: expected 'best' or 'latest'")
  if opt_fn is not None:
    if kind == "best":
      raise JaxrecError("mapping the optimizer state needs --source latest: "
                        "only the latest checkpoint holds it")
    kind = "latest"
  opened = checkpoints.open_checkpoint(src_dir, kind)
  cfg = checkpoints.config_from_meta(opened.meta, src_dir)
  state_lib.refuse_finetuning(cfg, src_dir, "a surgery")
  opt_state = None
  if opt_fn is None:
    params = state_lib.restore_params(opened, cfg, src_dir)
  else:
    checkpoints.check_format(opened.meta, src_dir, legacy_ok=False)
    state, _ = checkpoints.restore(
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
  meta = checkpoints.make_meta(
      cfg, data_fingerprint, 0, lineage,
      vocabulary=None if vocab is None else vocab.meta(),
      progress=dataclasses.asdict(state_lib.Progress()))
  os.makedirs(out_dir, exist_ok=True)
  if vocab is not None:  # Before the checkpoint: a checkpoint naming a
    vocab.save(out_dir)  # vocabulary never lacks its file.
  mngr = checkpoints.manager(out_dir, "latest", keep=1)
  checkpoints.save(mngr, 0, state, meta)
  checkpoints.wait(mngr, 0, None)
  mngr.close()
  checkpoints.write_json(os.path.join(out_dir, "config.json"), cfg.to_dict())
