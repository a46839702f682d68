"""The run directory: who may write it, and its logs.

  DIR/config.json      the full Config (a resume must match it)
  DIR/metrics.jsonl    loss and tokens/s every 50 steps, each validation
  DIR/metrics.json     the final summary (`jaxrec.training.loop`)
  DIR/checkpoints/     `jaxrec.training.checkpoints`
  DIR/tb/              TensorBoard events, if asked
"""
from __future__ import annotations

import json
import os
from typing import Any

from jaxrec import config as config_lib
from jaxrec.config import Config
from jaxrec.errors import JaxrecError, reported_as
from jaxrec.training import checkpoints


def prepare(cfg: Config, out_dir: str, resume: bool) -> None:
  """Refuses to mix runs: a fresh run needs a directory holding none (and
  writes DIR/config.json); a resume needs a run to resume
  (`check_config_file` and the checkpoint then compare configs). A resume
  writes nothing here: its
  config.json is written only once its checkpoint restored
  (`write_config`), so a failed resume cannot change what the run was."""
  path = os.path.join(out_dir, "config.json")
  has_ckpt = bool(_entries(os.path.join(out_dir, "checkpoints", "latest")))
  if not resume:
    if os.path.exists(path) or has_ckpt:
      raise JaxrecError(f"{out_dir}: already holds a run; pass --resume to "
                        "continue it or choose another --out")
    # Another run's files without its config and checkpoints: a fresh run
    # would append to its log and test beside its best.
    left = sorted(n for n in _entries(out_dir) if n in RUN_FILES)
    if left:
      raise JaxrecError(f"{out_dir}: holds another run's files "
                        f"({', '.join(left)}); choose another --out")
    write_config(cfg, out_dir)
    return
  if not os.path.exists(path) and not has_ckpt:
    raise JaxrecError(f"{out_dir}: no run to resume here (no config.json, "
                      "no checkpoint); drop --resume to start one")


# What a run writes in its directory besides config.json and .lock.
RUN_FILES = ("checkpoints", "metrics.jsonl", "metrics.json",
             "vocabulary.json", "outputs.json", "tb")


def check_config_file(cfg: Config, out_dir: str) -> None:
  """A resume's config must match DIR/config.json, if there is one."""
  path = os.path.join(out_dir, "config.json")
  if os.path.exists(path):
    check_same_config(read_config(path), cfg, path)


def write_config(cfg: Config, out_dir: str) -> None:
  with reported_as(os.path.join(out_dir, "config.json"), "write"):
    checkpoints.write_json(os.path.join(out_dir, "config.json"),
                           cfg.to_dict())


def read_config(path: str) -> dict[str, Any]:
  """A run's config.json as a dict; damage is one line naming it."""
  with reported_as(path, "read the run's config"):
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  if not isinstance(raw, dict):
    raise JaxrecError(f"{path}: not a config (expected a JSON mapping)")
  return raw


def check_same_config(saved: dict[str, Any], cfg: Config, origin: str) -> None:
  """Refuses a resume whose options differ from the run's (`origin`: its
  config.json or its checkpoint)."""
  saved = config_lib.upgrade(dict(saved), origin)
  diff = config_diff(saved, cfg.to_dict())
  if diff:
    raise JaxrecError(f"{origin}: --resume with a different config "
                      f"({', '.join(diff)}); use another --out")


def _entries(path: str) -> list[str]:
  return os.listdir(path) if os.path.isdir(path) else []


def config_diff(saved: dict, new: dict) -> list[str]:
  """`section.key: old -> new` for every difference but those a resume may
  make (`config.resume_may_change`: extending a run, other devices, where
  the cache lives, what is logged, how many checkpoints are kept)."""
  out = []
  may_change = config_lib.resume_may_change()
  for section in config_lib.SECTIONS:
    for key in sorted(set(saved.get(section, {})) | set(new.get(section, {}))):
      a, b = saved.get(section, {}).get(key), new.get(section, {}).get(key)
      if a != b and f"{section}.{key}" not in may_change:
        out.append(f"{section}.{key}: {a!r} -> {b!r}")
  return out


def refuse_existing_checkpoints(out_dir: str) -> None:
  """Surgery writes a new directory; it never overwrites a run."""
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    raise JaxrecError(f"{out_dir}: already holds checkpoints; choose another "
                      "--out")


def drop_records_after(path: str, step: int) -> None:
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


class NullLog:
  """The training log of a process that writes none (not process 0)."""

  def write(self, record: dict[str, Any]) -> None:
    del record

  def close(self) -> None:
    pass


class MetricsLog:
  """DIR/metrics.jsonl, plus TensorBoard events under DIR/tb if asked."""

  def __init__(self, out_dir: str, tensorboard: bool, start_step: int = 0):
    self.path = os.path.join(out_dir, "metrics.jsonl")
    with reported_as(self.path, "write the training log"):
      drop_records_after(self.path, start_step)
      self.file = open(self.path, "a", encoding="utf-8")
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
    with reported_as(self.path, "write the training log"):
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
