"""SSE-PT (Wu et al., RecSys 2020): SASRec personalised by a user embedding,
regularised by stochastic shared embeddings (SSE).

The param tree is SASRec's (`sasrec.py`) with a narrower item table and a
user table; the hidden width C = item_dim + user_dim:

  item_embedding/embedding      [V, C - D]  id 0 is padding
  user_embedding/embedding      [U, D]      row u for user index u (the
                                            data's user order, 1..U-1);
                                            row 0 is never read
  position_embedding/embedding  [P, C]
  blocks/..., final_norm/...                SASRec's, at width C

Input at position t: [item_embedding[id_t] * sqrt(C - D) ;
user_embedding[u] * sqrt(D)] + position_embedding[slot], then SASRec's
dropout, causal blocks and final norm (`sasrec.encode`). As in the official
code, the user's vector is concatenated at every position, so every block
reads the user beside each item.

SSE-SE, in training only: each row's user index is replaced by a uniform
random user with probability `sse_user` (the paper's 1 - threshold_user;
ML-1M: 0.92), and each real input item by a uniform random item with
probability `sse_item` (1 - threshold_item; ML-1M: 0.1). The replacements
draw from the training rng (`apply(train=True, rng=...)`); evaluation has
none and is deterministic.

Users reach the model as the batch's `users` [B] (`Backbone.extra_inputs`;
0: a user no training row belongs to). An unseen user (index 0, or no
`users` at all: serving a bare history) reads the mean of the user table's
rows 1..U-1, the documented fallback: the average user row, never the
row of a user it is not (a user with no training row has one, trained
only by SSE's random draws, so evaluation gives that user index 0).

Where this differs from the official code (wuliwei9278/SSE-PT):
- The item-side replacement changes inputs only; the official sampler also
  replaces the target at that position with another random item (label
  noise). Targets here are always the true next items.
- The loss is jaxrec's full softmax; the official code's BCE against one
  sampled negative scores [h . (item ; user)], whose user term is the same
  for every item of a row, so full-softmax ranking needs no user column in
  the output layer: the head scores h against its own [V, C] table.
- The output layer is untied (the item table is narrower than C), and the
  item table's init is jaxrec's truncated N(0, 0.02).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxrec.config import option, require
from jaxrec.errors import JaxrecError
from jaxrec.method_api import BlockPlan
from jaxrec.models import sasrec
from jaxrec.models.backbone import Backbone, Params
from jaxrec.nn import embedding
from jaxrec.nn.conv import weight_init


@dataclasses.dataclass(frozen=True)
class SsePTConfig(sasrec.SASRecConfig):
  """SSE-PT: SASRec over [item ; user] embeddings, with SSE."""
  name: str = option("ssept", "backbone, one of jaxrec.models.names()")
  user_dim: int = option(0, "width D of the user embedding, concatenated to "
                         "each item's C - D (0: C / 2, as the paper's "
                         "50 + 50)")
  num_users: int = option(0, "user indices incl. the unseen index 0; taken "
                          "from the data")
  sse_user: float = option(0.92, "SSE: probability of replacing a row's "
                           "user by a random one in training (paper ML-1M: "
                           "1 - threshold_user = 0.92)")
  sse_item: float = option(0.1, "SSE: probability of replacing an input "
                           "item by a random one in training (paper ML-1M: "
                           "1 - threshold_item = 0.1)")

  @property
  def users_width(self) -> int:
    return self.user_dim or self.embed_dim // 2

  def item_width(self) -> int:
    return self.embed_dim - self.users_width

  def fit_users(self, num_users: int) -> "SsePTConfig":
    """The user table's size from the data; one a run already has must
    match (its rows are those users)."""
    if num_users < 2:
      raise JaxrecError("model.name='ssept' reads each row's user, and this "
                        "data has none (built without users)")
    if self.num_users and self.num_users != num_users:
      raise JaxrecError(f"model.num_users={self.num_users}: the data has "
                        f"{num_users} user indices (unseen 0 included)")
    return dataclasses.replace(self, num_users=num_users)

  def validate(self) -> None:
    super().validate()
    require(0 <= self.user_dim < self.embed_dim, "model.user_dim",
            self.user_dim, f"in [0, model.embed_dim={self.embed_dim})")
    require(self.item_width() >= 1, "model.embed_dim", self.embed_dim,
            "at least 2 (item and user halves)")
    require(self.num_users == 0 or self.num_users >= 2, "model.num_users",
            self.num_users, "0 (taken from the data) or at least 2")
    require(0.0 <= self.sse_user <= 1.0, "model.sse_user", self.sse_user,
            "in [0, 1]")
    require(0.0 <= self.sse_item <= 1.0, "model.sse_item", self.sse_item,
            "in [0, 1]")
    if self.special_tokens:
      raise JaxrecError("model.special_tokens: SSE-PT has none (its tokens "
                        "would need the item table's width)")
    if self.init != "jaxrec":
      raise JaxrecError("model.init: SSE-PT has only 'jaxrec'")

  def items_only(self) -> sasrec.SASRecConfig:
    """The item table's config: width C - D (CpRec's bands project to it)."""
    return dataclasses.replace(self, embed_dim=self.item_width())


def init(cfg: SsePTConfig, rng: jax.Array) -> Params:
  """SASRec's params with the item table at width C - D and a user table."""
  if cfg.num_users < 2:
    raise ValueError(f"model.num_users={cfg.num_users}: set it, or take it "
                     "from the data (fit_users)")
  k_sasrec, k_item, k_user = jax.random.split(rng, 3)
  # SASRec's blocks, positions and norm at width C; its [V, C] item table
  # (made tiny here) is replaced by the narrower one.
  params = sasrec.init(dataclasses.replace(cfg, num_items=2, embedding="full"),
                       k_sasrec)
  params["item_embedding"] = embedding.init(cfg.items_only(), k_item)
  params["user_embedding"] = {"embedding": weight_init(
      k_user, (cfg.num_users, cfg.users_width))}
  return params


def user_vectors(table: jax.Array, users: jax.Array | None,
                 batch: int) -> jax.Array:
  """[B, D]: each row's user; an unseen one (0) reads the mean of rows
  1..U-1."""
  fallback = table[1:].mean(axis=0)
  if users is None:
    return jnp.broadcast_to(fallback, (batch, table.shape[1]))
  seen = (users > 0) & (users < table.shape[0])
  return jnp.where(seen[:, None], table[jnp.clip(users, 0, table.shape[0] - 1)],
                   fallback)


def sse(cfg: SsePTConfig, ids: jax.Array, users: jax.Array | None,
        rng: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """SSE-SE: random replacements of users and real input items."""
  k_user, k_user_pick, k_item, k_item_pick = jax.random.split(rng, 4)
  swap = (jax.random.bernoulli(k_item, cfg.sse_item, ids.shape) & (ids > 0))
  ids = jnp.where(swap, jax.random.randint(k_item_pick, ids.shape, 1,
                                           cfg.num_items, ids.dtype), ids)
  if users is not None:
    swap = jax.random.bernoulli(k_user, cfg.sse_user, users.shape)
    users = jnp.where(swap, jax.random.randint(
        k_user_pick, users.shape, 1, cfg.num_users, users.dtype), users)
  return ids, users


def apply(params: Params, cfg: SsePTConfig, ids: jax.Array, *,
          train: bool = False, rng: jax.Array | None = None,
          plan: BlockPlan = BlockPlan(), unroll: bool = False,
          users: jax.Array | None = None) -> jax.Array:
  """Item ids [B, T] (and `users` [B]) -> hidden states [B, T, C]."""
  if train and rng is None:
    raise ValueError("ssept: train=True needs an rng key for dropout and SSE")
  if train:
    rng, k_sse = jax.random.split(rng)
    ids_in, users = sse(cfg, ids, users, k_sse)
  else:
    ids_in = ids
  items = embedding.lookup(params, cfg.items_only(), ids_in)
  who = user_vectors(params["user_embedding"]["embedding"], users,
                     ids.shape[0])
  x = jnp.concatenate([
      items * cfg.item_width() ** 0.5,
      jnp.broadcast_to(who[:, None] * cfg.users_width ** 0.5,
                       (*ids.shape, cfg.users_width))], axis=-1)
  # The padding mask comes from the true ids: SSE never turns padding real.
  return sasrec.encode(params, cfg, x, ids, train=train, rng=rng, plan=plan,
                       unroll=unroll)


BACKBONE = Backbone(
    name="ssept", config=SsePTConfig, init=init, apply=apply,
    surgery=sasrec.BACKBONE.surgery, extra_inputs=("users",))
