"""Configuration: three flat dataclasses (model, data, train) and one `Config`.

A config file (YAML or JSON) has the sections `model`, `data` and `train`;
command-line flags override it. Every field is validated here so a bad value
fails with a one-line `JaxrecError` naming the option, before any work starts.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jaxrec.errors import JaxrecError

CONFIG_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """NextItNet with the StackRec alpha-residual block."""
  num_items: int = 0  # V, including the padding id 0; filled in from the data.
  embed_dim: int = 64  # C: embedding size = conv channels.
  num_blocks: int = 8
  kernel_size: int = 3
  # A cycle of first-conv dilations; block i uses dilations[i % len] and its
  # second conv twice that. [1, 4] gives conv dilations 1,2,4,8,1,2,4,8,...
  # A list as long as num_blocks pins every block (StackRec's `carry` policy).
  dilations: tuple[int, ...] = (1, 4)
  residual: str = "alpha"  # "alpha": x + a*h, a learned, init 0; "plain": x + h.
  tie_embeddings: bool = False  # Output layer = item embedding (+ own bias).
  dtype: str = "float32"  # Compute dtype; params are always float32.
  layer_norm_eps: float = 1e-8  # As the official code.

  def block_dilations(self) -> tuple[int, ...]:
    """The first-conv dilation of every block, bottom to top."""
    return tuple(self.dilations[i % len(self.dilations)]
                 for i in range(self.num_blocks))

  def validate(self) -> None:
    _require(self.num_items == 0 or self.num_items >= 2, "model.num_items",
             self.num_items, "0 (taken from the data) or at least 2 "
             "(padding id 0 and one item)")
    _require(self.embed_dim >= 1, "model.embed_dim", self.embed_dim, ">= 1")
    _require(self.num_blocks >= 1, "model.num_blocks", self.num_blocks, ">= 1")
    _require(self.kernel_size >= 1, "model.kernel_size", self.kernel_size,
             ">= 1")
    _require(len(self.dilations) >= 1 and all(
        isinstance(d, int) and d >= 1 for d in self.dilations),
             "model.dilations", list(self.dilations),
             "a non-empty list of positive integers")
    _choice("model.residual", self.residual, ("alpha", "plain"))
    _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where sequences come from and how they are split."""
  # synthetic[:SIZE] | movielens:PATH | csv:PATH | recbole:PATH.inter | tfds:NAME
  source: str = "synthetic"
  protocol: str = "loo"  # "loo" (leave-one-out) or "paper" (80/20 by sequence).
  max_len: int = 50  # Items a model sees before a prediction.
  min_user_count: int = 5  # k-core: users with fewer interactions dropped.
  min_item_count: int = 5  # k-core: items with fewer interactions dropped.
  window: int = 0  # >0: split long training histories into windows this long.
  test_fraction: float = 0.2  # paper protocol: share of sequences for test.
  valid_fraction: float = 0.1  # paper protocol: share of sequences for valid.
  split_seed: int = 10  # paper protocol shuffle seed (the official code's 10).
  cache_dir: str = ""  # Processed-array cache; "" = ~/.cache/jaxrec.
  # csv sources: column names (or 0-based indices) and the delimiter.
  user_col: str = "user_id"
  item_col: str = "item_id"
  time_col: str = "timestamp"
  delimiter: str = ""  # "" = sniff from the file extension (.tsv -> tab).

  def validate(self) -> None:
    _choice("data.protocol", self.protocol, ("loo", "paper"))
    _require(self.max_len >= 1, "data.max_len", self.max_len, ">= 1")
    _require(self.min_user_count >= 1, "data.min_user_count",
             self.min_user_count, ">= 1")
    _require(self.min_item_count >= 1, "data.min_item_count",
             self.min_item_count, ">= 1")
    _require(self.window >= 0, "data.window", self.window, ">= 0")
    _require(0.0 < self.test_fraction < 1.0, "data.test_fraction",
             self.test_fraction, "in (0, 1)")
    _require(0.0 < self.valid_fraction < 1.0 - self.test_fraction,
             "data.valid_fraction", self.valid_fraction,
             "in (0, 1 - test_fraction)")
    kind = self.source.split(":", 1)[0]
    _choice("data.source", kind,
            ("synthetic", "movielens", "csv", "recbole", "tfds"))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, evaluation and checkpointing."""
  batch_size: int = 128
  steps: int = 2000  # Total optimiser steps.
  learning_rate: float = 1e-3
  schedule: str = "constant"  # "constant" | "cosine" | "warmup_cosine"
  warmup_steps: int = 0
  weight_decay: float = 0.0  # > 0 switches Adam to AdamW.
  clip_norm: float = 0.0  # > 0 clips the global gradient norm.
  loss: str = "full"  # "full" (chunked full softmax) | "sampled"
  loss_chunk: int = 16384  # Items per tile of the chunked full softmax.
  num_samples: int = 1000  # Negatives per step for the sampled softmax.
  sampler: str = "log_uniform"  # "uniform" | "log_uniform" | "unigram"
  eval_every: int = 500  # Steps between validations (and checkpoints).
  eval_batch_size: int = 512
  select_metric: str = "mrr@5"  # Early stopping and best checkpoint.
  patience: int = 0  # Validations without improvement before stopping; 0 off.
  mask_history: bool = False  # Evaluation: never rank items the user had.
  keep_checkpoints: int = 2  # Latest checkpoints kept (the best is kept too).
  seed: int = 0
  tensorboard: bool = False

  def validate(self) -> None:
    for name in ("batch_size", "steps", "eval_every", "eval_batch_size",
                 "loss_chunk", "num_samples", "keep_checkpoints"):
      _require(getattr(self, name) >= 1, f"train.{name}", getattr(self, name),
               ">= 1")
    _require(self.learning_rate > 0, "train.learning_rate",
             self.learning_rate, "> 0")
    _require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps,
             ">= 0")
    _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay,
             ">= 0")
    _require(self.clip_norm >= 0, "train.clip_norm", self.clip_norm, ">= 0")
    _require(self.patience >= 0, "train.patience", self.patience, ">= 0")
    _choice("train.schedule", self.schedule,
            ("constant", "cosine", "warmup_cosine"))
    _choice("train.loss", self.loss, ("full", "sampled"))
    _choice("train.sampler", self.sampler,
            ("uniform", "log_uniform", "unigram"))
    _choice("train.select_metric", self.select_metric, METRIC_NAMES)


METRIC_NAMES = tuple(f"{m}@{k}" for k in (5, 10, 20)
                     for m in ("mrr", "hr", "ndcg"))
SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}


@dataclasses.dataclass(frozen=True)
class Config:
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()

  def validate(self) -> "Config":
    self.model.validate()
    self.data.validate()
    self.train.validate()
    return self

  def to_dict(self) -> dict[str, Any]:
    out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
    out["model"]["dilations"] = list(self.model.dilations)
    out["version"] = CONFIG_VERSION
    return out

  def replace(self, **sections: Any) -> "Config":
    return dataclasses.replace(self, **sections)


def from_dict(raw: dict[str, Any], origin: str = "config") -> Config:
  """Builds a Config from nested dicts; unknown keys name `origin`."""
  if not isinstance(raw, dict):
    raise JaxrecError(f"{origin}: expected a mapping with sections "
                      f"{sorted(SECTIONS)}, got {type(raw).__name__}")
  unknown = set(raw) - set(SECTIONS) - {"version"}
  if unknown:
    raise JaxrecError(f"{origin}: unknown section(s) {sorted(unknown)}; "
                      f"expected {sorted(SECTIONS)}")
  parts = {}
  for name, cls in SECTIONS.items():
    parts[name] = section_from_dict(cls, raw.get(name) or {},
                                    f"{origin}: {name}")
  return Config(**parts)


def section_from_dict(cls: type, values: dict[str, Any], origin: str) -> Any:
  """One section, with each value coerced to its field's type."""
  if not isinstance(values, dict):
    raise JaxrecError(f"{origin}: expected a mapping, got {values!r}")
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      raise JaxrecError(f"{origin}.{key}: unknown option; expected one of "
                        f"{sorted(fields)}")
    kwargs[key] = coerce(fields[key], value, f"{origin}.{key}")
  return cls(**kwargs)


def coerce(field: dataclasses.Field, value: Any, origin: str) -> Any:
  """Converts a parsed value (or a flag string) to the field's declared type."""
  kind = field.type if isinstance(field.type, str) else field.type.__name__
  try:
    if kind == "bool":
      if isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
          raise ValueError(value)
        return value.lower() in ("true", "1", "yes")
      return bool(value)
    if kind == "int":
      if isinstance(value, float) and not value.is_integer():
        raise ValueError(value)
      return int(value)
    if kind == "float":
      return float(value)
    if kind == "str":
      return str(value)
    if kind.startswith("tuple"):
      if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
      return tuple(int(v) for v in value)
  except (TypeError, ValueError):
    raise JaxrecError(f"{origin}: cannot read {value!r} as {kind}") from None
  raise AssertionError(f"unhandled field type {kind}")


def load_file(path: str) -> dict[str, Any]:
  """Reads a YAML or JSON config file into nested dicts."""
  if not os.path.isfile(path):
    raise JaxrecError(f"{path}: config file not found")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if path.endswith(".json"):
    try:
      return json.loads(text)
    except json.JSONDecodeError as e:
      raise JaxrecError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
  import yaml  # pylint: disable=import-outside-toplevel
  try:
    return yaml.safe_load(text) or {}
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    raise JaxrecError(f"{path}{line}: invalid YAML: {problem}") from None


def _require(ok: bool, option: str, value: Any, expected: str) -> None:
  if not ok:
    raise JaxrecError(f"{option}={value!r}: expected {expected}")


def _choice(option: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise JaxrecError(f"{option}={value!r}: expected one of {list(choices)}")
