"""Catalogues that grow: move a model's item rows to a new vocabulary.

`train --init-from RUN --data NEW` numbers NEW's items with RUN's
vocabulary (`jaxrec.data.pipeline.build_sequences`): known raw ids keep
their ids, new items come after them, vanished items keep their ids or
(`--vanished drop`) are removed and the rest closed up. `remap_items`
moves the params to that numbering: every item-indexed leaf (the item
embedding, the output layer, a SkipRec policy's embedding) takes its old
row for a known raw id and the row a fresh init gives for a new one.

Which leaves are item-indexed is not a list of names: it is read off the
model config (the leaves whose shape changes with `model.num_items`), so a
new backbone or head is handled without touching this file. Models built
on frequency bands (adaptive embedding, tree softmax) are refused: their
band layout follows the training-frequency ranks of the old numbering.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import models
from jaxrec.config import Config
from jaxrec.data.vocabulary import Vocabulary
from jaxrec.errors import JaxrecError


def item_axes(cfg: Config) -> Any:
  """Per leaf: the axis indexed by item id, or -1 (a tree like params;
  not None, which jax trees treat as an empty subtree)."""
  def with_items(n):
    return cfg.replace(model=dataclasses.replace(cfg.model, num_items=n))

  a = models.abstract_params(with_items(cfg.model.num_items))
  b = models.abstract_params(with_items(cfg.model.num_items + 1))

  def axis(x, y):
    differ = [i for i, (m, n) in enumerate(zip(x.shape, y.shape)) if m != n]
    return differ[0] if differ else -1

  return jax.tree.map(axis, a, b)


def old_ids_of(old: Vocabulary, new: Vocabulary) -> np.ndarray:
  """[V_new]: the old id of each new id's raw item (0: a new item; the
  padding id maps to itself)."""
  ids, _ = old.encode_items(new.items[1:].tolist())
  return np.r_[0, ids].astype(np.int32)


def check_growable(cfg: Config, origin: str) -> None:
  """Refuses models whose item layout depends on frequency ranks."""
  if cfg.uses_bands():
    raise JaxrecError(
        f"{origin}: its model uses frequency bands (embedding "
        f"{cfg.model.embedding!r}, head {cfg.head.name!r}) whose layout "
        "follows the old training-frequency ranks, so it cannot take a "
        "changed catalogue; train it from scratch on the new data")


def remap_items(params: models.Params, cfg: Config, old: Vocabulary,
                new: Vocabulary, rng: jax.Array
                ) -> tuple[models.Params, Config, dict[str, int]]:
  """(params, config, counts) for the numbering `new` (see module doc).

  `cfg` is the params' config (`old.num_items` item ids); fresh rows come
  from `models.init_params(new_cfg, rng)`, as a model trained from scratch
  on the new data would start. `counts`: rows kept, fresh and dropped.
  """
  check_growable(cfg, "--init-from")
  if cfg.model.num_items != old.num_items:
    raise JaxrecError(f"--init-from: the model has {cfg.model.num_items} "
                      f"item ids but its vocabulary {old.num_items}")
  new_cfg = cfg.replace(model=dataclasses.replace(
      cfg.model, num_items=new.num_items))
  fresh = models.init_params(new_cfg, rng)
  source = old_ids_of(old, new)
  keep = source > 0
  keep[0] = True  # Padding stays padding (zero rows stay zero).
  source_j, keep_j = jnp.asarray(source), jnp.asarray(keep)

  def move(leaf, fresh_leaf, axis):
    if axis < 0:
      return leaf
    rows = jnp.take(leaf, source_j, axis=axis)
    shape = [1] * leaf.ndim
    shape[axis] = len(source)
    return jnp.where(keep_j.reshape(shape), rows, fresh_leaf).astype(
        leaf.dtype)

  out = jax.tree.map(move, params, fresh, item_axes(cfg))
  models.require_fit(out, new_cfg, "the params remapped to the new "
                     "catalogue")
  kept = int(keep[1:].sum())
  counts = {"rows_kept": kept, "rows_fresh": int((~keep).sum()),
            "rows_dropped": old.num_items - 1 - kept}
  return out, new_cfg, counts
