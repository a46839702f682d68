"""The item embedding of every backbone: one table, or CpRec's block-wise
adaptive decomposition (`model.embedding`).

  full       item_embedding/embedding              [V, C]
  adaptive   item_embedding/band_j/embedding       [k_j, d_j]
             item_embedding/band_j/projection      [d_j, C]

Special tokens (`model.special_tokens`: mask, cls) are learned vectors
beside the items, `tokens/NAME` [C], read for ids V and V+1
(`cfg.token_id`): masked pretraining's MASK and PeterRec's CLS.

Adaptive: an id in band j (`jaxrec.nn.bands`) looks up row `id - c_j` of
its band's small table and projects it to C, so a tail item costs d_j
parameters (plus its band's shared [d_j, C] projection) instead of C. With d_j = C / 4^j the tail bands are 4x, 16x, ...
smaller. Padding id 0 sits in the head band; backbones zero its input.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxrec.config import SPECIAL_TOKENS
from jaxrec.nn import bands
from jaxrec.nn.conv import weight_init

Params = dict[str, Any]


def band_ranges(cfg: Any) -> list[tuple[int, int]]:
  """[(first id, size)] per band of a backbone config."""
  sizes = bands.band_sizes(cfg.band_cutoffs, cfg.num_items)
  starts = (0, *cfg.band_cutoffs)
  return list(zip(starts, sizes))


def init(cfg: Any, rng: jax.Array) -> Params:
  """The `item_embedding` subtree of a backbone config."""
  if cfg.embedding == "full":
    return {"embedding": weight_init(rng, (cfg.num_items, cfg.embed_dim))}
  dims = bands.band_dims(cfg.embed_dim, cfg.num_bands, cfg.band_dims)
  out = {}
  for j, ((_, size), dim) in enumerate(zip(band_ranges(cfg), dims)):
    k_table, k_proj = jax.random.split(jax.random.fold_in(rng, j))
    out[f"band_{j}"] = {
        "embedding": weight_init(k_table, (size, dim)),
        # Scaled so every band's embeddings start at the full table's scale.
        "projection": weight_init(k_proj, (dim, cfg.embed_dim)) * (
            1.0 / (0.02 * dim ** 0.5))}
  return out


def init_tokens(cfg: Any, rng: jax.Array) -> Params:
  """The `tokens` subtree: one [C] vector per special token, each its own
  draw (adding a token later leaves the others as they were)."""
  return {name: weight_init(jax.random.fold_in(rng, SPECIAL_TOKENS.index(name)),
                            (cfg.embed_dim,))
          for name in cfg.special_tokens}


def lookup(params: Params, cfg: Any, ids: jax.Array) -> jax.Array:
  """Embeddings [..., C] (float32) of item ids [...] and special tokens."""
  item_ids = jnp.where(ids < cfg.num_items, ids, 0)
  out = _item_lookup(params["item_embedding"], cfg, item_ids)
  for name in cfg.special_tokens:
    out = jnp.where((ids == cfg.token_id(name))[..., None],
                    params["tokens"][name].astype(out.dtype), out)
  return out


def _item_lookup(table: Params, cfg: Any, ids: jax.Array) -> jax.Array:
  if cfg.embedding == "full":
    return table["embedding"][ids]
  out = jnp.zeros(ids.shape + (cfg.embed_dim,), jnp.float32)
  for j, (start, size) in enumerate(band_ranges(cfg)):
    band = table[f"band_{j}"]
    local = jnp.clip(ids - start, 0, size - 1)
    vectors = band["embedding"][local] @ band["projection"]
    inside = (ids >= start) & (ids < start + size)
    out = jnp.where(inside[..., None], vectors, out)
  return out
