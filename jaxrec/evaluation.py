"""Working with saved runs: evaluate a checkpoint, describe its param tree.

Backs `jaxrec eval` and `jaxrec inspect`, and is the notebook entry point:
`load_params(run_dir)` gives (params, config, meta) of a checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxrec import config as config_lib
from jaxrec import method_api, models, tasks
from jaxrec.config import Config
from jaxrec.data import pipeline
from jaxrec.data import vocabulary as vocab_lib
from jaxrec.errors import JaxrecError
from jaxrec import ranking
from jaxrec.training import checkpoints
from jaxrec.training import checkpoint_meta
from jaxrec.training import orbax_io
from jaxrec.training import state as state_lib
from jaxrec.training.loop import evaluate_params, jit_rank_fn
from jaxrec.training.mesh import Sharder, make_mesh
from jaxrec.training.state import load_params

__all__ = ["load_params", "param_shapes", "evaluate_checkpoint",
           "sampled_metrics", "describe_checkpoint"]


def evaluate_checkpoint(run_dir: str, source: str | None = None,
                        protocol: str | None = None, split: str = "both",
                        mask_history: bool = False,
                        sampled: int = 0) -> dict[str, Any]:
  """Metrics of a run's checkpoint on its own data (or another source)."""
  if sampled < 0:
    raise JaxrecError(f"--sampled={sampled}: expected 0 (full ranking) or a "
                      "number of negatives >= 1")
  sharder = Sharder(make_mesh())
  params, cfg, meta = load_params(run_dir, sharding=sharder.replicated)
  data_cfg = cfg.data
  if source:
    data_cfg = dataclasses.replace(data_cfg, source=source)
  if protocol:
    data_cfg = dataclasses.replace(data_cfg, protocol=protocol)
  cfg = cfg.replace(data=data_cfg, train=dataclasses.replace(
      cfg.train, mask_history=mask_history))
  cfg.validate()
  task = tasks.for_config(cfg)
  if task.NAME == "transfer":  # A fine-tuning's downstream file.
    data = tasks.transfer.load_task_data(cfg, run_dir)
  else:
    data = _sequence_data(run_dir, meta, cfg, data_cfg, source)
  outputs = cfg.head.num_outputs(cfg.model)
  if sampled >= outputs - 1:
    # Negatives are drawn from the other items; as many as the catalogue
    # holds gives duplicates and metrics that mean nothing.
    raise JaxrecError(f"--sampled={sampled}: expected fewer negatives than "
                      f"the catalogue's {outputs - 1} items")
  splits = ("valid", "test") if split == "both" else (split,)
  rank_fn = jit_rank_fn(cfg, sharder, task)  # One compile for both splits.
  out: dict[str, Any] = {
      "checkpoint_step": meta["step"], "mask_history": mask_history,
      "ranking": f"sampled:{sampled}" if sampled else "full",
      "popularity_ranking": "full"}
  for name in splits:
    inputs = getattr(data, f"{name}_inputs")
    targets = getattr(data, f"{name}_targets")
    users = getattr(data, f"{name}_users")
    if sampled:
      out[name] = sampled_metrics(params, cfg, inputs, targets, sampled,
                                  users=users)
    else:
      out[name] = evaluate_params(params, cfg, sharder, inputs, targets,
                                  rank_fn, users)
    out[f"popularity_{name}"] = ranking.popularity_metrics(
        data.item_counts, inputs, targets, mask_history)
  # What the active methods measure (SkipRec: blocks computed / (blocks x
  # users) under the argmax gates).
  out.update(method_api.report(params, cfg, data))
  return out


def _sequence_data(run_dir: str, meta: dict[str, Any], cfg: Config,
                   data_cfg: config_lib.DataConfig,
                   source: str | None) -> Any:
  """The run's sequence data (or another version of it, `source`), its
  items numbered by the run's vocabulary. Numbered afresh, data a run
  trained on through another run's vocabulary (`train --init-from` on a
  new domain) got other ids than the model learned, and the metrics were
  silently wrong."""
  vocab = vocab_lib.find(run_dir)
  if vocab is not None:
    vocab.check_matches(meta.get("vocabulary"), run_dir)
  data = pipeline.load_data(data_cfg, vocab=vocab)
  new = (data.meta.get("vocab_growth") or {}).get("new", 0)
  if new:
    raise JaxrecError(f"--data={data_cfg.source}: {new} items the checkpoint "
                      f"{run_dir} never saw; fine-tune on it with `jaxrec "
                      "train --init-from` to add them")
  if data.num_items != cfg.model.num_items:
    raise JaxrecError(f"{run_dir}: model has {cfg.model.num_items} item ids "
                      f"but {data_cfg.source} has {data.num_items}")
  return data


def sampled_metrics(params: models.Params, cfg: Config, inputs: np.ndarray,
                    targets: np.ndarray, num_negatives: int,
                    seed: int = 0, users: np.ndarray | None = None
                    ) -> dict[str, Any]:
  """1 positive + N uniform negatives per user; labelled as sampled."""
  rng = np.random.default_rng(seed)

  ranks = jax.jit(tasks.for_config(cfg).sampled_rank_fn(cfg))

  def rank_fn(batch):
    neg = ranking.sample_negatives(rng, batch["targets"],
                                   cfg.head.num_outputs(cfg.model),
                                   num_negatives)
    return ranks(params, batch["inputs"], batch["targets"], neg,
                 batch["users"])

  out = ranking.evaluate(rank_fn, inputs, targets, cfg.train.eval_batch_size,
                         users)
  out["ranking"] = f"sampled:{num_negatives}"
  return out


def describe_model(cfg: Config) -> str:
  """One line: backbone, its options, head, active methods."""
  def options(values):
    return ", ".join(f"{k}={v}" for k, v in values.items())

  model = dict(config_lib.section_to_dict(cfg.model))
  name = model.pop("name")
  model.update(cfg.model.derived())
  head = dict(config_lib.section_to_dict(cfg.head))
  methods = "".join(
      f"; method {m.NAME} ({options(config_lib.section_to_dict(m))})"
      for m in cfg.methods)
  return (f"{name} ({options(model)}); head {head.pop('name')} "
          f"({options(head)}){methods}")


def param_shapes(run_dir: str, kind: str | None = None
                 ) -> tuple[Any, Config, dict[str, Any]]:
  """(params as ShapeDtypeStructs, config, meta) of a run's checkpoint,
  read from Orbax's metadata: no array is loaded, so it is instant for any
  model size (jax.tree.map(lambda x: x.shape, ...) works on it)."""
  opened = checkpoints.open_checkpoint(run_dir, kind)
  cfg = checkpoint_meta.config_from_meta(opened.meta, run_dir)
  state = orbax_io.state_metadata(opened.mngr, opened.step)
  origin = orbax_io.step_dir(opened.mngr, opened.step)
  if "params" not in state:
    raise JaxrecError(f"{origin}: checkpoint state holds no params")
  params = state["params"]
  if state_lib.saved_layout_differs(opened.meta, cfg):
    params = state_lib.convert_saved_params(params, opened.meta, cfg)
  if cfg.train.frozen_from:  # The frozen leaves' shapes are the config's.
    params = state_lib.graft(params, state_lib.frozen_params(
        models.abstract_params(cfg), cfg))
  models.require_fit(params, cfg, f"{origin}: the saved params")
  return params, cfg, opened.meta


def describe_checkpoint(run_dir: str, kind: str | None = None) -> str:
  """Param tree (shapes, dtypes, counts per subtree) and lineage, as text;
  shapes come from the checkpoint's metadata (`param_shapes`)."""
  kind = kind or checkpoints.default_kind(run_dir)
  params, cfg, meta = param_shapes(run_dir, kind)
  converted = (", converted" if state_lib.saved_layout_differs(meta, cfg)
               else "")
  lines = [f"{run_dir} ({kind} checkpoint, step {meta['step']}, format "
           f"{meta['format']}{converted})",
           f"model: {describe_model(cfg)}",
           "", f"{'param':<34}{'shape':<22}{'dtype':<10}{'count':>12}"]
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    lines.append(f"{name:<34}{str(tuple(leaf.shape)):<22}"
                 f"{str(leaf.dtype):<10}{int(np.prod(leaf.shape)):>12,}")
  lines.append("")
  for name, sub in params.items():
    lines.append(f"{name + ' total':<66}{models.count_params(sub):>12,}")
  lines.append(f"{'all':<66}{models.count_params(params):>12,}")
  ratio = models.compression_ratio(cfg)
  if ratio != 1.0:
    lines.append(f"compression: {ratio:.2f}x fewer params than the "
                 "uncompressed equivalent (full embedding and softmax, no "
                 "sharing)")
  if cfg.train.frozen_from:
    frozen = state_lib.frozen_params(params, cfg)
    lines.append(f"stored: the trainable leaves only; the frozen ones "
                 f"({models.count_params(frozen):,} params) are read from "
                 f"{cfg.train.frozen_from}")
  lines.append("")
  lines.append("lineage (oldest first):")
  chain = meta.get("lineage") or []
  if not chain:
    lines.append("  (trained from scratch)")
  for i, entry in enumerate(chain):
    detail = ", ".join(f"{k}={v}" for k, v in sorted(entry.items()))
    lines.append(f"  {i + 1}. {detail}")
  return "\n".join(lines)
