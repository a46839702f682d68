"""Configuration: one dataclass per section, help text beside every field.

A run's `Config` has five sections:

  model    the backbone's own config (architecture only), chosen by
           `model.name` from the registry in `jaxrec.models` (e.g.
           `NextItNetConfig`, `SASRecConfig`);
  head     the output head's config, chosen by `head.name` (`jaxrec.heads`);
  methods  the active methods (`jaxrec.methods`), each with its own config
           (a `MethodConfig`): `{skiprec: {lam: 0.5}, peterrec: {...}}`;
  data     `DataConfig`: source, protocol, processing;
  train    `TrainConfig`: optimisation, evaluation, checkpointing.

This module imports no backbone, head or method: their packages register
their config classes here (`register_class`) when they load, and a name
not registered yet loads the plug-in packages first (`load_plugins`: the
`jaxrec.plugins` entry points that setup.py declares, and any outside
package's), so the layers stay one-way (config < models, heads < methods).

A config file (YAML or JSON) holds these sections; command-line flags,
generated from the fields (`jaxrec.cli.flags`), override it. Every field is
declared with `option(default, help)`, so `--help` and the docs read the
same text as the code. Values are read by one coercer (`coerce`) with one
list syntax: a YAML/JSON list, or a string whose items are separated by
commas (numbers also by slashes: `1,4` or `1/4`; inside a `synthetic:` spec,
where commas separate options, only slashes; path patterns, which contain
slashes, only commas). Every value is validated here, so a bad one
fails with a one-line `JaxrecError` naming the option before any work starts.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import re
from typing import Any, ClassVar

from jaxrec.errors import JaxrecError
from jaxrec.nn import bands

# 3: the methods' options moved from `model.*` into `methods.<name>`.
CONFIG_VERSION = 3
TASKS = ("auto", "cold_start", "profile")
# PeterRec's downstream files (`jaxrec.data.transfer`), read by finetune.
TRANSFER_SOURCES = ("cold_start", "profile")
SPECIAL_TOKENS = ("mask", "cls", "unk")  # Input ids V, V+1, V+2.
METRIC_NAMES = tuple(f"{m}@{k}" for k in (5, 10, 20)
                     for m in ("mrr", "hr", "ndcg")) + ("accuracy",)


def option(default: Any, help: str, resume_may_change: str = "",  # pylint: disable=redefined-builtin
           **kwargs: Any) -> Any:
  """A dataclass field whose help text travels with it (`--help`, docs).

  `resume_may_change` (why) marks an option a `--resume` may give a new
  value: one that changes no result (where a cache lives, what is
  logged) or whose substance is checked another way. Every other option
  must equal the run's, so a resume never silently trains another run;
  without the mark a preempted run could not move to a machine whose
  cache sits elsewhere."""
  metadata = {"help": help}
  if resume_may_change:
    metadata["resume_may_change"] = resume_may_change
  return dataclasses.field(default=default, metadata=metadata, **kwargs)


def help_of(field: dataclasses.Field) -> str:
  return field.metadata.get("help", "")


def resume_may_change() -> dict[str, str]:
  """`section.field` -> why, for the options a resume may change (data
  and train: the sections every run has in one class)."""
  return {f"{section}.{f.name}": f.metadata["resume_may_change"]
          for section, cls in (("data", DataConfig), ("train", TrainConfig))
          for f in dataclasses.fields(cls)
          if "resume_may_change" in f.metadata}


# ---------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
  """Fields every backbone has; each backbone's config extends it."""
  name: str = option("nextitnet", "backbone, one of jaxrec.models.names()")
  num_items: int = option(0, "item ids incl. padding 0; taken from the data")
  embed_dim: int = option(64, "embedding size = hidden width C")
  num_blocks: int = option(8, "residual blocks in the stack")
  dtype: str = option("float32", "compute dtype (params stay float32); "
                      "bfloat16 on GPU/TPU")
  remat: str = option("none", "rematerialise each scanned block group in "
                      "the backward pass: none | full | dots (keep matmul "
                      "outputs)")
  embedding: str = option("full", "item embedding: full ([V, C] table) | "
                          "adaptive (CpRec: a [k_j, d_j] table and a "
                          "[d_j, C] projection per frequency band)")
  num_bands: int = option(4, "CpRec frequency bands, head to tail (adaptive "
                          "embedding, tree_softmax head)")
  band_shares: tuple[float, ...] = option(
      (0.8,), "cumulative shares of training events where bands end, head "
      "first; bands without one split the rest into equal masses")
  band_cutoffs: tuple[int, ...] = option(
      (), "explicit band cutoffs as item ids c_1 < ... < c_{n-1} (ids rank "
      "items by training frequency); empty: from band_shares, then written "
      "into the run's config")
  band_dims: tuple[int, ...] = option(
      (), "embedding width d_j of each band (default C / 4^j, at least 1)")
  special_tokens: tuple[str, ...] = option(
      (), "learned input vectors beside the items: mask (id V, masked "
      "pretraining) and cls (id V+1, PeterRec's user representation); "
      "params tokens/NAME [C]")

  def is_causal(self) -> bool:
    """Whether position t sees only positions <= t (next-item training);
    a bidirectional backbone overrides it and trains masked."""
    return True

  def training_task(self) -> str:
    """The task a plain run of this backbone trains on (`jaxrec.tasks`):
    next_item for a causal backbone, masked_item for a bidirectional one;
    a backbone with its own objective (GRec: gap_filling) overrides it."""
    return "next_item" if self.is_causal() else "masked_item"

  def token_id(self, name: str) -> int:
    """The input id of a special token: mask V, cls V+1 (never an item)."""
    return self.num_items + SPECIAL_TOKENS.index(name)

  def fit_data(self, num_items: int, max_len: int) -> "BackboneConfig":
    """This config with the sizes the data fixes (a backbone with position
    embeddings also takes max_len)."""
    del max_len
    return dataclasses.replace(self, num_items=num_items)

  def fit_users(self, num_users: int) -> "BackboneConfig":
    """This config with the user table's size the data fixes (`num_users`:
    SequenceData.num_users, 0 when it has no users); only a backbone that
    reads users (SSE-PT) takes it."""
    del num_users
    return self

  def item_width(self) -> int:
    """Width of the item embedding's rows: the hidden width C, unless the
    backbone concatenates more to them (SSE-PT: the user's)."""
    return self.embed_dim

  def validate(self) -> None:
    require(self.num_items == 0 or self.num_items >= 2, "model.num_items",
            self.num_items, "0 (taken from the data) or at least 2 (padding "
            "id 0 and one item)")
    require(self.embed_dim >= 1, "model.embed_dim", self.embed_dim, ">= 1")
    require(self.num_blocks >= 1, "model.num_blocks", self.num_blocks, ">= 1")
    choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
    choice("model.remat", self.remat, ("none", "full", "dots"))
    choice("model.embedding", self.embedding, ("full", "adaptive"))
    for token in self.special_tokens:
      choice("model.special_tokens", token, SPECIAL_TOKENS)
    self.validate_bands()

  def capabilities(self) -> frozenset[str]:
    """What this backbone, so configured, promises the methods
    (`jaxrec.method_api`): `block_stack` (blocks are one tree with a
    leading axis under `params["blocks"]`, run by `scan_blocks`),
    `residual_gate` (a gate of 0 at the `branch` slot makes a block the
    identity), `slot:NAME` (the block calls that slot), `row_local_blocks`
    (a block's rows do not interact, so a subset of rows can run alone),
    `any_length` (no parameter is tied to a position: a trained model
    reads longer inputs than it trained on)."""
    return frozenset()

  def layer_pairs(self) -> dict[str, str]:
    """second -> first of the block's layers that can run one kernel
    (the `layer_pair` capability: CpRec's layer sharing)."""
    return {}

  def derived(self) -> dict[str, Any]:
    """Values the config implies that a description should show."""
    return {}

  def capability_hint(self, missing: list[str]) -> str:
    """The option that would give the `missing` capabilities, if any."""
    del missing
    return ""

  def validate_bands(self) -> None:
    """Band options: shares, cutoffs (against V once known), dims."""
    require(self.num_bands >= 1, "model.num_bands", self.num_bands, ">= 1")
    bands.check_shares(self.band_shares)
    if self.band_cutoffs:
      bands.check_cutoffs(self.band_cutoffs, self.num_bands, self.num_items)
    if self.band_dims:
      require(len(self.band_dims) == self.num_bands and all(
          d >= 1 for d in self.band_dims), "model.band_dims",
              list(self.band_dims),
              f"{self.num_bands} positive widths (one per band)")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Fields every output head has; each head's config extends it."""
  name: str = option("softmax", "output head, one of jaxrec.heads.names()")
  uses_bands = False  # Class attribute: built on the model's frequency bands.

  def validate(self) -> None:
    pass

  def check_train(self, train: "TrainConfig") -> None:
    """Refuses training options this head cannot honour."""
    del train

  def check_model(self, model: BackboneConfig) -> None:
    """Refuses head options that do not fit the model (band counts)."""
    del model

  def num_outputs(self, model: BackboneConfig) -> int:
    """Rows the head scores (id 0 included, never ranked): the model's
    items unless the head has its own vocabulary (a transfer task's)."""
    return model.num_items


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where sequences come from and how they are split."""
  source: str = option("synthetic", "a data set (`jaxrec data list`, e.g. "
                       "movielens-100k) | synthetic[:SIZE] | movielens:PATH | "
                       "csv:PATH | recbole:PATH.inter | tfds:NAME; "
                       "fine-tuning (jaxrec finetune): cold_start:PATH | "
                       "profile:PATH")
  protocol: str = option("loo", "loo: leave-one-out (valid = 2nd-to-last, "
                         "test = last); paper: 80/20 split by sequence plus "
                         "a valid slice")
  max_len: int = option(50, "items a model sees before each prediction")
  min_user_count: int = option(5, "k-core: drop users with fewer "
                               "interactions")
  min_item_count: int = option(5, "k-core: drop items with fewer "
                               "interactions")
  window: int = option(-1, "split training histories into windows of this "
                       "many transitions, each transition a target once per "
                       "epoch (-1: windows of max_len; 0: keep only each "
                       "history's last max_len items, as the official code)")
  test_fraction: float = option(0.2, "paper protocol: share of sequences "
                                "held out for test")
  valid_fraction: float = option(0.1, "paper protocol: share of sequences "
                                 "for validation")
  split_seed: int = option(10, "paper protocol: shuffle seed (the official "
                           "code's 10)")
  cache_dir: str = option("", "processed-data cache (default "
                          "~/.cache/jaxrec or $JAXREC_CACHE)",
                          resume_may_change="where the cache lives; the "
                          "data fingerprint checks what it holds")
  user_col: str = option("user_id", "csv/parquet: user column name (or "
                         "index)")
  item_col: str = option("item_id", "csv/parquet: item column name (or "
                         "index)")
  time_col: str = option("timestamp", "csv/parquet: timestamp column name "
                         "(or index)")
  delimiter: str = option("", "csv: field delimiter (default: tab for "
                          ".tsv, else comma)")

  def validate(self) -> None:
    choice("data.protocol", self.protocol, ("loo", "paper"))
    require(self.max_len >= 1, "data.max_len", self.max_len, ">= 1")
    require(self.min_user_count >= 1, "data.min_user_count",
            self.min_user_count, ">= 1")
    require(self.min_item_count >= 1, "data.min_item_count",
            self.min_item_count, ">= 1")
    require(self.window >= -1, "data.window", self.window,
            ">= -1 (-1: max_len, 0: last max_len items only)")
    require(0.0 < self.test_fraction < 1.0, "data.test_fraction",
            self.test_fraction, "in (0, 1)")
    require(0.0 < self.valid_fraction < 1.0 - self.test_fraction,
            "data.valid_fraction", self.valid_fraction,
            "in (0, 1 - test_fraction)")
    if ":" not in self.source and self.source != "synthetic":
      return  # A data set's name: the data registry checks it on load.
    kind = self.source.split(":", 1)[0]
    choice("data.source", kind,
           ("synthetic", "movielens", "csv", "parquet", "recbole", "tfds")
           + TRANSFER_SOURCES)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation, trainable parts, evaluation and checkpointing."""
  batch_size: int = option(128, "sequences per step (a multiple of the "
                           "device count)")
  steps: int = option(0, "optimiser steps (0: train.epochs passes over "
                      "the training rows)",
                      resume_may_change="a resume may extend a run")
  epochs: int = option(100, "passes over the training rows when train.steps "
                       "is 0; early stopping usually ends the run sooner",
                       resume_may_change="a resume may extend a run")
  learning_rate: float = option(1e-3, "Adam learning rate")
  schedule: str = option("constant", "constant | cosine | warmup_cosine")
  warmup_steps: int = option(0, "warmup steps for warmup_cosine")
  weight_decay: float = option(0.0, "> 0 switches Adam to AdamW, decaying "
                               "kernels and embeddings (not biases, norms or "
                               "gates)")
  label_smoothing: float = option(0.0, "share of the target's probability "
                                  "spread over all items (full softmax only)")
  clip_norm: float = option(0.0, "> 0 clips the global gradient norm")
  loss: str = option("full", "full: the head's exact loss (chunked full "
                     "softmax); sampled: sampled softmax with logQ "
                     "correction")
  loss_chunk: int = option(16384, "items per tile of the full softmax and "
                           "of evaluation")
  num_samples: int = option(1000, "negatives per step for the sampled "
                            "softmax")
  sampler: str = option("log_uniform", "uniform | log_uniform | unigram "
                        "(sampled softmax)")
  task: str = option("auto", "what the run optimises: auto (next_item; "
                     "masked_item for a bidirectional model) | cold_start | "
                     "profile (PeterRec transfer, set by jaxrec finetune)")
  frozen_from: str = option("", "run directory whose checkpoint holds this "
                            "run's frozen leaves (set by jaxrec finetune); "
                            "checkpoints then store only the trainable "
                            "leaves and load the rest from there")
  freeze: tuple[str, ...] = option((), "param paths to freeze, as regular "
                                   "expressions over 'a/b/c' leaf paths, e.g. "
                                   "'item_embedding/.*'; frozen leaves get no "
                                   "gradient and no optimizer state")
  train_top_blocks: int = option(0, "> 0: train only the top K blocks of "
                                 "every block stack (the rows below get no "
                                 "update and no weight decay)")
  mesh: str = option("", "device mesh data=D,model=M: the batch split over "
                     "D, item embedding and output tables (and their "
                     "optimizer state) split by rows over M; D*M = the "
                     "device count; empty: every device on data",
                     resume_may_change="checkpoints restore onto any mesh")
  eval_every: int = option(0, "steps between validations and checkpoints "
                           "(0: once per epoch)")
  eval_batch_size: int = option(512, "sequences per evaluation batch")
  select_metric: str = option("ndcg@10", "validation metric for early "
                              "stopping and the best checkpoint (NDCG@10: "
                              "the metric results are reported in, and over "
                              "ten ranks less noisy than MRR@5)")
  patience: int = option(30, "validations without improvement before "
                         "stopping (0: never stop early); 30 outlasts the "
                         "lulls of a noisy validation metric "
                         "(experiments/train_defaults.py: on "
                         "MovieLens-100k 10 stopped SASRec in a lull on 2 of "
                         "3 seeds)")
  mask_history: bool = option(False, "evaluation: never rank items already "
                              "in the input")
  final_test: bool = option(True, "test the best validation checkpoint at "
                            "the end (false: metrics.json holds no test "
                            "numbers; experiments/harness.py tests once, "
                            "after choosing on validation)",
                            resume_may_change="it decides only what the "
                            "end of the run writes")
  keep_checkpoints: int = option(2, "latest checkpoints kept for --resume",
                                 resume_may_change="how many are kept "
                                 "changes no result")
  seed: int = option(0, "seed of init, batch order, dropout and sampling")
  tensorboard: bool = option(False, "also write TensorBoard events to "
                             "DIR/tb (pip install -e .[tensorboard])",
                             resume_may_change="what is logged changes no "
                             "result")

  def validate(self) -> None:
    for name in ("batch_size", "epochs", "eval_batch_size", "loss_chunk",
                 "num_samples", "keep_checkpoints"):
      require(getattr(self, name) >= 1, f"train.{name}", getattr(self, name),
              ">= 1")
    for name in ("steps", "eval_every"):
      require(getattr(self, name) >= 0, f"train.{name}", getattr(self, name),
              ">= 0 (0: by epochs)")
    require(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing",
            self.label_smoothing, "in [0, 1)")
    if self.label_smoothing and self.loss != "full":
      raise JaxrecError(f"train.label_smoothing={self.label_smoothing}: "
                        "needs train.loss='full' (a sampled softmax does "
                        "not see every item)")
    require(self.learning_rate > 0, "train.learning_rate",
            self.learning_rate, "> 0")
    require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps,
            ">= 0")
    require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay,
            ">= 0")
    require(self.clip_norm >= 0, "train.clip_norm", self.clip_norm, ">= 0")
    require(self.patience >= 0, "train.patience", self.patience, ">= 0")
    require(self.train_top_blocks >= 0, "train.train_top_blocks",
            self.train_top_blocks, ">= 0")
    for pattern in self.freeze:
      try:
        re.compile(pattern)
      except re.error as e:
        raise JaxrecError(f"train.freeze={pattern!r}: not a regular "
                          f"expression ({e})") from None
    choice("train.schedule", self.schedule,
           ("constant", "cosine", "warmup_cosine"))
    choice("train.loss", self.loss, ("full", "sampled"))
    choice("train.task", self.task, TASKS)
    choice("train.sampler", self.sampler,
           ("uniform", "log_uniform", "unigram"))
    choice("train.select_metric", self.select_metric, METRIC_NAMES)


# ------------------------------------------------------------ methods


@dataclasses.dataclass(frozen=True)
class MethodConfig:
  """The options of one method (a paper's idea applied to a backbone);
  each method's config extends it and is registered with its `Method`
  (`jaxrec.method_api`). Class attributes say what the method is:

  NAME      its key under `methods:` and in the param tree;
  PHASE     composition order: grow 10, compress 20, skip 30, patch 40;
  VERSION   of this config's layout (`upgrade` brings older ones here);
  CLAIMS    exclusive features (two active methods claiming one clash);
  FLAGS     field -> command-line flag, where it is not `--NAME-FIELD`;
  LEGACY    old `model.<field>` (config version 2) -> this config's field;
  SWITCH    (field, value): the flag that turns the method off with that
            value (`--skip none`);
  COMPRESSES  whether it is a compression (undone for the reference of a
            compression ratio, `models.uncompressed`).
  """
  NAME: ClassVar[str] = ""
  PHASE: ClassVar[int] = 50
  VERSION: ClassVar[int] = 1
  CLAIMS: ClassVar[frozenset[str]] = frozenset()
  FLAGS: ClassVar[dict[str, str]] = {}
  LEGACY: ClassVar[dict[str, str]] = {}
  SWITCH: ClassVar[tuple[str, Any] | None] = None
  COMPRESSES: ClassVar[bool] = False

  def requires(self, cfg: "Config") -> frozenset[str]:
    """The backbone capabilities this method needs under `cfg`."""
    del cfg
    return frozenset()

  def removes(self, cfg: "Config") -> frozenset[str]:
    """Capabilities this method takes away from later phases (sharing
    takes `own_blocks`)."""
    del cfg
    return frozenset()

  def removal_hint(self) -> str:
    """What to do about a capability this method took away."""
    return ""

  def validate(self) -> None:
    """Refuses bad values of this method's own options."""

  def check(self, cfg: "Config") -> None:
    """Refuses what does not fit the rest of the run's config."""
    del cfg

  @classmethod
  def legacy_active(cls, model: dict[str, Any]) -> bool:
    """Whether a version-2 `model` section had this method on."""
    return any(old in model for old in cls.LEGACY)

  @classmethod
  def upgrade(cls, values: dict[str, Any], version: int) -> dict[str, Any]:
    """This method's section, from its stored `version` to VERSION."""
    del version
    return values


# -------------------------------------------- the registries' config classes

# Filled by the packages that own the classes (jaxrec.models, jaxrec.heads,
# jaxrec.methods, outside plug-ins) as they load; read by name here.
_CLASSES: dict[str, dict[str, type]] = {"model": {}, "head": {},
                                        "methods": {}}
PLUGIN_GROUP = "jaxrec.plugins"
_plugins_loaded = False


def register_class(section: str, name: str, cls: type) -> None:
  """Makes `cls` the config class of `section` entry `name`."""
  known = _CLASSES[section]
  if name in known and known[name] is not cls:
    raise AssertionError(f"{section} {name!r} is registered twice")
  known[name] = cls


def load_plugins() -> None:
  """Imports every package declared under the `jaxrec.plugins` entry
  points (jaxrec's own backbones, heads and methods, and outside ones),
  once; each registers what it defines. A checkout that was not installed
  declares none: then this says how to install it."""
  global _plugins_loaded
  if _plugins_loaded:
    return
  _plugins_loaded = True
  found = importlib.metadata.entry_points(group=PLUGIN_GROUP)
  if not found:
    raise JaxrecError(f"no {PLUGIN_GROUP} entry points: jaxrec is not "
                      "installed (pip install -e . in its checkout)")
  for entry in found:
    entry.load()


def class_names(section: str) -> tuple[str, ...]:
  load_plugins()
  return tuple(_CLASSES[section])


def config_class(section: str, name: str, option_name: str) -> type:
  """The registered config class; a one-line error names the option."""
  known = _CLASSES[section]
  if name not in known:
    load_plugins()
  if name not in known:
    raise JaxrecError(f"{option_name}={name!r}: expected one of "
                      f"{list(known)}")
  return known[name]


def model_config_class(name: str) -> type:
  return config_class("model", name, "model.name")


def head_config_class(name: str) -> type:
  return config_class("head", name, "head.name")


def method_config_class(name: str) -> type:
  return config_class("methods", name, "methods")


def _default_model() -> BackboneConfig:
  return model_config_class(BackboneConfig.name)()


def _default_head() -> HeadConfig:
  return head_config_class(HeadConfig.name)()


SECTIONS = ("model", "head", "methods", "data", "train")
# Sections whose class is chosen by their `name` field.
NAMED_SECTIONS = {"model": model_config_class, "head": head_config_class}
FIXED_SECTIONS = {"data": DataConfig, "train": TrainConfig}


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole run's config. `methods` is a tuple of MethodConfigs in phase
  order (hashable, so a Config can be a static jit argument)."""
  model: Any = dataclasses.field(default_factory=_default_model)
  head: Any = dataclasses.field(default_factory=_default_head)
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  methods: tuple[Any, ...] = ()

  def __post_init__(self):
    ordered = tuple(sorted(self.methods, key=lambda m: (m.PHASE, m.NAME)))
    object.__setattr__(self, "methods", ordered)

  def method(self, name: str) -> Any:
    """The active method `name`'s config, or None."""
    for m in self.methods:
      if m.NAME == name:
        return m
    return None

  def with_method(self, method: MethodConfig) -> "Config":
    """This config with `method` active (replacing its earlier options)."""
    return self.replace(methods=tuple(
        m for m in self.methods if m.NAME != method.NAME) + (method,))

  def without_method(self, name: str) -> "Config":
    return self.replace(methods=tuple(m for m in self.methods
                                      if m.NAME != name))

  def validate(self) -> "Config":
    for name in ("model", "head", "data", "train"):
      require_finite(getattr(self, name), name)
      getattr(self, name).validate()
    self.head.check_train(self.train)
    self.head.check_model(self.model)
    self.validate_methods()
    tied = getattr(self.head, "tie_embeddings", False)
    if self.model.embedding == "adaptive" and tied:
      raise JaxrecError("head.tie_embeddings=True: needs model.embedding="
                        "'full' (an adaptive embedding has no [V, C] table "
                        "to tie)")
    if tied and self.model.item_width() != self.model.embed_dim:
      raise JaxrecError(
          f"head.tie_embeddings=True: model {self.model.name!r} has item "
          f"rows of width {self.model.item_width()} and hidden width "
          f"{self.model.embed_dim}, so the item table cannot be the output "
          "layer; leave the head untied")
    return self

  def validate_methods(self) -> None:
    """Each method's options, the capabilities it needs from the backbone,
    and exclusive claims: one line naming method, capability and backbone."""
    has = self.model.capabilities()
    claimed: dict[str, str] = {}
    taken: dict[str, Any] = {}  # Capability -> the method that took it.
    for m in self.methods:
      require_finite(m, f"methods.{m.NAME}")
      m.validate()
      missing = sorted(m.requires(self) - has)
      if missing:
        by = [taken[c] for c in missing if c in taken]
        hint = (f": {by[0].removal_hint()}" if by
                else _capability_hint(self.model, missing))
        raise JaxrecError(
            f"methods.{m.NAME}: backbone {self.model.name!r} (so "
            f"configured) lacks {', '.join(missing)}{hint}")
      for c in m.removes(self):
        taken[c] = m
      has = has - m.removes(self)
      for feature in m.CLAIMS:
        if feature in claimed:
          raise JaxrecError(f"methods.{m.NAME} and methods."
                            f"{claimed[feature]} both claim {feature}; "
                            "use one of them")
        claimed[feature] = m.NAME
      m.check(self)

  def uses_bands(self) -> bool:
    """Whether the model or the head is built on frequency bands."""
    return (self.model.embedding == "adaptive"
            or getattr(self.head, "uses_bands", False))

  def fit_data(self, num_items: int, max_len: int,
               item_counts: Any = None, num_users: int | None = None
               ) -> "Config":
    """The sizes the data fixes, and the band cutoffs its training counts
    give (when bands are used and no cutoffs were set); with `num_users`
    (SequenceData.num_users) the user table's too."""
    model = self.model.fit_data(num_items, max_len)
    if num_users is not None:
      model = model.fit_users(num_users)
    cfg = self.replace(model=model)
    if cfg.uses_bands() and not model.band_cutoffs:
      if item_counts is None:
        raise JaxrecError("model.band_cutoffs: empty, and no training "
                          "counts to resolve band_shares from")
      model = dataclasses.replace(model, band_cutoffs=bands.cutoffs_from_counts(
          item_counts, model.num_bands, model.band_shares))
      cfg = cfg.replace(model=model)
    if cfg.uses_bands():
      model.validate_bands()
    return cfg

  def to_dict(self) -> dict[str, Any]:
    out: dict[str, Any] = {name: section_to_dict(getattr(self, name))
                           for name in SECTIONS if name != "methods"}
    out["methods"] = {m.NAME: {**section_to_dict(m), "version": m.VERSION}
                      for m in self.methods}
    out["version"] = CONFIG_VERSION
    return out

  def replace(self, **sections: Any) -> "Config":
    return dataclasses.replace(self, **sections)


def _capability_hint(model: Any, missing: list[str]) -> str:
  """What to change, where the backbone can say (`capability_hint`)."""
  text = model.capability_hint(missing)
  return f": {text}" if text else ""


def section_to_dict(section: Any) -> dict[str, Any]:
  """JSON-ready: tuples become lists."""
  return {k: list(v) if isinstance(v, tuple) else v
          for k, v in dataclasses.asdict(section).items()}


def section_class(section: str, values: dict[str, Any]) -> type:
  """The dataclass of a section, given its raw values (`name` picks it)."""
  if section in NAMED_SECTIONS:
    default = {"model": BackboneConfig.name, "head": HeadConfig.name}[section]
    return NAMED_SECTIONS[section](str(values.get("name", default)))
  return FIXED_SECTIONS[section]


def from_dict(raw: dict[str, Any], origin: str = "config") -> Config:
  """Builds a Config from nested dicts; unknown keys name `origin`.

  Dicts of older versions (1: jaxrec 0.1; 2: methods' options in `model`)
  are upgraded first.
  """
  if not isinstance(raw, dict):
    raise JaxrecError(f"{origin}: expected a mapping with sections "
                      f"{list(SECTIONS)}, got {type(raw).__name__}")
  raw = upgrade(raw, origin)
  unknown = set(raw) - set(SECTIONS) - {"version"}
  if unknown:
    raise JaxrecError(f"{origin}: unknown section(s) {sorted(unknown)}; "
                      f"expected {list(SECTIONS)}")
  parts = {}
  for name in SECTIONS:
    values = raw.get(name) or {}
    if not isinstance(values, dict):
      raise JaxrecError(f"{origin}: {name}: expected a mapping, got "
                        f"{values!r}")
    if name == "methods":
      parts[name] = methods_from_dict(values, f"{origin}: methods")
    else:
      parts[name] = section_from_dict(section_class(name, values), values,
                                      f"{origin}: {name}")
  return Config(**parts)


def methods_from_dict(raw: dict[str, Any], origin: str) -> tuple[Any, ...]:
  """`{name: {field: value, version: N}}` -> MethodConfigs; a method
  stored by a newer jaxrec is refused (its options could mean more)."""
  out = []
  for name, values in raw.items():
    cls = config_class("methods", str(name), origin)
    values = dict(values or {})
    if not isinstance(raw[name] or {}, dict):
      raise JaxrecError(f"{origin}.{name}: expected a mapping, got "
                        f"{raw[name]!r}")
    version = values.pop("version", cls.VERSION)
    if not isinstance(version, int) or version > cls.VERSION:
      raise JaxrecError(f"{origin}.{name}: version {version!r}; this jaxrec "
                        f"reads versions up to {cls.VERSION}")
    values = cls.upgrade(values, version)
    out.append(section_from_dict(cls, values, f"{origin}.{name}"))
  return tuple(out)


def upgrade(raw: dict[str, Any], origin: str) -> dict[str, Any]:
  """Brings an older config dict to CONFIG_VERSION (a file without a
  version is read as the current one)."""
  version = raw.get("version", CONFIG_VERSION)
  if version == CONFIG_VERSION:
    return raw
  if version not in (1, 2):
    raise JaxrecError(f"{origin}: config version {version!r}; this jaxrec "
                      f"reads versions 1 to {CONFIG_VERSION}")
  raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
  if version == 1:
    model = raw.setdefault("model", {})
    model["name"] = "nextitnet"
    raw["head"] = {"name": "softmax",
                   "tie_embeddings": bool(model.pop("tie_embeddings", False))}
  raw["methods"] = _methods_from_model(raw.setdefault("model", {}))
  raw["version"] = CONFIG_VERSION
  return raw


def _methods_from_model(model: dict[str, Any]) -> dict[str, Any]:
  """Version 2 -> 3: each registered method takes its old `model.*`
  fields (`LEGACY`) out of the model section; a method that was on keeps
  them as `methods.<name>`, one that was off drops them."""
  load_plugins()
  out = {}
  for name, cls in _CLASSES["methods"].items():
    active = cls.legacy_active(model)
    values = {new: model.pop(old) for old, new in cls.LEGACY.items()
              if old in model}
    if active:
      out[name] = values
  return out


def section_from_dict(cls: type, values: dict[str, Any], origin: str) -> Any:
  """One section, with each value coerced to its field's type."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs = {}
  for key, value in values.items():
    if key not in fields:
      raise JaxrecError(f"{origin}.{key}: unknown option; expected one of "
                        f"{sorted(fields)}")
    kwargs[key] = coerce(fields[key], value, f"{origin}.{key}")
  return cls(**kwargs)


_LIST_ITEM = {"tuple[int, ...]": int, "tuple[float, ...]": float,
              "tuple[str, ...]": str}


def coerce(field: dataclasses.Field, value: Any, origin: str) -> Any:
  """Converts a parsed value (or a flag string) to the field's declared type.

  The one reader of option values in jaxrec: config files, flags and
  `synthetic:` specs all come through here.
  """
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
      if isinstance(value, bool):
        raise ValueError(value)
      return int(value)
    if kind == "float":
      return float(value)
    if kind == "str":
      return str(value)
    if kind in _LIST_ITEM:
      if isinstance(value, str):
        # Path patterns contain '/', so string lists split on commas only.
        value = split_list(value, numbers=kind != "tuple[str, ...]")
      elif not isinstance(value, (list, tuple)):
        value = [value]
      return tuple(_LIST_ITEM[kind](v) for v in value)
  except (TypeError, ValueError):
    raise JaxrecError(f"{origin}: cannot read {value!r} as {kind}"
                      + (" (items separated by ',' or '/')"
                         if kind in _LIST_ITEM else "")) from None
  raise AssertionError(f"unhandled field type {kind}")


def split_list(text: str, numbers: bool = True) -> list[str]:
  """'1,4' / '1/4' / '1 4' -> ['1', '4'] (the one list syntax); a list of
  strings (`numbers=False`) splits on commas only: 'a/.*,b' -> ['a/.*', 'b']."""
  pattern = r"[,/\s]+" if numbers else r"\s*,\s*"
  return [v for v in re.split(pattern, text.strip()) if v]


def load_file(path: str) -> dict[str, Any]:
  """Reads a YAML or JSON config file into nested dicts."""
  if not os.path.isfile(path):
    raise JaxrecError(f"{path}: config file not found")
  try:
    with open(path, "rb") as f:
      text = f.read().decode("utf-8")
  except UnicodeDecodeError as e:
    line = e.object[:e.start].count(b"\n") + 1
    raise JaxrecError(f"{path}:{line}: not UTF-8 text (byte "
                      f"{e.object[e.start]:#04x})") from None
  except OSError as e:
    raise JaxrecError(f"{path}: cannot read the config file: "
                      f"{e.strerror}") from None
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


def require_finite(section: Any, name: str) -> None:
  """Refuses inf and NaN in every float option: `x > 0` accepts inf and a
  run then fails late, as 'NaN at step 0'."""
  for field in dataclasses.fields(section):
    value = getattr(section, field.name)
    if isinstance(value, float) and not math.isfinite(value):
      raise JaxrecError(f"{name}.{field.name}={value!r}: expected a finite "
                        "number")


def require(ok: bool, option_name: str, value: Any, expected: str) -> None:
  if not ok:
    raise JaxrecError(f"{option_name}={value!r}: expected {expected}")


def choice(option_name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise JaxrecError(f"{option_name}={value!r}: expected one of "
                      f"{list(choices)}")
