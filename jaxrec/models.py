"""NextItNet with the StackRec residual block, as pure Flax over plain dicts.

The parameter tree (`init_params(cfg, rng)`) is a plain nested dict:

  item_embedding/embedding   [V, C]      id 0 is padding (its input is zeroed)
  blocks/conv1/kernel        [L, k, C, C]  causal dilated conv, dilation d
  blocks/conv1/bias          [L, C]
  blocks/ln1/{scale,bias}    [L, C]
  blocks/conv2/{kernel,bias} [L, k, C, C], [L, C]   dilation 2d
  blocks/ln2/{scale,bias}    [L, C]
  blocks/alpha               [L]         only for residual="alpha"
  softmax/kernel             [V, C]      absent when tie_embeddings
  softmax/bias               [V]

Every leaf under `blocks` carries the leading block axis L, so growing a model
(StackRec) is a map over that axis, and the stack runs under `lax.scan`:
compile time stays flat in depth. Dilations are config, not params.

Block (official StackRec `nextitnet_residual_block_alpha`, post-norm):
  x -> conv(k, d) -> LayerNorm -> ReLU -> conv(k, 2d) -> LayerNorm -> ReLU
    -> x + alpha * h          (alpha: a learned scalar per block, init 0)
"""
from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec.config import ModelConfig

Params = dict[str, Any]

# The official TF code initialises weights with truncated_normal(stddev=0.02).
weight_init = nn.initializers.truncated_normal(stddev=0.02)


def causal_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                dilation: int) -> jax.Array:
  """Causal dilated 1-D conv as k shifted matmuls (4.5x XLA's conv on H100).

  x [B, T, Cin], kernel [k, Cin, Cout], bias [Cout] -> [B, T, Cout].
  Output t sees x[t - (k-1-j)*d] through tap j: left zero padding of (k-1)*d
  then a VALID conv, as the official code does.
  """
  k, t = kernel.shape[0], x.shape[1]
  pad = (k - 1) * dilation
  xp = jnp.pad(x, ((0, 0), (pad, 0), (0, 0)))
  out = None
  for j in range(k):
    tap = jnp.einsum("btc,cd->btd", xp[:, j * dilation:j * dilation + t],
                     kernel[j].astype(x.dtype))
    out = tap if out is None else out + tap
  return out + bias.astype(x.dtype)


def causal_conv_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                          dilation: int) -> jax.Array:
  """The same conv through `lax.conv_general_dilated`: the test oracle."""
  pad = (kernel.shape[0] - 1) * dilation
  out = jax.lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=(1,), padding=((pad, 0),),
      rhs_dilation=(dilation,), dimension_numbers=("NWC", "WIO", "NWC"))
  return out + bias.astype(x.dtype)


def layer_norm(x: jax.Array, p: Params, eps: float) -> jax.Array:
  """LayerNorm over channels, computed in float32 whatever the input dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return (x32 - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def residual_block(p: Params, x: jax.Array, dilation: int,
                   cfg: ModelConfig) -> jax.Array:
  """One block on the float32 residual stream x [B, T, C]."""
  dtype = jnp.dtype(cfg.dtype)
  h = causal_conv(x.astype(dtype), p["conv1"]["kernel"], p["conv1"]["bias"],
                  dilation)
  h = jax.nn.relu(layer_norm(h, p["ln1"], cfg.layer_norm_eps))
  h = causal_conv(h.astype(dtype), p["conv2"]["kernel"], p["conv2"]["bias"],
                  2 * dilation)
  h = jax.nn.relu(layer_norm(h, p["ln2"], cfg.layer_norm_eps))
  if cfg.residual == "alpha":
    return x + p["alpha"] * h
  return x + h


def dilation_period(dilations: tuple[int, ...]) -> int:
  """Smallest p dividing len(dilations) with dilations[i] == dilations[i % p].

  The stack is scanned over groups of p blocks, each group unrolled with
  static dilations, so every shift in `causal_conv` stays static.
  """
  n = len(dilations)
  for p in range(1, n + 1):
    if n % p == 0 and all(dilations[i] == dilations[i % p] for i in range(n)):
      return p
  return n


def apply_blocks(blocks: Params, x: jax.Array, cfg: ModelConfig,
                 scan: bool = True) -> jax.Array:
  """Runs the residual stack: `lax.scan` over groups of one dilation period.

  With `scan=False` the blocks are unrolled in Python (the test oracle).
  """
  dilations = cfg.block_dilations()
  if not scan:
    for i, d in enumerate(dilations):
      x = residual_block(jax.tree.map(lambda a, i=i: a[i], blocks), x, d, cfg)
    return x
  period = dilation_period(dilations)
  groups = jax.tree.map(
      lambda a: a.reshape((-1, period) + a.shape[1:]), blocks)

  def group_step(x, group):
    for j in range(period):
      x = residual_block(jax.tree.map(lambda a, j=j: a[j], group), x,
                         dilations[j], cfg)
    return x, None

  x, _ = jax.lax.scan(group_step, x, groups)
  return x


def init_block_stack(rng: jax.Array, cfg: ModelConfig) -> Params:
  """Fresh params for all L blocks, each with its own random kernels."""
  c, k = cfg.embed_dim, cfg.kernel_size

  def one_block(key):
    k1, k2 = jax.random.split(key)
    block = {
        "conv1": {"kernel": weight_init(k1, (k, c, c)),
                  "bias": jnp.zeros((c,))},
        "ln1": {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))},
        "conv2": {"kernel": weight_init(k2, (k, c, c)),
                  "bias": jnp.zeros((c,))},
        "ln2": {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))},
    }
    if cfg.residual == "alpha":
      block["alpha"] = jnp.zeros(())  # Each new block starts as the identity.
    return block

  return jax.vmap(one_block)(jax.random.split(rng, cfg.num_blocks))


class ResidualStack(nn.Module):
  """All residual blocks; every param has a leading block axis."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    blocks = self.param("stack", lambda rng: init_block_stack(rng, self.config))
    return apply_blocks(blocks, x, self.config)


class NextItNet(nn.Module):
  """Item ids [B, T] -> hidden states [B, T, C] (float32 residual stream).

  The output layer's params are created here too; `output_layer(params, cfg)`
  hands them to the loss, which never needs full [B*T, V] logits.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    cfg = self.config
    embedding = self.param("item_embedding", lambda rng: {
        "embedding": weight_init(rng, (cfg.num_items, cfg.embed_dim))})
    self.param("softmax", lambda rng: init_output_layer(rng, cfg))
    x = embedding["embedding"][inputs]
    # Zeroing padding makes a left-padded sequence see exactly the causal
    # conv's own zero padding at the bottom of the stack.
    x = x * (inputs != 0)[..., None]
    return ResidualStack(cfg, name="blocks")(x)


def init_output_layer(rng: jax.Array, cfg: ModelConfig) -> Params:
  out = {"bias": jnp.zeros((cfg.num_items,))}
  if not cfg.tie_embeddings:
    out["kernel"] = weight_init(rng, (cfg.num_items, cfg.embed_dim))
  return out


def init_params(cfg: ModelConfig, rng: jax.Array) -> Params:
  """A fresh plain-dict param tree (see the module docstring)."""
  cfg.validate()
  if cfg.num_items < 2:
    raise ValueError(f"model.num_items={cfg.num_items}: set it from the data")
  dummy = jnp.zeros((1, 1), jnp.int32)
  variables = NextItNet(cfg).init(rng, dummy)
  params = unwrap(variables["params"])
  return params


def unwrap(params: Params) -> Params:
  """Flattens linen's param-holder nesting into the documented tree."""
  return {
      "item_embedding": params["item_embedding"],
      "blocks": params["blocks"]["stack"],
      "softmax": params["softmax"],
  }


def wrap(params: Params) -> Params:
  return {"params": {
      "item_embedding": params["item_embedding"],
      "blocks": {"stack": params["blocks"]},
      "softmax": params["softmax"],
  }}


def hidden_states(params: Params, cfg: ModelConfig,
                  inputs: jax.Array) -> jax.Array:
  """Pure apply: ids [B, T] -> hidden states [B, T, C] in float32."""
  return NextItNet(cfg).apply(wrap(params), inputs)


def output_layer(params: Params, cfg: ModelConfig) -> tuple[jax.Array,
                                                             jax.Array]:
  """The softmax weights [V, C] and bias [V] (tied: the item embedding)."""
  w = (params["item_embedding"]["embedding"] if cfg.tie_embeddings
       else params["softmax"]["kernel"])
  return w, params["softmax"]["bias"]


def check_params(params: Params, cfg: ModelConfig) -> None:
  """Asserts the tree has exactly the shapes `cfg` implies.

  Guards a restore or a grow against silently pairing params with the wrong
  config (another depth, width, catalogue or output layer).
  """
  expected = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  chex.assert_trees_all_equal_shapes(params, expected)


def count_params(tree: Params) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))
