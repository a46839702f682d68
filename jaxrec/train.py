"""The training loop: one readable function, `train`, and its pure step.

- `train_step(state, batch)` is pure and jitted with NamedShardings over a
  1-D `data` mesh of all devices: the batch is split on `data`, params and
  optimizer state are replicated, and the state is donated.
- The batch for step s and the step's RNG are pure functions of (seed, s),
  so resuming from a checkpoint at step s replays exactly what an
  uninterrupted run would have done.
- Validation every `eval_every` steps; the best params (by `select_metric`)
  go to `checkpoints/best`, the full state to `checkpoints/latest`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from jaxrec import checkpoints
from jaxrec import losses
from jaxrec import metrics
from jaxrec import models
from jaxrec import sequences
from jaxrec.config import Config, TrainConfig
from jaxrec.errors import JaxrecError

State = dict[str, Any]


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `data` over the given (default: all) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
  """Adam (AdamW with weight decay), optional schedule and clipping."""
  lr: Any = tcfg.learning_rate
  if tcfg.schedule == "cosine":
    lr = optax.cosine_decay_schedule(tcfg.learning_rate, tcfg.steps)
  elif tcfg.schedule == "warmup_cosine":
    lr = optax.warmup_cosine_decay_schedule(
        0.0, tcfg.learning_rate, tcfg.warmup_steps, tcfg.steps)
  opt = (optax.adamw(lr, weight_decay=tcfg.weight_decay)
         if tcfg.weight_decay > 0 else optax.adam(lr))
  if tcfg.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), opt)
  return opt


def init_state(params: models.Params,
               opt: optax.GradientTransformation) -> State:
  return {"params": params, "opt_state": opt.init(params),
          "step": jnp.zeros((), jnp.int32),
          # The first step whose loss was not finite (-1: none yet), tracked
          # on device so the loop can name it without syncing every step.
          "first_bad_step": jnp.full((), -1, jnp.int32)}


def make_train_step(cfg: Config, opt: optax.GradientTransformation,
                    sampler: Any) -> Callable[[State, dict], tuple]:
  """The pure step: (state, batch) -> (state, {"loss"})."""
  mcfg, tcfg = cfg.model, cfg.train
  base_key = jax.random.key(tcfg.seed)

  def loss_fn(params, batch, rng):
    h = models.hidden_states(params, mcfg, batch["inputs"])
    h = h.reshape(-1, mcfg.embed_dim).astype(mcfg.dtype)
    w, b = models.output_layer(params, mcfg)
    targets = batch["targets"].reshape(-1)
    return losses.output_loss(h, w, b, targets, targets != 0, rng, tcfg,
                              sampler)

  def train_step(state, batch):
    step = state["step"]
    rng = jax.random.fold_in(base_key, step)
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch, rng)
    updates, opt_state = opt.update(grads, state["opt_state"],
                                    state["params"])
    first_bad = jnp.where(
        (state["first_bad_step"] < 0) & ~jnp.isfinite(loss), step,
        state["first_bad_step"])
    new_state = {"params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "step": step + 1,
                 "first_bad_step": first_bad}
    return new_state, {"loss": loss}

  return train_step


def make_rank_fn(cfg: Config) -> Callable:
  """(params, inputs, targets) -> full-ranking 0-based ranks of targets."""
  mcfg, mask_history = cfg.model, cfg.train.mask_history

  def rank_fn(params, inputs, targets):
    h = models.hidden_states(params, mcfg, inputs)[:, -1]
    w, b = models.output_layer(params, mcfg)
    return metrics.target_ranks(h.astype(mcfg.dtype), w, b, targets,
                                inputs if mask_history else None,
                                tile=cfg.train.loss_chunk)

  return rank_fn


def abstract_state(cfg: Config, kind: str = "latest",
                   sharding: Any = None) -> Any:
  """The tree a checkpoint of `kind` holds, as ShapeDtypeStructs.

  `latest` checkpoints hold the whole train state (a grown model's too, with
  a fresh or mapped optimizer state); `best` ones hold only the params.
  """
  opt = make_optimizer(cfg.train)

  def build():
    params = models.init_params(cfg.model, jax.random.key(0))
    return (init_state(params, opt) if kind == "latest"
            else {"params": params})

  tree = jax.eval_shape(build)
  if sharding is not None:
    tree = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
        tree)
  return tree


class Sharder:
  """Places host batches on the mesh, batch axis split over `data`."""

  def __init__(self, mesh: Mesh):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.batch = NamedSharding(mesh, P("data"))

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Each process passes the whole global batch and contributes its rows."""
    n, k = jax.process_count(), jax.process_index()

    def put(x):
      rows = x.shape[0] // n
      return jax.make_array_from_process_local_data(
          self.batch, x[k * rows:(k + 1) * rows], x.shape)

    return {key: put(x) for key, x in batch.items()}

  def replicate(self, tree: Any) -> Any:
    return jax.device_put(tree, self.replicated)

  def check_batch(self, batch_size: int, option: str) -> int:
    """The batch size, if the mesh's devices split it evenly."""
    size = self.mesh.size
    if batch_size % size:
      raise JaxrecError(f"{option}={batch_size}: must be a multiple of the "
                        f"{size} devices of the mesh")
    return batch_size


def evaluate_params(params: models.Params, cfg: Config, sharder: Sharder,
                    inputs: np.ndarray, targets: np.ndarray,
                    rank_fn: Callable | None = None) -> dict[str, float]:
  """Full-ranking metrics of `params` on (inputs, targets)."""
  if rank_fn is None:
    rank_fn = jit_rank_fn(cfg, sharder)
  batch_size = sharder.check_batch(cfg.train.eval_batch_size,
                                   "train.eval_batch_size")

  def ranks(batch):
    placed = sharder.put_batch({"inputs": batch["inputs"],
                                "targets": batch["targets"]})
    return rank_fn(params, placed["inputs"], placed["targets"])

  return metrics.evaluate(ranks, inputs, targets, batch_size)


def jit_rank_fn(cfg: Config, sharder: Sharder) -> Callable:
  # Ranks come back replicated: on several hosts each process reads them
  # all, which a batch-sharded array would not allow.
  return jax.jit(make_rank_fn(cfg),
                 in_shardings=(sharder.replicated, sharder.batch,
                               sharder.batch),
                 out_shardings=sharder.replicated)


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


def train(cfg: Config, out_dir: str, data: sequences.SequenceData | None = None,
          resume: bool = False, init_from: str | None = None,
          init_opt_state: bool = False,
          devices: list[jax.Device] | None = None, progress_bar: bool = True,
          step_callback: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Trains, validates, checkpoints; writes and returns DIR/metrics.json.

  `init_from` starts from another run's (or a grown) checkpoint's params,
  with its model config; `init_opt_state` also takes its optimizer state
  (from its latest checkpoint, e.g. `jaxrec grow --map-opt-state`), else the
  optimizer starts fresh as in the paper. `step_callback(step)` runs after
  each step (tests use it to kill a run at a chosen moment).
  """
  if data is None:
    from jaxrec import input_pipeline  # pylint: disable=import-outside-toplevel
    data = input_pipeline.load_data(cfg.data)
  lineage: list[dict[str, Any]] = []
  if init_from:
    cfg, lineage, init_params, init_opt = _load_init(cfg, init_from, data,
                                                     init_opt_state)
  cfg = cfg.replace(model=dataclasses.replace(cfg.model,
                                              num_items=data.num_items))
  cfg.validate()
  tcfg = cfg.train
  _prepare_run_dir(cfg, out_dir, resume)

  mesh = make_mesh(devices)
  sharder = Sharder(mesh)
  batch_size = sharder.check_batch(tcfg.batch_size, "train.batch_size")
  opt = make_optimizer(tcfg)
  sampler = (losses.make_sampler(tcfg.sampler, data.num_items,
                                 data.item_counts)
             if tcfg.loss == "sampled" else None)
  step_fn = jax.jit(make_train_step(cfg, opt, sampler),
                    in_shardings=(sharder.replicated, sharder.batch),
                    out_shardings=(sharder.replicated, sharder.replicated),
                    donate_argnums=0)
  rank_fn = jit_rank_fn(cfg, sharder)

  params = (init_params if init_from else
            models.init_params(cfg.model, jax.random.key(tcfg.seed)))
  state = init_state(params, opt)
  if init_from and init_opt_state:
    state["opt_state"] = init_opt  # E.g. Adam moments mapped by `grow`.
  state = sharder.replicate(state)
  latest = checkpoints.manager(out_dir, "latest", keep=tcfg.keep_checkpoints)
  best = checkpoints.manager(out_dir, "best", keep=1)
  prog = Progress()
  if resume and latest.latest_step() is not None:
    state, meta = _restore_latest(latest, state, cfg, data)
    prog = Progress(**meta["progress"])
    lineage = meta["lineage"]
  start = int(state["step"])

  log = MetricsLog(out_dir, tcfg.tensorboard, start)
  log_every = min(50, tcfg.eval_every)
  tokens_per_step = int(np.sum(data.train[:, 1:] != 0) /
                        max(1, data.train.shape[0]) * batch_size)
  bar = tqdm(total=tcfg.steps, initial=start, disable=not progress_bar,
             desc="train", unit="step", mininterval=1.0, dynamic_ncols=True)
  t_last, s_last = time.time(), start
  clock = time.time() - prog.train_time_s
  done = start
  # A resumed run that had already stopped early stays stopped.
  end = start if prog.stopped(tcfg.patience) else tcfg.steps
  try:
    for step in range(start, end):
      batch = sequences.train_batch(data.train, step, batch_size, tcfg.seed)
      state, out = step_fn(state, sharder.put_batch(batch))
      done = step + 1
      log_now = done % log_every == 0 or done == tcfg.steps
      eval_now = done % tcfg.eval_every == 0 or done == tcfg.steps
      if log_now or eval_now:  # Never validate or save non-finite params.
        loss = _check_finite(state, out, out_dir)
      if log_now:
        rate = (done - s_last) * tokens_per_step / (time.time() - t_last)
        t_last, s_last = time.time(), done
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
        log.write({"step": done, "loss": loss, "tokens_per_s": rate})
      bar.update(1)
      if eval_now:
        valid = evaluate_params(state["params"], cfg, sharder,
                                data.valid_inputs, data.valid_targets,
                                rank_fn)
        prog.train_time_s = time.time() - clock
        improved = prog.record(valid, tcfg.select_metric, done)
        log.write({"step": done, "valid": valid,
                   "train_time_s": prog.train_time_s})
        bar.write(f"step {done}: valid {tcfg.select_metric}="
                  f"{valid[tcfg.select_metric]:.4f}"
                  + (" (best)" if improved else ""))
        meta = checkpoints.make_meta(cfg, data.fingerprint, done, lineage,
                                     progress=dataclasses.asdict(prog))
        if improved:
          checkpoints.save(best, done, {"params": state["params"]}, meta)
        checkpoints.save(latest, done, state, meta)
        if prog.stopped(tcfg.patience):
          bar.write(f"early stop at step {done}: no {tcfg.select_metric} "
                    f"gain in {tcfg.patience} validations")
          break
      if step_callback is not None:
        step_callback(done)
  finally:
    bar.close()
    log.close()
    latest.wait_until_finished()
    best.wait_until_finished()

  return _finish(cfg, out_dir, data, sharder, rank_fn, best, prog, done)


def _finish(cfg: Config, out_dir: str, data: sequences.SequenceData,
            sharder: Sharder, rank_fn: Callable, best, prog: Progress,
            steps: int) -> dict[str, Any]:
  """Tests the best checkpoint (read back from disk) and writes metrics.json."""
  restored, _ = checkpoints.restore(
      best, target=abstract_state(cfg, "best", sharder.replicated))
  test = evaluate_params(restored["params"], cfg, sharder, data.test_inputs,
                         data.test_targets, rank_fn)
  pop = metrics.popularity_metrics(data.item_counts, data.test_inputs,
                                   data.test_targets, cfg.train.mask_history)
  result = {
      "valid": prog.best_valid, "test": test, "popularity": pop,
      "best_step": prog.best_step, "steps": steps,
      "train_time_s": prog.train_time_s,
      "ranking": "full", "mask_history": cfg.train.mask_history,
      "data": data.meta,
  }
  checkpoints.write_json(os.path.join(out_dir, "metrics.json"), result)
  return result


def refuse_existing_checkpoints(out_dir: str) -> None:
  """Surgery writes a new directory; it never overwrites a run."""
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise JaxrecError(f"{out_dir}: already holds checkpoints; choose another "
                      "--out")


def save_start_checkpoint(out_dir: str, cfg: Config, params: models.Params,
                          data_fingerprint: str, lineage: list[dict],
                          opt_state: Any = None) -> None:
  """Saves step 0 of a model made by surgery (a grown model, a new head).

  A full train state in out_dir/checkpoints/latest (the optimizer state
  fresh unless given) plus out_dir/config.json, so `train --init-from`
  starts from it. Refuses a directory that already holds checkpoints, and
  returns only once the checkpoint is on disk.
  """
  refuse_existing_checkpoints(out_dir)
  state = init_state(params, make_optimizer(cfg.train))
  if opt_state is not None:
    state["opt_state"] = opt_state
  meta = checkpoints.make_meta(cfg, data_fingerprint, 0, lineage,
                               progress=dataclasses.asdict(Progress()))
  os.makedirs(out_dir, exist_ok=True)
  mngr = checkpoints.manager(out_dir, "latest", keep=1)
  checkpoints.save(mngr, 0, state, meta)
  mngr.wait_until_finished()
  mngr.close()
  checkpoints.write_json(os.path.join(out_dir, "config.json"), cfg.to_dict())


def _prepare_run_dir(cfg: Config, out_dir: str, resume: bool) -> None:
  """Refuses to mix runs: a resume needs the same config, a fresh run an
  empty directory. Guards against silently continuing someone else's run."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "config.json")
  has_ckpt = os.path.isdir(os.path.join(out_dir, "checkpoints", "latest"))
  if os.path.exists(path) and (resume or has_ckpt):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    if not resume:
      raise JaxrecError(f"{out_dir}: already holds a run; pass --resume to "
                        "continue it or choose another --out")
    diff = _config_diff(saved, cfg.to_dict())
    if diff:
      raise JaxrecError(f"{path}: --resume with a different config "
                        f"({', '.join(diff)}); use another --out")
  checkpoints.write_json(path, cfg.to_dict())


def _config_diff(saved: dict, new: dict) -> list[str]:
  out = []
  for section in ("model", "data", "train"):
    for key in sorted(set(saved.get(section, {})) | set(new[section])):
      a, b = saved.get(section, {}).get(key), new[section].get(key)
      if a != b and f"{section}.{key}" != "train.steps":
        out.append(f"{section}.{key}: {a!r} -> {b!r}")
  return out


def _restore_latest(latest, state: State, cfg: Config,
                    data: sequences.SequenceData) -> tuple[State, dict]:
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      state)
  restored, meta = checkpoints.restore(latest, target=abstract)
  if meta["data_fingerprint"] != data.fingerprint:
    raise JaxrecError(f"{latest.directory}: checkpoint was trained on other "
                      "data (fingerprint differs); use another --out")
  return restored, meta


def _load_init(cfg: Config, init_from: str, data: sequences.SequenceData,
               with_opt_state: bool):
  """Params (and optionally the optimizer state) of a grown or trained
  checkpoint; its model config wins. Returns (cfg, lineage, params,
  opt_state or None)."""
  # Only `latest` checkpoints hold an optimizer state.
  ckpt = checkpoints.open_checkpoint(init_from,
                                     "latest" if with_opt_state else None)
  kind, step, meta = ckpt.kind, ckpt.step, ckpt.meta
  src = checkpoints.config_from_meta(meta, init_from)
  if src.model.num_items != data.num_items:
    raise JaxrecError(f"{init_from}: model has {src.model.num_items} item "
                      f"ids but the data has {data.num_items}")
  cfg = cfg.replace(model=src.model)
  restored, _ = checkpoints.restore(
      ckpt.mngr, step, target=abstract_state(src, kind))
  lineage = meta["lineage"] + [{"dir": os.path.abspath(init_from),
                                "kind": kind, "step": step,
                                "op": "init_from",
                                "opt_state": with_opt_state}]
  opt_state = None
  if with_opt_state:
    opt_state = restored["opt_state"]
    fresh = jax.eval_shape(make_optimizer(cfg.train).init, restored["params"])
    if (jax.tree.structure(fresh) != jax.tree.structure(opt_state) or
        jax.tree.map(lambda a: a.shape, fresh) !=
        jax.tree.map(lambda a: a.shape, opt_state)):
      raise JaxrecError(f"{init_from}: its optimizer state does not fit this "
                        "run's optimizer (schedule, clipping or weight decay "
                        "differ); drop --init-opt-state")
  return cfg, lineage, restored["params"], opt_state


def _check_finite(state: State, out: dict, out_dir: str) -> float:
  bad = int(state["first_bad_step"])
  if bad >= 0:
    raise JaxrecError(f"loss is NaN/inf at step {bad}; stopped, the last "
                      f"good checkpoint is kept in {out_dir}/checkpoints")
  return float(out["loss"])


def _drop_records_after(path: str, step: int) -> None:
  """A resumed run replays the steps after its checkpoint: the killed run's
  records of them go, so the log reads as one uninterrupted run."""
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line)
      except json.JSONDecodeError:  # A kill can cut the last line short.
        continue
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)


class MetricsLog:
  """DIR/metrics.jsonl, plus TensorBoard events under DIR/tb if asked."""

  def __init__(self, out_dir: str, tensorboard: bool, start_step: int = 0):
    path = os.path.join(out_dir, "metrics.jsonl")
    _drop_records_after(path, start_step)
    self.file = open(path, "a", encoding="utf-8")
    self.tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      except ImportError:
        self.file.close()
        raise JaxrecError("train.tensorboard=true needs tensorboardX: "
                          "pip install tensorboardX") from None
      self.tb = SummaryWriter(os.path.join(out_dir, "tb"))

  def write(self, record: dict[str, Any]) -> None:
    self.file.write(json.dumps(record) + "\n")
    self.file.flush()
    if self.tb is not None:
      for key, value in record.items():
        if isinstance(value, dict):
          for name, v in value.items():
            self.tb.add_scalar(f"{key}/{name}", v, record["step"])
        elif key != "step":
          self.tb.add_scalar(key, value, record["step"])

  def close(self) -> None:
    self.file.close()
    if self.tb is not None:
      self.tb.close()
