"""LayerNorm over channels, computed in float32 whatever the input dtype.

Not `flax.linen.LayerNorm`: that one's default fast variance (E[x^2] -
E[x]^2) loses precision in bfloat16 runs, and jaxrec's residual stream
stays float32 by contract, so the norm returns float32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
               eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + eps) * scale + bias


class LayerNorm(nn.Module):
  """Params `scale` [C] (init 1) and `bias` [C] (init 0); float32 output."""
  eps: float = 1e-8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return layer_norm(x, scale, bias, self.eps)
