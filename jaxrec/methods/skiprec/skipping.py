"""Really not computing skipped blocks (SkipRec at inference).

A gated block `x + gate * alpha * h(x)` with gate 0 still computes h(x):
masking saves nothing. Two ways to skip the work, each a wrapper of a
`scan_blocks` block function (`jaxrec.nn.stack.BlockFn`) whose per-position
input carries the gates [B] of that block:

- `conditional`: `lax.cond` runs the block only when some row keeps it; a
  block the whole batch skips costs one predicate. Pays off at batch 1 and
  when the policy skips a block for everyone.
- `compacted`: the rows that keep the block are gathered (stable order)
  into a prefix whose size is the smallest bucket holding them, the block
  runs on that prefix and the results are scattered back; `lax.switch`
  picks the bucket, so only one size runs. Rows of the prefix that skip
  carry gate 0 and come back unchanged, so the output equals the masked
  computation exactly.

Both are exact: every row's output equals the masked pass (tested).
`hidden_states(params, cfg, ids, mode)` runs a SkipRec model that way;
`compact` needs a backbone whose rows run apart (`row_local_blocks`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxrec import models
from jaxrec.errors import JaxrecError
from jaxrec.methods.skiprec.config import SkipRecConfig

NAME = SkipRecConfig.NAME
MODES = ("masked", "cond", "compact")
BlockFn = Callable[[Any, jax.Array, Any, Any], jax.Array]
GateOf = Callable[[Any], jax.Array]  # Per-position inputs -> gates [B].
WithGate = Callable[[Any, jax.Array], Any]  # Inputs with other gates.


def buckets_for(batch: int, smallest: int = 8) -> tuple[int, ...]:
  """Prefix sizes: powers of two from `smallest` below `batch`, then batch."""
  out, size = [], smallest
  while size < batch:
    out.append(size)
    size *= 2
  return tuple(out) + (batch,)


def conditional(block: BlockFn, gate_of: GateOf) -> BlockFn:
  """The block, run only when some row of the batch keeps it."""
  def run(params, x, static, inputs):
    keep_any = jnp.any(gate_of(inputs) != 0)
    return jax.lax.cond(keep_any,
                        lambda x: block(params, x, static, inputs),
                        lambda x: x, x)
  return run


def compacted(block: BlockFn, gate_of: GateOf, with_gate: WithGate,
              buckets: Sequence[int] | None = None) -> BlockFn:
  """The block run only on the rows that keep it, in a bucketed prefix."""
  def run(params, x, static, inputs):
    gate = gate_of(inputs)
    keep = gate != 0
    sizes = buckets_for(x.shape[0]) if buckets is None else tuple(buckets)
    order = jnp.argsort(~keep, stable=True)  # Keeping rows first.
    count = keep.sum()
    # Branch 0: nobody keeps the block; branch i > 0: bucket sizes[i - 1].
    index = jnp.where(count == 0, 0,
                      1 + jnp.searchsorted(jnp.asarray(sizes), count))

    def on_prefix(size):
      def f(x):
        rows = order[:size]
        out = block(params, x[rows], static, with_gate(inputs, gate[rows]))
        return x.at[rows].set(out)
      return f

    branches = [lambda x: x] + [on_prefix(s) for s in sizes]
    return jax.lax.switch(index, branches, x)
  return run


def wrap(block: BlockFn, mode: str, gate_of: GateOf,
         with_gate: WithGate) -> BlockFn:
  """The block for a skipping `mode` (masked: as is)."""
  if mode == "masked":
    return block
  if mode == "cond":
    return conditional(block, gate_of)
  if mode == "compact":
    return compacted(block, gate_of, with_gate)
  raise ValueError(f"skipping={mode!r}: expected one of {list(MODES)}")


def hidden_states(params: Any, cfg: Any, ids: jax.Array,
                  mode: str = "masked",
                  gates: jax.Array | None = None) -> jax.Array:
  """A SkipRec model's inference hidden states, skipping gated-off blocks
  by `mode` (masked computes them all; the outputs are equal). `gates`
  [L, B] replace the policy's argmax gates."""
  if mode not in MODES:
    raise JaxrecError(f"skipping={mode!r}: expected one of {list(MODES)}")
  if mode == "compact" and "row_local_blocks" not in (
      cfg.model.capabilities()):
    raise JaxrecError(f"skipping='compact': backbone {cfg.model.name!r} "
                      "lacks row_local_blocks: "
                      + cfg.model.capability_hint(["row_local_blocks"]))

  def gate_of(inputs):
    return inputs["side"][NAME]

  def with_gate(inputs, gate):
    return {**inputs, "side": {**inputs["side"], NAME: gate}}

  return models.hidden_states(
      params, cfg, ids, sides=None if gates is None else {NAME: gates},
      wrap=lambda block: wrap(block, mode, gate_of, with_gate))
