"""What a surgery did to a param tree, leaf by leaf (`growth.diff`).

Compares the tree before (`shallow`) and after (`deep`) by value, so it
needs no record of the surgery and works for any of them (growth, a new
head, untying, a grown catalogue). Each leaf of the result is one of:

  re-used  carried over unchanged (same shape, same values)
  copied   a block stack whose every row is a copy of some source row
           (the rows' sources are listed: StackRec's index map, read back)
  reset    set to a constant (LayerNorm scale 1 / bias 0, a gate alpha 0)
  fresh    new values: drawn anew, resized, or a subtree the source lacks
  mixed    a block stack whose rows differ in kind (e.g. random_top: the
           bottom rows copied, the top ones fresh; preserve: every
           duplicate's alpha reset to 0), with the count per kind

Block stacks (leaves with a leading block axis) are those the backbone's
surgery rules name (`blocks` by default); their rows are compared one by
one.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxrec import models
from jaxrec.training.optim import path_name


@dataclasses.dataclass(frozen=True)
class LeafDiff:
  """One leaf: its path, shapes before / after, kind, and per-row detail."""
  path: str
  before: tuple[int, ...] | None  # None: the source has no such leaf.
  after: tuple[int, ...]
  kind: str  # re-used | copied | reset | fresh | mixed
  detail: str = ""  # Block stacks: row sources, or counts per kind.


class Diff(list):
  """A list of `LeafDiff`, printed as a table."""

  def counts(self) -> dict[str, int]:
    """Leaves per kind."""
    out: dict[str, int] = {}
    for row in self:
      out[row.kind] = out.get(row.kind, 0) + 1
    return out

  def table(self) -> str:
    width = max([len(r.path) for r in self] + [4]) + 2
    lines = [f"{'leaf':<{width}}{'before':<18}{'after':<18}{'kind':<10}"
             "detail"]
    for r in self:
      before = "-" if r.before is None else str(r.before)
      lines.append(f"{r.path:<{width}}{before:<18}{str(r.after):<18}"
                   f"{r.kind:<10}{r.detail}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def diff(shallow: Any, deep: Any, cfg: Any = None) -> Diff:
  """Per-leaf kinds of `deep` relative to `shallow` (see module doc).

  `cfg` (either model's Config) names the block stacks through its
  backbone's surgery rules; without it, `blocks` is the stack."""
  stacks = (models.get(cfg.model.name).surgery.stacks if cfg is not None
            else ("blocks",))
  before = {path_name(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(shallow)}
  out = Diff()
  for p, leaf in jax.tree_util.tree_leaves_with_path(deep):
    name, new = path_name(p), np.asarray(leaf)
    old = before.get(name)
    stacked = name.split("/")[0] in stacks
    if old is None:
      out.append(LeafDiff(name, None, new.shape, "fresh", "not in source"))
    elif stacked and old.ndim == new.ndim and old.shape[1:] == new.shape[1:]:
      out.append(_stack_diff(name, old, new))
    elif old.shape != new.shape:
      out.append(LeafDiff(name, old.shape, new.shape, "fresh", "resized"))
    elif np.array_equal(old, new):
      out.append(LeafDiff(name, old.shape, new.shape, "re-used"))
    else:
      kind = "reset" if _constant(new) else "fresh"
      out.append(LeafDiff(name, old.shape, new.shape, kind,
                          f"= {new.flat[0]:g}" if kind == "reset" else ""))
  return out


def _constant(x: np.ndarray) -> bool:
  return x.size > 0 and bool(np.all(x == x.flat[0]))


def _stack_diff(name: str, old: np.ndarray, new: np.ndarray) -> LeafDiff:
  """Row by row: the source row each deep row copies, else reset/fresh."""
  sources, kinds = [], []
  for row in new:
    match = next((j for j, src in enumerate(old)
                  if np.array_equal(row, src)), None)
    if match is not None:
      sources.append(str(match))
      kinds.append("copied")
    else:
      kind = "reset" if _constant(row) else "fresh"
      sources.append("r" if kind == "reset" else "f")
      kinds.append(kind)
  distinct = sorted(set(kinds))
  if distinct == ["copied"] and new.shape == old.shape and np.array_equal(
      old, new):
    return LeafDiff(name, old.shape, new.shape, "re-used")
  kind = distinct[0] if len(distinct) == 1 else "mixed"
  detail = "rows <- " + ",".join(sources)
  if kind == "mixed":
    detail += " (" + ", ".join(f"{kinds.count(k)} {k}"
                               for k in distinct) + ")"
  return LeafDiff(name, old.shape, new.shape, kind, detail)
