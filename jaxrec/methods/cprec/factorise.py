"""CpRec's compression of a *trained* model's tables: its full item
embedding into frequency bands, and its flat softmax into the two-level
tree softmax, each by truncated SVD (the paper trains both from scratch;
this surgery starts them from a trained model, so a grown model can be
compressed and fine-tuned instead of retrained).

  compressed, cfg = factorise.compress(params, cfg, cutoffs, dims)

Band j of the embedding holds the trained rows E_j [k_j, C]. Its best
rank-d_j approximation (Eckart-Young) is E_j ~ (U S)[:, :d_j] Vt[:d_j]:
the band table is (U S)[:, :d_j] [k_j, d_j], the projection Vt[:d_j]
[d_j, C]. A band at least as wide as its rank is exact.

The tree softmax from a flat head (kernel W [V, C] or the tied embedding,
bias b [V]):
  - head items keep their rows of W and b;
  - tail band j's output table is the SVD of W_j as above (kernel
    (U S)[:, :d_j], projection Vt[:d_j]^T [C, d_j]) with bias b_j, so its
    within-band distribution is the flat softmax's conditional one (exact
    at full rank);
  - band j's token in the head cluster gets logsumexp(b_j) as bias and the
    softmax(b_j)-weighted mean of W_j's rows as kernel: the first-order
    expansion of the band's log-mass logsumexp(W_j h + b_j) at h = 0. The
    band masses are therefore approximate, and fine-tuning fixes them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from jaxrec import heads
from jaxrec.config import Config
from jaxrec.errors import JaxrecError
from jaxrec.nn import bands

Params = dict[str, Any]


def low_rank(rows: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """(A [k, dim], B [dim, C]) with A @ B the best rank-`dim` approximation
  of `rows` [k, C]; columns past the rank are zero."""
  u, s, vt = np.linalg.svd(np.asarray(rows, np.float64), full_matrices=False)
  r = min(dim, len(s))
  a = np.zeros((rows.shape[0], dim))
  b = np.zeros((dim, rows.shape[1]))
  a[:, :r] = u[:, :r] * s[:r]
  b[:r] = vt[:r]
  return a.astype(np.float32), b.astype(np.float32)


def banded_model(cfg: Config, cutoffs: Sequence[int],
                 dims: Sequence[int]) -> Any:
  """The model config with an adaptive embedding over these bands."""
  model = dataclasses.replace(
      cfg.model, embedding="adaptive", num_bands=len(cutoffs) + 1,
      band_cutoffs=tuple(int(c) for c in cutoffs),
      band_dims=tuple(int(d) for d in dims))
  model.validate()
  return model


def embedding_to_bands(table: np.ndarray, model: Any) -> Params:
  """The `item_embedding` subtree of `model` (adaptive) from a full [V, C]
  table."""
  sizes = bands.band_sizes(model.band_cutoffs, model.num_items)
  starts = (0, *model.band_cutoffs)
  out = {}
  for j, (start, size, dim) in enumerate(zip(starts, sizes,
                                             model.band_dims)):
    emb, proj = low_rank(table[start:start + size], dim)
    out[f"band_{j}"] = {"embedding": jnp.asarray(emb),
                        "projection": jnp.asarray(proj)}
  return out


def softmax_to_tree(kernel: np.ndarray, bias: np.ndarray, model: Any,
                    tail_dims: Sequence[int]) -> Params:
  """The tree softmax's `head` subtree from a flat kernel [V, C] and bias."""
  kernel = np.asarray(kernel, np.float64)
  bias = np.asarray(bias, np.float64)
  cuts = (*model.band_cutoffs, model.num_items)
  head_rows, head_bias, out = [kernel[:cuts[0]]], [bias[:cuts[0]]], {}
  for j, dim in enumerate(tail_dims, start=1):
    w, b = kernel[cuts[j - 1]:cuts[j]], bias[cuts[j - 1]:cuts[j]]
    p = np.exp(b - b.max())
    p /= p.sum()
    head_rows.append((p @ w)[None])
    head_bias.append([b.max() + np.log(np.exp(b - b.max()).sum())])
    table, proj = low_rank(w, dim)
    out[f"band_{j}"] = {"projection": jnp.asarray(proj.T),
                        "kernel": jnp.asarray(table),
                        "bias": jnp.asarray(b, jnp.float32)}
  out["head_kernel"] = jnp.asarray(np.concatenate(head_rows), jnp.float32)
  out["head_bias"] = jnp.asarray(np.concatenate(head_bias), jnp.float32)
  return out


def compress(params: Params, cfg: Config, cutoffs: Sequence[int],
             dims: Sequence[int], tree_softmax: bool = True,
             tail_dims: Sequence[int] = ()) -> tuple[Params, Config]:
  """(params, cfg) of the trained model with its full embedding cut into
  bands (`cutoffs`: ids c_1 < ... < c_{n-1}; `dims`: d_j per band) and,
  with `tree_softmax`, its flat softmax head turned into the tree softmax
  over the same bands (output widths `tail_dims`, default `dims[1:]`)."""
  if cfg.model.embedding != "full":
    raise JaxrecError(f"compress: model.embedding={cfg.model.embedding!r}; "
                      "expected 'full' (the model is banded already)")
  if tree_softmax and cfg.head.name != "softmax":
    raise JaxrecError(f"compress: head.name={cfg.head.name!r}; the tree "
                      "softmax is made from the flat 'softmax' head")
  model = banded_model(cfg, cutoffs, dims)
  table = np.asarray(params["item_embedding"]["embedding"], np.float32)
  out = {**params, "item_embedding": {
      **{k: v for k, v in params["item_embedding"].items()
         if k != "embedding"},
      **embedding_to_bands(table, model)}}
  head = cfg.head
  if tree_softmax:
    tail = tuple(tail_dims) or tuple(model.band_dims[1:])
    flat = params["head"]
    kernel = table if cfg.head.tie_embeddings else flat["kernel"]
    out["head"] = softmax_to_tree(kernel, flat["bias"], model, tail)
    head = heads.get("tree_softmax").config(
        tail_dims=tuple(tail_dims))
  elif cfg.head.tie_embeddings:
    raise JaxrecError("compress: head.tie_embeddings=True needs the full "
                      "table; compress with tree_softmax=True")
  return out, cfg.replace(model=model, head=head).validate()
