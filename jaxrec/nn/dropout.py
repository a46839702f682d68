"""Training-time dropout keys for a scanned stack."""
from __future__ import annotations

import flax.linen as nn
import jax


def input_dropout(x: jax.Array, rate: float, rng: jax.Array,
                  depth: int) -> tuple[jax.Array, jax.Array]:
  """Drops from the stack's input and returns one key per run position
  (scanned with the blocks, so every block, shared or not, draws its own
  masks): (dropped x, keys [depth])."""
  k_input, k_blocks = jax.random.split(rng)
  x = nn.Dropout(rate).apply({}, x, deterministic=False,
                             rngs={"dropout": k_input})
  return x, jax.random.split(k_blocks, depth)
