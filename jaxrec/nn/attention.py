"""Causal multi-head self-attention over a left-padded sequence.

`CausalSelfAttention` is `flax.linen.MultiHeadDotProductAttention` (a
well-kept library layer: projections, head splitting, masking and attention
dropout are flax's) with the mask SASRec needs and the official code's
defaults. It subclasses rather than wraps, as flax's own `SelfAttention`
does, so its params sit directly under the module's name:

  query/{kernel,bias}   [C, H, C/H], [H, C/H]
  key/{kernel,bias}     [C, H, C/H], [H, C/H]
  value/{kernel,bias}   [C, H, C/H], [H, C/H]
  out/{kernel,bias}     [H, C/H, C], [C]
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# The authors' TF code projects Q, K, V with `tf.layers.dense` and the
# feed-forward with `tf.layers.conv1d`: both default to Glorot uniform.
dense_init = nn.initializers.xavier_uniform()


def causal_padding_mask(key_is_real: jax.Array) -> jax.Array:
  """[B, T] bool -> [B, 1, T, T]: query t may see key s iff s <= t and key
  s is a real item (not padding)."""
  t = key_is_real.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  return causal[None, None] & key_is_real[:, None, None, :]


class CausalSelfAttention(nn.MultiHeadDotProductAttention):
  """Each position attends to itself and earlier real positions.

  Fields used: `num_heads`; `dropout_rate` (on the attention weights, from
  the 'dropout' rng collection or a `dropout_rng` argument); `dtype`, the
  compute dtype of the projections and both attention matmuls (params stay
  float32). The rest are flax's, with the defaults below.
  """
  dtype: Any = "float32"
  param_dtype: Any = jnp.float32
  # The official code drops each weight independently (per sequence and
  # head), not flax's default of one mask shared by the whole batch.
  broadcast_dropout: bool = False
  kernel_init: Any = dense_init

  @nn.compact
  def __call__(  # pylint: disable=arguments-differ
      self, queries: jax.Array, keys_values: jax.Array,
      key_is_real: jax.Array, *, deterministic: bool,
      dropout_rng: jax.Array | None = None) -> jax.Array:
    """queries, keys_values [B, T, C]; key_is_real [B, T] -> [B, T, C]."""
    mask = causal_padding_mask(key_is_real)
    # A query with no visible key (padding before the first item) would
    # softmax over nothing. Flax happens to give a uniform average there (it
    # masks with finfo.min, not -inf), but the answer should not hang on a
    # library constant: such rows see every key, so their softmax is over
    # finite logits whatever the masking value, and they return zeros.
    has_key = mask.any(-1, keepdims=True)  # [B, 1, T, 1]
    out = super().__call__(queries, keys_values, keys_values,
                           mask=mask | ~has_key, deterministic=deterministic,
                           dropout_rng=dropout_rng)
    return jnp.where(has_key[:, 0], out, jnp.zeros((), out.dtype))


class ConcatHeadsSelfAttention(nn.Module):
  """`CausalSelfAttention` without the output projection: the heads'
  outputs are concatenated, as the SASRec authors' TF code does (its
  `multihead_attention` has no W^O). Same param names for q, k and v."""
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = "float32"
  kernel_init: Any = dense_init

  @nn.compact
  def __call__(self, queries: jax.Array, keys_values: jax.Array,
               key_is_real: jax.Array, *, deterministic: bool) -> jax.Array:
    c = queries.shape[-1]
    head_dim = c // self.num_heads

    def project(name, x):
      return nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                             param_dtype=jnp.float32,
                             kernel_init=self.kernel_init, name=name)(x)

    q = project("query", queries)
    k, v = project("key", keys_values), project("value", keys_values)
    mask = causal_padding_mask(key_is_real)
    has_key = mask.any(-1, keepdims=True)
    dropout_rng = None
    if not deterministic and self.dropout_rate > 0:
      dropout_rng = self.make_rng("dropout")
    out = nn.dot_product_attention(
        q, k, v, mask=mask | ~has_key, dropout_rng=dropout_rng,
        dropout_rate=self.dropout_rate, broadcast_dropout=False,
        deterministic=deterministic, dtype=self.dtype)
    # [B, T, 1, 1]: a query with no visible key returns zeros (see above).
    out = jnp.where(has_key[:, 0][..., None], out, jnp.zeros((), out.dtype))
    return out.reshape(*out.shape[:-2], c)
