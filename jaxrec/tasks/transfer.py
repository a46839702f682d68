"""PeterRec's downstream tasks: a user's source sequence -> one of the
head's outputs (cold start: target-domain items; profile: classes).

Data come from `jaxrec.data.transfer` (rows: the input, then the target).
The user representation is the hidden state at the last position, where
the CLS token sits (causal backbone), or `h[first CLS] + h[last]` with CLS
at both ends (bidirectional backbone). The loss is the head's full softmax
over its outputs (`head.num_classes`); evaluation ranks the target among
every output (full ranking; `accuracy` is the share ranked first, the
profile task's measure over all classes).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import heads, method_api, models
from jaxrec.data import sequences
from jaxrec.data import transfer as transfer_data
from jaxrec.data import vocabulary
from jaxrec.tasks import next_item
from jaxrec.training import optim

NAME = "transfer"


def batch(data: sequences.SequenceData, step: int, batch_size: int,
          seed: int) -> dict[str, np.ndarray]:
  """The batch of `step` (a pure function of seed and step): inputs and
  one target per row."""
  rows = sequences.train_batch(data.train, step, batch_size, seed)
  return {"inputs": rows["inputs"], "targets": rows["targets"][:, -1]}


def user_representation(params: models.Params, cfg: Any, inputs: jax.Array,
                        users: jax.Array | None = None) -> jax.Array:
  """[B, C]: h at the last slot (CLS), plus h at the first CLS when the
  backbone is bidirectional. A fine-tuning's rows are target-domain users
  the backbone never saw, so `users` are not read."""
  del users
  return read_user(models.hidden_states(params, cfg, inputs), cfg, inputs)


represent = user_representation


def read_user(h: jax.Array, cfg: Any, inputs: jax.Array) -> jax.Array:
  """The representation out of hidden states h [B, T, C]."""
  out = h[:, -1]
  if not cfg.model.is_causal():
    first = jnp.argmax(inputs == cfg.model.token_id("cls"), axis=1)
    out = out + jnp.take_along_axis(h, first[:, None, None], axis=1)[:, 0]
  return out.astype(cfg.model.dtype)


def loss_parts(params: models.Params, cfg: Any,
               batch_arrays: dict[str, jax.Array], rng: jax.Array,
               sampler: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mean cross entropy of each user's target over the head's outputs
  plus the methods' terms, those terms by `NAME/term`)."""
  k_model, k_head = jax.random.split(rng)
  h, aux = models.forward(params, cfg, batch_arrays["inputs"], train=True,
                          rng=k_model)
  targets = batch_arrays["targets"]
  ce = heads.get(cfg.head.name).loss(
      params, cfg, read_user(h, cfg, batch_arrays["inputs"]), targets,
      targets != 0, rng=k_head, sampler=sampler)
  terms = method_api.loss_terms(params, cfg, aux, batch_arrays)
  return ce + method_api.total_extra_loss(terms), terms


def loss(params: models.Params, cfg: Any, batch_arrays: dict[str, jax.Array],
         rng: jax.Array, sampler: Any = None) -> jax.Array:
  """The training loss of `loss_parts`, alone."""
  return loss_parts(params, cfg, batch_arrays, rng, sampler)[0]


def rank_fn(cfg: Any) -> Callable[..., jax.Array]:
  return next_item.rank_fn(cfg, user_representation)


def sampled_rank_fn(cfg: Any) -> Callable[..., jax.Array]:
  return next_item.sampled_rank_fn(cfg, user_representation)


sampler_for = next_item.sampler_for


def report(params: models.Params, cfg: Any,
           data: sequences.SequenceData) -> dict[str, Any]:
  """What metrics.json adds for a fine-tuning: parameter counts (PeterRec's
  claim is about them) and the source ids the vocabulary did not know."""
  return {**param_counts(params, cfg), "task": cfg.train.task,
          "unknown_source_tokens": data.meta["unknown_source_tokens"]}


def param_counts(params: models.Params, cfg: Any) -> dict[str, int]:
  """`trainable_params` (rows of partly trained stacks counted as trained)
  and `backbone_params` (item embedding + the backbone's block stacks;
  methods' subtrees, such as patches, excluded)."""
  labels = optim.trainable_labels(params, cfg.train.freeze)
  stacks = models.get(cfg.model.name).surgery.stacks
  masks = optim.row_masks(params, stacks, cfg.train.train_top_blocks)
  trainable = backbone = 0
  for (path, leaf), label in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(labels)):
    name = optim.path_name(path)
    size = int(np.prod(leaf.shape))
    if label == optim.TRAIN:
      mask = masks.get(name)
      trainable += size if mask is None else size // len(mask) * int(
          mask.sum())
    if name.split("/")[0] in ("item_embedding", *stacks):
      backbone += size
  return {"trainable_params": trainable, "backbone_params": backbone}


def load_task_data(cfg: Any, run_dir: str) -> Any:
  """A fine-tuning run's downstream data, read as when it trained (through
  the pretraining vocabulary the run keeps in DIR/vocabulary.json)."""
  _, _, path = cfg.data.source.partition(":")
  return transfer_data.load(
      path, cfg.train.task, vocabulary.of_run(run_dir), cfg.data,
      cfg.data.max_len, cfg.model.is_causal(), cfg.model.token_id("cls"),
      cfg.model.token_id("unk"))
