"""Logical sharding rules: which param leaves are split by rows over `model`.

A run's mesh has two axes (`jaxrec.training.mesh`): `data` splits the
batch, `model` splits the item-sized tables by rows. Which leaves are
item-sized is decided here, once, by path (MaxText-style logical rules):
every other leaf (the blocks, projections, norms) is replicated. The same
rules shard the optimizer state, whose leaves end in the param paths they
mirror (`0/mu/head/kernel`), so Adam's moments of a table live with its
rows and are never replicated.

Heads read the mesh the loop traces under (`model_shards`): with more than
one `model` shard the chunked softmax and full-ranking evaluation run under
`shard_map`, each shard scanning its own rows.
"""
from __future__ import annotations

import re
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from jaxrec.errors import JaxrecError

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)

# (regex searched at the end of a leaf path 'a/b/c', spec, required);
# first match wins. Rows of every item- or class-sized table go to `model`.
# A required table whose rows do not split over `model` is an error; the
# band-structured tables of CpRec (adaptive embedding, tree softmax), whose
# sizes follow the frequency bands, are split when their rows divide and
# otherwise stay replicated (they are the compressed, small ones; choose
# `--band-cutoffs` that the model size divides to split them all).
ROW_SHARDED_RULES: tuple[tuple[str, P, bool], ...] = (
    # Item embedding: full table, or each band of the adaptive one.
    (r"(^|/)item_embedding/embedding$", P(MODEL, None), True),
    (r"(^|/)item_embedding/band_\d+/embedding$", P(MODEL, None), False),
    # Softmax head (untied), the sampled softmax reads the same leaves.
    (r"(^|/)head/kernel$", P(MODEL, None), True),
    (r"(^|/)head/bias$", P(MODEL), True),
    # Tree softmax: the head cluster and every tail band's table.
    (r"(^|/)head/head_kernel$", P(MODEL, None), False),
    (r"(^|/)head/head_bias$", P(MODEL), False),
    (r"(^|/)head/band_\d+/kernel$", P(MODEL, None), False),
    (r"(^|/)head/band_\d+/bias$", P(MODEL), False),
)
_COMPILED = tuple((re.compile(p), spec, required)
                  for p, spec, required in ROW_SHARDED_RULES)

# jax >= 0.7 spells it jax.shard_map (check_vma); older releases only had
# jax.experimental.shard_map.shard_map (check_rep).
if hasattr(jax, "shard_map"):
  def shard_map(f, *, in_specs, out_specs, mesh=None):
    kwargs = {} if mesh is None else {"mesh": mesh}
    return jax.shard_map(f, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False, **kwargs)
else:  # pragma: no cover - older jax
  from jax.experimental.shard_map import shard_map as _legacy_shard_map

  def shard_map(f, *, in_specs, out_specs, mesh=None):
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    return _legacy_shard_map(f, mesh, in_specs=in_specs,
                             out_specs=out_specs, check_rep=False)


def path_name(path: tuple) -> str:
  """A key path as 'a/b/c' (dict keys, namedtuple fields, list indices)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(
      k, "idx", k)))) for k in path)


def rule_for(name: str, ndim: int) -> tuple[P, bool]:
  """(PartitionSpec, required) of a leaf named `name` (its 'a/b/c' path);
  (P(), False) for a replicated one."""
  for pattern, spec, required in _COMPILED:
    if pattern.search(name) and ndim == len(spec):
      return spec, required
  return P(), False


def spec_for(name: str, ndim: int) -> P:
  """The PartitionSpec a leaf named `name` gets when its rows divide."""
  return rule_for(name, ndim)[0]


def specs(tree: Any, model: int = 2, option: str = "--mesh") -> Any:
  """PartitionSpecs of every leaf of `tree` (params, an optimizer state or
  a whole train state; arrays or ShapeDtypeStructs).

  With `model` > 1 a required row-split leaf whose rows do not split
  evenly is refused in one line naming `option`: shard_map and
  NamedSharding need equal shards, and a silently replicated item table is
  the memory blow-up the mesh exists to avoid."""
  refused: list[tuple[str, int]] = []

  def one(path, leaf):
    name = path_name(path)
    spec, required = rule_for(name, getattr(leaf, "ndim", 0))
    if spec == P() or model <= 1:
      return P()
    rows = leaf.shape[0]
    if rows % model == 0:
      return spec
    if required:
      refused.append((name, rows))
    return P()

  out = jax.tree_util.tree_map_with_path(one, tree)
  if refused:
    # Name a param rather than its Adam moment when both are refused.
    name, rows = min(refused, key=lambda r: "params" not in r[0].split("/"))
    raise JaxrecError(
        f"{option}: {name} has {rows} rows, not a multiple of model="
        f"{model}; pick a model size that divides it (or a catalogue "
        "size that the model size divides)")
  return out


def model_shards() -> int:
  """`model` shards of the mesh being traced under (1 outside a mesh, or
  on a mesh without a `model` axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or MODEL not in mesh.axis_names:
    return 1
  return int(mesh.shape[MODEL])
