"""The optimizer, built from trainable parts described as data.

Which leaves train is a label tree (`trainable_labels`): each leaf path
('blocks/conv1/kernel') matched against `train.freeze` regular expressions
is `frozen`, every other leaf `train` (big_vision's freezing by path
pattern). The optimizer is `optax.multi_transform` of Adam (AdamW with
weight decay; schedule and clipping as configured) on `train` and
`optax.set_to_zero()` on `frozen`, so frozen leaves hold no Adam moments.
The train step differentiates only the `train` part (`split`/`merge`):
frozen leaves get no gradient computed and are never written.

A label cannot split a stacked [L, ...] leaf, so "train only the top k
blocks" is a row mask over the block axis (`row_masks`): the step zeroes
those rows' gradients and updates (so weight decay cannot move them) and
keeps their values bit for bit.
"""
from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrec.config import TrainConfig
from jaxrec.errors import JaxrecError

TRAIN, FROZEN = "train", "frozen"


def path_name(path: tuple) -> str:
  """A key path as 'a/b/c'."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k)))
                  for k in path)


def trainable_labels(params: Any, freeze: tuple[str, ...]) -> Any:
  """A tree like `params` of 'train' / 'frozen' (regex fullmatch on paths)."""
  patterns = [re.compile(p) for p in freeze]
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: FROZEN if any(p.fullmatch(path_name(path))
                                    for p in patterns) else TRAIN, params)
  if freeze and TRAIN not in jax.tree.leaves(labels):
    raise JaxrecError(f"train.freeze={list(freeze)}: freezes every "
                      "parameter; nothing would train")
  return labels


DECAYED = ("kernel", "embedding")  # Leaf names weight decay acts on.


def decay_mask(params: Any) -> Any:
  """True for kernels and embeddings: weight decay leaves biases, norms and
  residual gates alone (decaying a LayerNorm scale or an alpha toward 0
  fights what they are for)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: path_name(path).rsplit("/", 1)[-1] in DECAYED, params)


def base_optimizer(tcfg: TrainConfig,
                   total_steps: int | None = None
                   ) -> optax.GradientTransformation:
  """Adam (AdamW with weight decay), optional schedule and clipping.

  `total_steps` is the schedule's horizon (the run's resolved length; by
  default `tcfg.steps`, at least 1).
  """
  horizon = max(1, total_steps or tcfg.steps)
  lr: Any = tcfg.learning_rate
  if tcfg.schedule == "cosine":
    lr = optax.cosine_decay_schedule(tcfg.learning_rate, horizon)
  elif tcfg.schedule == "warmup_cosine":
    lr = optax.warmup_cosine_decay_schedule(
        0.0, tcfg.learning_rate, tcfg.warmup_steps, horizon)
  opt = (optax.adamw(lr, weight_decay=tcfg.weight_decay, mask=decay_mask)
         if tcfg.weight_decay > 0 else optax.adam(lr))
  if tcfg.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(tcfg.clip_norm), opt)
  return opt


def make_optimizer(tcfg: TrainConfig, labels: Any,
                   total_steps: int | None = None
                   ) -> optax.GradientTransformation:
  """The base optimizer on 'train' leaves, set_to_zero on 'frozen' ones."""
  return optax.multi_transform(
      {TRAIN: base_optimizer(tcfg, total_steps),
       FROZEN: optax.set_to_zero()}, labels)


def split(params: Any, labels: Any) -> tuple[Any, Any]:
  """(trainable, frozen): two trees like params, None where the other is."""
  pick = lambda want: jax.tree.map(  # pylint: disable=unnecessary-lambda-assignment
      lambda p, label: p if label == want else None, params, labels)
  return pick(TRAIN), pick(FROZEN)


def merge(trainable: Any, frozen: Any, labels: Any) -> Any:
  """Inverse of `split`."""
  return jax.tree.map(lambda label, t, f: t if label == TRAIN else f,
                      labels, trainable, frozen,
                      is_leaf=lambda x: x is None)


def row_masks(params: Any, stacks: tuple[str, ...],
              top_blocks: int) -> dict[str, np.ndarray]:
  """{leaf path: bool [L]} for every leaf of a block stack: True on the top
  `top_blocks` rows (0: no masks, everything trains)."""
  if top_blocks <= 0:
    return {}
  masks = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = path_name(path)
    if any(name.startswith(stack + "/") for stack in stacks):
      depth = leaf.shape[0]
      if top_blocks > depth:
        raise JaxrecError(f"train.train_top_blocks={top_blocks}: the model "
                          f"has {depth} blocks")
      masks[name] = np.arange(depth) >= depth - top_blocks
  return masks


def mask_rows(tree: Any, masks: dict[str, np.ndarray]) -> Any:
  """Zeroes the masked-off block rows of every leaf named in `masks`."""
  if not masks:
    return tree

  def one(path, x):
    mask = masks.get(path_name(path))
    if mask is None or x is None:
      return x
    return jnp.where(mask.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)

  return jax.tree_util.tree_map_with_path(one, tree)


def apply_updates(params: Any, updates: Any, labels: Any,
                  masks: dict[str, np.ndarray]) -> Any:
  """params + updates on trainable leaves and rows; the rest kept as is
  (not `p + 0`, which would turn a -0.0 into 0.0)."""
  def one(path, p, u, label):
    if label == FROZEN:
      return p
    new = p + u.astype(p.dtype)
    mask = masks.get(path_name(path))
    if mask is None:
      return new
    return jnp.where(mask.reshape((-1,) + (1,) * (p.ndim - 1)), new, p)

  return jax.tree_util.tree_map_with_path(one, params, updates, labels)
