"""Helpers shared by the softmax losses: flattening, masking, logits.

Every loss takes hidden states `h` [..., C] (compute dtype, maybe bfloat16),
an output layer `w` [V, C] and `b` [V] (float32 params), int targets [...]
and a float or bool `mask` [...], and returns the masked MEAN cross entropy
as a float32 scalar: sum over counted tokens / max(count, 1). Item id 0 is
padding and never a class: its logit is -inf in every softmax, and a token
whose target is 0 is never counted, whatever its mask says.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

F32 = jnp.float32


def flatten(h: jax.Array, targets: jax.Array,
            mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Flattens leading dims to tokens: h [N, C], targets [N], mask [N]."""
  if targets.shape != h.shape[:-1] or mask.shape != targets.shape:
    raise ValueError(f"shapes do not match: h {h.shape}, targets "
                     f"{targets.shape}, mask {mask.shape}; expected h "
                     "[..., C] and targets, mask [...]")
  c = h.shape[-1]
  return (h.reshape(-1, c), targets.reshape(-1).astype(jnp.int32),
          mask.reshape(-1))


def check_output_layer(h: jax.Array, w: jax.Array, b: jax.Array) -> None:
  if w.ndim != 2 or w.shape[1] != h.shape[-1] or b.shape != w.shape[:1]:
    raise ValueError(f"output layer shapes do not match: h {h.shape}, "
                     f"w {w.shape}, b {b.shape}; expected w [V, C], b [V]")
  if w.shape[0] < 2:
    raise ValueError(f"need V >= 2 (padding id 0 and one item), got {w.shape}")


def masked_mean(ce: jax.Array, targets: jax.Array,
                 mask: jax.Array) -> jax.Array:
  """Mean of per-token `ce` over counted tokens (mask and a real target)."""
  weight = mask.astype(F32) * (targets > 0)
  # where, not a product: an uncounted token's ce may be inf or nan.
  total = jnp.sum(jnp.where(weight > 0, ce * weight, 0.0))
  return total / jnp.maximum(jnp.sum(weight), 1.0)


def compute_dtype(h: jax.Array, logits_dtype: Any) -> np.dtype:
  return jnp.dtype(h.dtype if logits_dtype is None else logits_dtype)


def logits(h_c: jax.Array, w: jax.Array, b: jax.Array,
            cdt: np.dtype) -> jax.Array:
  """h_c [N, C] x w [T, C] -> float32 [N, T]: matmul in cdt, f32 accumulate."""
  out = jnp.einsum("nc,tc->nt", h_c, w.astype(cdt),
                   preferred_element_type=F32)
  return out + b.astype(F32)
