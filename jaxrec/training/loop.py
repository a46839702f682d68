"""The training loop: one readable function, `train`, and its pure step.

- `train_step(state, batch)` is pure and jitted with NamedShardings over a
  `data` x `model` mesh (`train.mesh`, `jaxrec.training.mesh`): the batch
  is split on `data`, the item tables and their optimizer state by rows on
  `model`, the rest replicated, and the state is donated. On several hosts
  process 0 alone writes the run directory. It differentiates only the
  trainable part of the params (`jaxrec.training.optim`).
- What is optimised and how it is evaluated is the task's
  (`jaxrec.tasks.next_item`); the loop knows neither the backbone nor the
  head.
- The batch for step s and the step's RNG are pure functions of (seed, s),
  so resuming from a checkpoint at step s replays exactly what an
  uninterrupted run would have done.
- A run lasts `train.steps`, or `train.epochs` passes over the training
  rows when steps is 0 (the default); validation every `eval_every` steps,
  by default once per epoch; the best params (by `select_metric`) go to
  `checkpoints/best`, the full state to `checkpoints/latest`; `patience`
  validations without a gain stop the run (on by default).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from tqdm import tqdm

from jaxrec import method_api, models, tasks
from jaxrec.config import Config
from jaxrec.data import pipeline, sequences
from jaxrec.data import transfer as transfer_data
from jaxrec.data import vocabulary as vocab_lib
from jaxrec.errors import Interrupted, JaxrecError
from jaxrec.surgery import catalogue
from jaxrec import ranking
from jaxrec.tasks import next_item
from jaxrec.training import (budget, checkpoint_meta, checkpoints, interrupts,
                             lock, optim, orbax_io, rundir)
from jaxrec.training.mesh import Sharder, make_mesh
from jaxrec.training.state import (Progress, State, abstract_state,
                                   frozen_params, graft, init_state,
                                   optimizer_for, refuse_finetuning,
                                   restore_params, saved_layout_differs,
                                   storable)

Task = Any  # A module with batch, loss, rank_fn (jaxrec.tasks).


def make_train_step(cfg: Config, opt: Any, labels: Any,
                    sampler: Any = None, task: Task = next_item,
                    row_masks: dict[str, np.ndarray] | None = None
                    ) -> Callable[[State, dict], tuple]:
  """The pure step: (state, batch) -> (state, {"loss", "loss/NAME/term"
  for each of the active methods' loss terms})."""
  base_key = jax.random.key(cfg.train.seed)
  masks = row_masks or {}

  def train_step(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(base_key, step)
    trainable, frozen = optim.split(state["params"], labels)

    def loss_of(trainable):
      params = optim.merge(trainable, frozen, labels)
      return task.loss_parts(params, cfg, batch, rng, sampler)

    (loss, terms), grads = jax.value_and_grad(loss_of, has_aux=True)(
        trainable)
    # Frozen leaves were not differentiated; the optimizer's set_to_zero
    # ignores the zeros standing in for their gradients.
    grads = optim.merge(grads, jax.tree.map(jnp.zeros_like, frozen), labels)
    grads = optim.mask_rows(grads, masks)
    updates, opt_state = opt.update(grads, state["opt_state"],
                                    state["params"])
    updates = optim.mask_rows(updates, masks)
    first_bad = jnp.where(
        (state["first_bad_step"] < 0) & ~jnp.isfinite(loss), step,
        state["first_bad_step"])
    new_state = {"params": optim.apply_updates(state["params"], updates,
                                               labels, masks),
                 "opt_state": opt_state, "step": step + 1,
                 "first_bad_step": first_bad}
    return new_state, {"loss": loss,
                       **{f"loss/{name}": v for name, v in terms.items()}}

  return train_step


def jit_rank_fn(cfg: Config, sharder: Sharder,
                task: Task = next_item) -> Callable:
  """The task's rank function, jitted on the sharder's mesh for the params
  tree it is first called with (tables split by rows over `model`)."""
  compiled: dict[Any, Callable] = {}

  def ranks(params, inputs, targets, users):
    key = jax.tree.structure(params)
    if key not in compiled:
      # Ranks come back replicated: on several hosts each process reads
      # them all, which a batch-sharded array would not allow.
      compiled[key] = sharder.jit(
          task.rank_fn(cfg),
          in_shardings=(sharder.shardings(params), sharder.batch,
                        sharder.batch, sharder.batch),
          out_shardings=sharder.replicated)
    return compiled[key](params, inputs, targets, users)

  return ranks


def evaluate_params(params: models.Params, cfg: Config, sharder: Sharder,
                    inputs: np.ndarray, targets: np.ndarray,
                    rank_fn: Callable | None = None,
                    users: np.ndarray | None = None) -> dict[str, float]:
  """Full-ranking metrics of `params` on (inputs, targets), the rows'
  `users` given to a backbone that reads them."""
  if rank_fn is None:
    rank_fn = jit_rank_fn(cfg, sharder)
  batch_size = sharder.check_batch(cfg.train.eval_batch_size,
                                   "train.eval_batch_size")

  def ranks(batch):
    placed = sharder.put_batch({"inputs": batch["inputs"],
                                "targets": batch["targets"],
                                "users": batch["users"]})
    return rank_fn(params, placed["inputs"], placed["targets"],
                   placed["users"])

  return ranking.evaluate(ranks, inputs, targets, batch_size, users)


def train(cfg: Config, out_dir: str, data: sequences.SequenceData | None = None,
          resume: bool = False, init_from: str | None = None,
          init_opt_state: bool = False,
          devices: list[jax.Device] | None = None, progress_bar: bool = True,
          step_callback: Callable[[int], None] | None = None,
          task: Task | None = None, vanished: str = "keep",
          params: models.Params | None = None,
          lineage: list[dict[str, Any]] | None = None) -> dict[str, Any]:
  """Trains, validates, checkpoints; writes and returns DIR/metrics.json.

  `init_from` starts from another run's (or a surgery's) checkpoint's
  params, with its model and head config; `init_opt_state` also takes its
  optimizer state (from its latest checkpoint, e.g. `jaxrec grow
  --map-opt-state`), else the optimizer starts fresh as in the paper.
  `step_callback(step)` runs after each step (tests use it to kill a run at
  a chosen moment). `task` defaults to the config's (`tasks.for_config`).
  `params` and `lineage` start the run from a prepared tree (a
  fine-tuning's: `jaxrec.methods.peterrec`). Methods `cfg` asks for that
  the `init_from` checkpoint lacks are attached to its params
  (`method_api.attach`: `--init-from TRAINED --skip gumbel`).

  With `init_from`, the data is numbered by the checkpoint's vocabulary;
  items it has never seen get fresh rows, and items it has that the data
  lacks keep theirs (`vanished="keep"`) or are dropped (`"drop"`); see
  `jaxrec.surgery.catalogue`. The counts go to the lineage.
  """
  if vanished not in ("keep", "drop"):
    raise JaxrecError(f"--vanished={vanished!r}: expected 'keep' or 'drop'")
  # On several hosts process 0 alone writes the run directory (it holds
  # the lock); the others only join the collective saves and steps.
  with (lock.hold(out_dir, "train") if is_primary()
        else contextlib.nullcontext()):
    return _train_locked(cfg, out_dir, data, resume, init_from,
                         init_opt_state, devices, progress_bar,
                         step_callback, task, vanished, params, lineage)


def _train_locked(cfg: Config, out_dir: str,
                  data: sequences.SequenceData | None, resume: bool,
                  init_from: str | None, init_opt_state: bool,
                  devices: list[jax.Device] | None, progress_bar: bool,
                  step_callback: Callable[[int], None] | None,
                  task: Task, vanished: str,
                  prepared: models.Params | None,
                  prepared_lineage: list[dict[str, Any]] | None
                  ) -> dict[str, Any]:
  """`train`, holding the run directory's writer lock."""
  # Started from a checkpoint: number items its way, so its rows keep
  # meaning the same items on a new data version.
  init_vocab = _init_vocabulary(init_from) if init_from else None
  if data is None:
    data = pipeline.load_data(cfg.data, vocab=init_vocab,
                              drop_vanished=vanished == "drop")
  lineage: list[dict[str, Any]] = list(prepared_lineage or [])
  if init_from:
    requested = cfg
    cfg, lineage, init_params, init_opt = _load_init(
        cfg, init_from, data, init_opt_state, init_vocab)
    cfg, init_params, lineage = _with_requested_methods(
        requested, cfg, init_params, lineage, init_opt_state)
  _check_num_items(cfg, data)
  cfg = cfg.fit_data(data.num_items, data.max_len, data.item_counts,
                     data.num_users)
  cfg.validate()
  task = task or tasks.for_config(cfg)
  tcfg = cfg.train
  # A mesh the devices cannot form, or tables it cannot split, is refused
  # before the run directory is written (a retry would find a run there).
  sharder = Sharder(make_mesh(devices, tcfg.mesh))
  batch_size = sharder.check_batch(tcfg.batch_size, "train.batch_size")
  first_params = (prepared if prepared is not None else
                  init_params if init_from else models.abstract_params(cfg))
  sharder.shardings(first_params)
  # Sizes that cannot fit are refused before anything is allocated.
  budget.check_fits(cfg, first_params, sharder.data_size, sharder.model_size)
  primary = is_primary()
  if primary:
    rundir.prepare(cfg, out_dir, resume)
  # With tables split over `model`, fresh params are initialised straight
  # into their shards (below): one device holding a whole 10M-item table
  # and its Adam moments is what the mesh exists to avoid.
  fresh = prepared is None and not init_from
  init_sharded = fresh and sharder.model_size > 1
  init_key = jax.random.key(tcfg.seed)
  if prepared is not None:
    params = prepared
  elif init_from:
    params = init_params
  elif init_sharded:  # Shapes only, for the optimizer's structure.
    params = jax.eval_shape(lambda: models.init_params(cfg, init_key))
  else:
    params = models.init_params(cfg, init_key)
  per_epoch = sequences.steps_per_epoch(data.train.shape[0], batch_size)
  total_steps = tcfg.steps or tcfg.epochs * per_epoch
  eval_every = tcfg.eval_every or per_epoch
  opt, labels = optimizer_for(cfg, params, total_steps)
  masks = optim.row_masks(params, models.get(cfg.model.name).surgery.stacks,
                          tcfg.train_top_blocks)
  if init_sharded:
    state = jax.eval_shape(lambda p: init_state(p, opt), params)
  else:
    state = init_state(params, opt)
  if init_from and init_opt_state:
    state["opt_state"] = init_opt  # E.g. Adam moments mapped by `grow`.
  # Tables and their optimizer state split by rows over `model`.
  state_shardings = sharder.shardings(state)
  step_fn = sharder.jit(
      make_train_step(cfg, opt, labels, next_item.sampler_for(cfg, data),
                      task, masks),
      in_shardings=(state_shardings, sharder.batch),
      out_shardings=(state_shardings, sharder.replicated),
      donate_argnums=0)
  rank_fn = jit_rank_fn(cfg, sharder, task)
  if init_sharded:
    state = sharder.jit(
        lambda key: init_state(models.init_params(cfg, key), opt),
        out_shardings=state_shardings)(init_key)
  else:
    state = jax.device_put(state, state_shardings)
  ckpts = checkpoints.RunCheckpoints(out_dir, tcfg.keep_checkpoints)
  prog = Progress()
  if resume and ckpts.latest.all_steps():
    state, meta = _resume(ckpts, state, cfg, data)
    prog = Progress(**meta["progress"])
    lineage = meta["lineage"]
  elif resume:  # Killed before its first checkpoint: it starts again.
    rundir.check_config_file(cfg, out_dir)
  if resume and primary:  # Only now: a failed resume leaves it as it was.
    rundir.write_config(cfg, out_dir)
  vocab_meta = None
  if data.vocab is not None:  # Before any checkpoint that names it.
    if primary:
      data.vocab.save(out_dir)
    vocab_meta = data.vocab.meta()
  # A fine-tuning's head outputs by name, for serving; bound to the
  # checkpoints by the data fingerprint they record.
  outputs = getattr(data, "outputs", None)
  if isinstance(outputs, transfer_data.Outputs) and primary:
    outputs.save(out_dir)
  start = int(state["step"])

  log = (rundir.MetricsLog(out_dir, tcfg.tensorboard, start) if primary
         else rundir.NullLog())
  log_every = min(50, eval_every)
  tokens_per_step = int(np.sum(data.train[:, 1:] != 0) /
                        max(1, data.train.shape[0]) * batch_size)
  bar = tqdm(total=total_steps, initial=start,
             disable=not (progress_bar and primary), desc="train",
             unit="step", mininterval=1.0, dynamic_ncols=True)
  say = bar.write if primary else lambda text: None
  t_last, s_last = time.time(), start
  clock = time.time() - prog.train_time_s
  done = start
  # A resumed run that had already stopped early stays stopped.
  end = start if prog.stopped(tcfg.patience) else total_steps
  def save(step: int, state: State) -> None:
    """`latest` (and `best`, if it is the best) at `step`, with the run's
    record as it stands."""
    meta = checkpoint_meta.make_meta(cfg, data.fingerprint, step, lineage,
                                     vocabulary=vocab_meta,
                                     progress=dataclasses.asdict(prog))
    ckpts.save_validation(step, storable(state, cfg), meta, prog.best_step)

  # Several processes stop together, at jax's preemption sync point.
  agreed = (multihost_utils.reached_preemption_sync_point
            if jax.process_count() > 1 else None)
  with interrupts.deferred():
    try:
      for step in range(start, end):
        if interrupts.stop_before(step, agreed):
          break
        batch = task.batch(data, step, batch_size, tcfg.seed)
        state, out = step_fn(state, sharder.put_batch(batch))
        done = step + 1
        log_now = done % log_every == 0 or done == total_steps
        eval_now = done % eval_every == 0 or done == total_steps
        if log_now or eval_now:  # Never validate or save non-finite params.
          loss = _check_finite(state, out, ckpts)
        if log_now:
          rate = (done - s_last) * tokens_per_step / (time.time() - t_last)
          t_last, s_last = time.time(), done
          bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
          log.write({"step": done, "loss": loss, **_terms(out),
                     "tokens_per_s": rate})
        bar.update(1)
        if eval_now:
          valid = evaluate_params(state["params"], cfg, sharder,
                                  data.valid_inputs, data.valid_targets,
                                  rank_fn, data.valid_users)
          prog.train_time_s = time.time() - clock
          improved = prog.record(valid, tcfg.select_metric, done)
          log.write({"step": done, "valid": valid,
                     "train_time_s": prog.train_time_s})
          say(f"step {done}: valid {tcfg.select_metric}="
                    f"{valid[tcfg.select_metric]:.4f}"
                    + (" (best)" if improved else ""))
          save(done, state)
          if prog.stopped(tcfg.patience):
            say(f"early stop at step {done}: no {tcfg.select_metric} "
                      f"gain in {tcfg.patience} validations")
            break
        if step_callback is not None:
          step_callback(done)
      if interrupts.preempted() and done not in (ckpts.pending,
                                                 ckpts.complete):
        # Every process stops at this step: it is saved, nothing is lost.
        prog.train_time_s = time.time() - clock
        save(done, state)
      ckpts.settle()
    except BaseException:
      ckpts.abandon()
      raise
    finally:
      bar.close()
      log.close()
    if interrupts.requested():
      raise Interrupted(_interrupted_message(done, ckpts))

  return _finish(cfg, out_dir, data, sharder, rank_fn, ckpts, prog, done,
                 per_epoch, task, _frozen_leaves(state, cfg))


def _finish(cfg: Config, out_dir: str, data: sequences.SequenceData,
            sharder: Sharder, rank_fn: Callable,
            ckpts: checkpoints.RunCheckpoints, prog: Progress,
            steps: int, per_epoch: int, task: Task = next_item,
            frozen: models.Params | None = None) -> dict[str, Any]:
  """Tests the recorded best checkpoint (read back from disk; never merely
  the newest file in best/) and writes metrics.json."""
  if prog.best_step not in ckpts.best.all_steps():
    raise JaxrecError(f"{orbax_io.step_dir(ckpts.best, prog.best_step)}: "
                      f"missing, but the run records step {prog.best_step} "
                      "as its best")
  restored, _ = orbax_io.restore(
      ckpts.best, prog.best_step,
      target=abstract_state(cfg, "best", sharder.shardings))
  restored["params"] = graft(restored["params"], frozen)
  test = pop = None  # train.final_test=false: nobody reads test here.
  if cfg.train.final_test:
    test = evaluate_params(restored["params"], cfg, sharder,
                           data.test_inputs, data.test_targets, rank_fn,
                           data.test_users)
    pop = ranking.popularity_metrics(data.item_counts, data.test_inputs,
                                     data.test_targets,
                                     cfg.train.mask_history)
  result = {
      "valid": prog.best_valid, "test": test, "popularity": pop,
      "best_step": prog.best_step, "steps": steps,
      "epochs": round(steps / per_epoch, 3), "steps_per_epoch": per_epoch,
      "train_time_s": prog.train_time_s,
      "ranking": "full", "mask_history": cfg.train.mask_history,
      "backbone": cfg.model.name, "head": cfg.head.name,
      "data": data.meta,
  }
  result.update(task.report(restored["params"], cfg, data))
  result.update(method_api.report(restored["params"], cfg, data))
  if is_primary():
    checkpoints.write_json(os.path.join(out_dir, "metrics.json"), result)
  return result


def is_primary() -> bool:
  """Whether this process writes files and progress (process 0 of a
  multi-host run; the only one otherwise)."""
  return jax.process_index() == 0


def _check_num_items(cfg: Config, data: sequences.SequenceData) -> None:
  """Refuses a --num-items the data contradicts (it was silently replaced)."""
  given = cfg.model.num_items
  if given and given != data.num_items:
    raise JaxrecError(f"model.num_items={given}: the data has "
                      f"{data.num_items} item ids (padding included); leave "
                      "it 0 to take it from the data")


def _frozen_leaves(state: State, cfg: Config) -> models.Params:
  """The leaves another run's checkpoint holds (`train.frozen_from`): never
  saved here, grafted back onto what this run restores. Read from the live
  state (the step donates its buffers, so no older copy stays valid)."""
  return frozen_params(state["params"], cfg) if cfg.train.frozen_from else {}


def _resume(ckpts: checkpoints.RunCheckpoints, state: State, cfg: Config,
            data: sequences.SequenceData) -> tuple[State, dict]:
  """The newest intact `latest` checkpoint, refused unless it is this run:
  same format, the same config (the one stored in the checkpoint, not only
  config.json, which may be missing), the same data."""
  def check(meta, origin):
    stored = checkpoint_meta.stored_config(meta, origin, legacy_ok=False)
    if saved_layout_differs(meta, cfg):
      raise JaxrecError(f"{origin}: written by an older jaxrec whose "
                        "methods kept their params elsewhere; resuming needs "
                        "the same layout: start a new run from it with "
                        "--init-from")
    rundir.check_same_config(stored, cfg, origin)
    rundir.check_config_file(cfg, ckpts.run_dir)
    if meta.get("data_fingerprint") != data.fingerprint:
      raise JaxrecError(f"{origin}: checkpoint was trained on other data "
                        "(fingerprint differs); use another --out")

  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      storable(state, cfg))
  frozen = _frozen_leaves(state, cfg)
  restored, meta = ckpts.resume(abstract, check)
  return {**restored, "params": graft(restored["params"], frozen)}, meta


def _interrupted_message(step: int, ckpts: checkpoints.RunCheckpoints) -> str:
  kept = (f"--resume continues from step {ckpts.complete}"
          if ckpts.complete is not None else
          "no checkpoint was written yet; --resume starts it again")
  if interrupts.preempted():
    return f"every process stopped and saved at step {step}; {kept}"
  return f"interrupted at step {step}; {kept}"


def _init_vocabulary(init_from: str) -> vocab_lib.Vocabulary | None:
  """The vocabulary of an --init-from checkpoint, checked against the one
  its metadata records; None for a run that saved none (older runs)."""
  vocab = vocab_lib.find(init_from)
  if vocab is not None:
    vocab.check_matches(checkpoints.read_meta(init_from)[1].get("vocabulary"),
                        init_from)
  return vocab


def _load_init(cfg: Config, init_from: str, data: sequences.SequenceData,
               with_opt_state: bool,
               init_vocab: vocab_lib.Vocabulary | None = None):
  """Params (and optionally the optimizer state) of a trained or surgery
  checkpoint; its model and head config win. Returns (cfg, lineage,
  params, opt_state or None). A changed catalogue (data numbered by
  `init_vocab`, as `train` loads it, whose items differ from it) remaps
  the item rows."""
  # Only `latest` checkpoints hold an optimizer state.
  opened = checkpoints.open_checkpoint(init_from,
                                       "latest" if with_opt_state else None)
  src = checkpoint_meta.config_from_meta(opened.meta, init_from)
  refuse_finetuning(src, init_from, "--init-from")
  entry = {"dir": os.path.abspath(init_from), "kind": opened.kind,
           "step": opened.step, "op": "init_from",
           "opt_state": with_opt_state}
  # Only data numbered by the checkpoint's vocabulary (as the loop loads
  # it) is remapped: data built elsewhere keeps its caller's numbering.
  numbered_by = (data.meta.get("vocab_growth") or {}).get("from_vocabulary")
  if (init_vocab is not None and data.vocab is not None
      and numbered_by == init_vocab.fingerprint()
      and not np.array_equal(init_vocab.items, data.vocab.items)):
    return _load_init_new_catalogue(cfg, init_from, data, with_opt_state,
                                    init_vocab, opened, src, entry)
  if src.model.num_items != data.num_items:
    raise JaxrecError(f"{init_from}: model has {src.model.num_items} item "
                      f"ids but the data has {data.num_items}")
  cfg = cfg.replace(model=src.model, head=src.head, methods=src.methods)
  lineage = opened.meta["lineage"] + [entry]
  if not with_opt_state:
    return cfg, lineage, restore_params(opened, src, init_from), None
  checkpoint_meta.check_format(opened.meta, init_from, legacy_ok=False)
  restored, _ = orbax_io.restore(
      opened.mngr, opened.step, target=abstract_state(src, "latest"))
  opt_state = restored["opt_state"]
  fresh = jax.eval_shape(optimizer_for(cfg, restored["params"])[0].init,
                         restored["params"])
  if (jax.tree.structure(fresh) != jax.tree.structure(opt_state) or
      jax.tree.map(lambda a: a.shape, fresh) !=
      jax.tree.map(lambda a: a.shape, opt_state)):
    raise JaxrecError(f"{init_from}: its optimizer state does not fit this "
                      "run's optimizer (schedule, clipping, weight decay or "
                      "frozen parts differ); drop --init-opt-state")
  return cfg, lineage, restored["params"], opt_state


def _load_init_new_catalogue(cfg: Config, init_from: str,
                             data: sequences.SequenceData,
                             with_opt_state: bool,
                             init_vocab: vocab_lib.Vocabulary,
                             opened: checkpoints.Opened, src: Config,
                             entry: dict[str, Any]):
  """`_load_init` when the data has items the checkpoint never saw, or
  lacks some it had: known rows kept, new rows fresh (see
  `jaxrec.surgery.catalogue`); the counts printed and put in the lineage."""
  catalogue.check_growable(src, init_from)
  if with_opt_state:
    raise JaxrecError(f"--init-opt-state: the data changes {init_from}'s "
                      "catalogue, so its Adam moments have other rows; drop "
                      "--init-opt-state")
  params = restore_params(opened, src, init_from)
  params, new_src, counts = catalogue.remap_items(
      params, src, init_vocab, data.vocab, jax.random.key(cfg.train.seed))
  growth = data.meta.get("vocab_growth") or {}
  entry["catalogue"] = {
      "known": growth.get("known"), "new": growth.get("new"),
      "vanished": growth.get("vanished"),
      "vanished_policy": growth.get("vanished_policy"),
      "num_items": [src.model.num_items, new_src.model.num_items], **counts}
  if is_primary():  # One line per run, not per host.
    print(f"catalogue: {growth.get('known')} items of {init_from} kept, "
          f"{growth.get('new')} new (fresh rows), {growth.get('vanished')} "
          f"vanished ({growth.get('vanished_policy')}); "
          f"{src.model.num_items - 1} -> {new_src.model.num_items - 1} "
          "items")
  cfg = cfg.replace(model=new_src.model, head=new_src.head,
                    methods=new_src.methods)
  return cfg, opened.meta["lineage"] + [entry], params, None


def _with_requested_methods(requested: Config, cfg: Config,
                            params: models.Params, lineage: list,
                            with_opt_state: bool
                            ) -> tuple[Config, models.Params, list]:
  """`--init-from` takes the source's model, head and methods; methods
  asked for this run would be lost silently. They are applied here: a
  method the source runs takes this run's options (SkipRec's lambda, tau,
  ...); one it lacks is attached to its params (`method_api.attach`)."""
  added = [m for m in requested.methods if cfg.method(m.NAME) is None]
  for m in requested.methods:
    cfg = cfg.with_method(m)
  if not added:
    # Options that shape a method's params (SkipRec's policy_dim, ...)
    # cannot change on a trained tree.
    models.require_fit(params, cfg, "--init-from: its params with this "
                       "run's method options")
    return cfg, params, lineage
  if with_opt_state:
    raise JaxrecError(f"--init-opt-state: the source has no "
                      f"{', '.join(m.NAME for m in added)} params, so its "
                      "optimizer state has no moments for them; drop "
                      "--init-opt-state")
  cfg.validate()
  params = method_api.attach(params, cfg, jax.random.key(cfg.train.seed),
                             {m.NAME for m in added})
  return cfg, params, lineage + [
      {"op": "attach", "method": m.NAME, **dataclasses.asdict(m)}
      for m in added]


def _terms(out: dict) -> dict[str, float]:
  """The methods' loss terms of a step's output, as logged floats."""
  return {k: float(v) for k, v in out.items() if k.startswith("loss/")}


def _check_finite(state: State, out: dict,
                  ckpts: checkpoints.RunCheckpoints) -> float:
  bad = int(state["first_bad_step"])
  if bad >= 0:
    last = ckpts.pending if ckpts.pending is not None else ckpts.complete
    kept = (f"the last good checkpoint is {ckpts.latest.directory}/{last}"
            if last is not None else "no checkpoint was written")
    raise JaxrecError(f"loss is NaN/inf at step {bad}; stopped, {kept}")
  return float(out["loss"])
