"""PeterRec's model patch (Yuan et al., SIGIR 2020): a bottleneck that
adapts a frozen pretrained block to a new task.

  P(z) = z + up(GELU(down(z)))     down [C, H], up [H, C], H = C/4 default

The patches are the method's own subtree, one per block and layer, with a
leading block axis, so they scan as side inputs of the block stack, grow
with it and freeze apart from it:

  peterrec/patch1/{down,up}/{kernel,bias}   [L, C, H], [L, H], [L, H, C], [L, C]
  peterrec/patch2/...                       (serial, parallel: one per layer)
  peterrec/patch/...                        (block_parallel)

Placements, at the backbone's slots (`jaxrec.method_api`):

  serial          layer_j(z) -> P_j(layer_j(z)) = out + branch_j(out)
  serial_top      only the second layer
  parallel        layer_j(z) + branch_j(z)
  block_parallel  x + h(x) + branch(x): beside the whole block (the
                  paper's fully parallel placement, reported poor)

`up` starts at zero (kernel and bias), so a freshly patched network
computes exactly what the pretrained one did and fine-tuning starts from
the pretrained function (the official code draws both from N(0, 0.02), so
its patched net starts perturbed). GELU is the tanh form, as the official
`get_mp`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxrec.methods.peterrec.config import PeterRecConfig
from jaxrec.nn.conv import weight_init

NAME = PeterRecConfig.NAME
Params = dict[str, Any]


def init_patch(rng: jax.Array, width: int, hidden: int) -> Params:
  """One block's patch: `down` drawn, `up` zero."""
  return {"down": {"kernel": weight_init(rng, (width, hidden)),
                   "bias": jnp.zeros((hidden,))},
          "up": {"kernel": jnp.zeros((hidden, width)),
                 "bias": jnp.zeros((width,))}}


def init(params: Params, cfg: Any, rng: jax.Array) -> Params:
  """Zero-initialised patches for every block (the model is unchanged)."""
  mcfg = cfg.method(NAME)
  c, h = cfg.model.embed_dim, mcfg.width(cfg.model)
  out = {}
  for j, name in enumerate(mcfg.patch_names()):
    keys = jax.random.split(jax.random.fold_in(rng, j), cfg.model.num_blocks)
    out[name] = jax.vmap(lambda k: init_patch(k, c, h))(keys)
  return {**params, NAME: out}


def branch(patch: Params, z: jax.Array) -> jax.Array:
  """up(GELU(down(z))) in z's dtype (params stay float32)."""
  dtype = z.dtype
  h = z @ patch["down"]["kernel"].astype(dtype) + patch["down"][
      "bias"].astype(dtype)
  h = jax.nn.gelu(h, approximate=True)
  return h @ patch["up"]["kernel"].astype(dtype) + patch["up"][
      "bias"].astype(dtype)


def side_inputs(params: Params, cfg: Any, ids: jax.Array, *, train: bool,
                rng: jax.Array | None) -> tuple[Params, dict]:
  """Every block's patches, scanned beside the blocks."""
  del cfg, ids, train, rng
  return params[NAME], {}


def slots(cfg: Any) -> dict[str, Callable]:
  """The slot code of `methods.peterrec.placement`."""
  placement = cfg.method(NAME).placement

  def serial(name):
    return lambda x_in, out, p: out + branch(p[name], out)

  def beside(name):
    return lambda x_in, out, p: out + branch(p[name], x_in)

  if placement == "serial":
    return {"layer1": serial("patch1"), "layer2": serial("patch2")}
  if placement == "serial_top":
    return {"layer2": serial("patch2")}
  if placement == "parallel":
    return {"layer1": beside("patch1"), "layer2": beside("patch2")}
  return {"branch": beside("patch")}
