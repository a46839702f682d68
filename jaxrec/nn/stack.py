"""The only scan over blocks in jaxrec: `scan_blocks`.

A block stack is stored as one param tree whose every leaf has a leading
block axis (`stored`, made by vmapping a block's init). `scan_blocks` runs
it under `lax.scan`, so the program, and its compile time, stay the same
size at 8 or 128 blocks. Three things make one scan serve every method:

- `statics`: one hashable value per run position (a NextItNet dilation);
  positions are grouped by the smallest period p of `statics` and each
  scanned step unrolls one group of p blocks, so every static stays static.
- `source`: a static map from run position to stored block (identity by
  default). Sharing (CpRec: `i mod P`, `i // 2`) and stacking (StackRec)
  are such maps; untying a shared model is `jnp.take(stored, source)`.
- `xs`: per-position inputs, a tree whose leaves have a leading run axis
  (SkipRec's gates [L, B], dropout keys [L]).

`remat` rematerialises each group in the backward pass (`none`, `full`,
`dots`: keep matmul outputs), trading compute for activation memory.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, Any]
# block(params_i, x, static_i, xs_i) -> x: one block at one run position.
BlockFn = Callable[[Params, jax.Array, Any, Any], jax.Array]

REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: save nothing.
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def repeat_period(statics: Sequence[Hashable]) -> int:
  """Smallest p dividing len(statics) with statics[i] == statics[i % p]."""
  n = len(statics)
  for p in range(1, n + 1):
    if n % p == 0 and all(statics[i] == statics[i % p] for i in range(n)):
      return p
  return n


def stack_depth(stored: Params) -> int:
  """The number of stored blocks (the leading axis of every leaf)."""
  return int(jax.tree.leaves(stored)[0].shape[0])


def gather_blocks(stored: Params, source: Sequence[int]) -> Params:
  """Stored blocks gathered by a source map: run position i <- stored
  source[i]. Untying a shared stack, and StackRec's stacking, are this."""
  idx = np.asarray(source, np.int32)
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), stored)


def scan_blocks(block: BlockFn, stored: Params, x: jax.Array, *,
                statics: Sequence[Hashable],
                source: Sequence[int] | None = None, xs: Any = None,
                remat: str = "none", unroll: bool = False) -> jax.Array:
  """Runs len(statics) blocks on x: position i applies
  `block(stored[source[i]], x, statics[i], xs[i])`.

  Args:
    block: one block at one position (see `BlockFn`).
    stored: the block-axis param tree, leading axis = stored blocks.
    x: the residual stream, carried through every block.
    statics: one static per run position; its length is the run depth.
    source: run position -> stored block; None is the identity (then the
      stored depth must equal the run depth).
    xs: per-position inputs, leaves with a leading axis of the run depth;
      None passes None to every block.
    remat: "none", "full" or "dots" (see the module docstring).
    unroll: a Python loop instead of the scan (the test oracle).
  """
  depth = len(statics)
  stored_depth = stack_depth(stored)
  if source is None:
    if stored_depth != depth:
      raise ValueError(f"{stored_depth} stored blocks but {depth} run "
                       "positions and no source map")
  else:
    if len(source) != depth or not all(0 <= s < stored_depth
                                       for s in source):
      raise ValueError(f"source map {tuple(source)} must give each of "
                       f"{depth} positions a stored block in "
                       f"0..{stored_depth - 1}")
    stored = gather_blocks(stored, source)
  if remat not in ("none", *REMAT_POLICIES):
    raise ValueError(f"remat={remat!r}: expected none, "
                     f"{', '.join(REMAT_POLICIES)}")

  def at(tree, i):
    return None if tree is None else jax.tree.map(lambda a: a[i], tree)

  if unroll:
    for i in range(depth):
      x = block(at(stored, i), x, statics[i], at(xs, i))
    return x

  period = repeat_period(statics)

  def grouped(tree):
    return jax.tree.map(lambda a: a.reshape((-1, period) + a.shape[1:]),
                        tree)

  def group_step(x, group):
    params, inputs = group
    for j in range(period):
      x = block(at(params, j), x, statics[j], at(inputs, j))
    return x

  if remat != "none":
    group_step = jax.checkpoint(group_step, policy=REMAT_POLICIES[remat])
  x, _ = jax.lax.scan(lambda x, g: (group_step(x, g), None), x,
                      (grouped(stored), None if xs is None else grouped(xs)))
  return x
