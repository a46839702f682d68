"""SSE-PT: SASRec over [item ; user] embeddings, SSE in training only, the
unseen-user fallback, and users carried from the data to evaluation."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import config, models
from jaxrec.config import DataConfig
from jaxrec.data import cache, sequences, splits
from jaxrec.errors import JaxrecError
from jaxrec.heads.softmax import SoftmaxConfig
from jaxrec.method_api import BlockPlan
from jaxrec.models import sasrec, ssept
from jaxrec.models.ssept import SsePTConfig
from jaxrec.tasks import next_item

V, T, U = 25, 6, 9


def cfg(**kw):
  model = SsePTConfig(embed_dim=8, num_blocks=2, **kw).fit_data(V, T)
  return config.Config(model=model.fit_users(U)).validate()


def perturbed(c, seed=0):
  params = models.init_params(c, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def ids():
  rows = np.random.default_rng(0).integers(1, V, (3, T))
  rows[0, :2] = 0
  return jnp.asarray(rows, jnp.int32)


def hidden(params, c, users):
  extra = None if users is None else {"users": jnp.asarray(users, jnp.int32)}
  return models.hidden_states(params, c, ids(), extra=extra)


def test_the_item_table_is_narrower_by_the_users_width():
  c = cfg(user_dim=3)
  params = models.init_params(c, jax.random.key(0))
  assert params["item_embedding"]["embedding"].shape == (V, 5)
  assert params["user_embedding"]["embedding"].shape == (U, 3)
  assert params["position_embedding"]["embedding"].shape == (T, 8)


def test_the_user_changes_every_real_position():
  c = cfg()
  params = perturbed(c)
  a, b = hidden(params, c, [1, 2, 3]), hidden(params, c, [4, 5, 6])
  real = np.asarray(ids()) != 0
  differs = np.abs(np.asarray(a - b)).max(-1) > 1e-4
  assert (differs == real).all()


def test_an_unseen_user_reads_the_mean_of_the_trained_rows():
  c = cfg()
  params = perturbed(c)
  table = params["user_embedding"]["embedding"]
  others = jnp.concatenate([table[1:5], table[6:]])
  # Row 5 at the others' mean leaves the mean of rows 1..U-1 there too.
  params["user_embedding"]["embedding"] = table.at[5].set(others.mean(0))
  at_mean = hidden(params, c, [5, 5, 5])
  np.testing.assert_allclose(hidden(params, c, [0, 0, 0]), at_mean,
                             atol=1e-5)
  np.testing.assert_allclose(hidden(params, c, None), at_mean, atol=1e-5)


def test_row_zero_of_the_user_table_is_never_read():
  c = cfg()
  params = perturbed(c)
  moved = jax.tree.map(lambda x: x, params)
  moved["user_embedding"]["embedding"] = (
      params["user_embedding"]["embedding"].at[0].add(5.0))
  np.testing.assert_allclose(hidden(params, c, [0, 3, 0]),
                             hidden(moved, c, [0, 3, 0]), atol=1e-6)


def test_without_sse_the_blocks_are_sasrecs_on_the_concatenated_input():
  c = cfg()
  params = perturbed(c)
  users = jnp.array([1, 4, 0], jnp.int32)
  item = params["item_embedding"]["embedding"][ids()] * 4 ** 0.5
  who = ssept.user_vectors(params["user_embedding"]["embedding"], users, 3)
  x = jnp.concatenate([item, jnp.broadcast_to(
      who[:, None] * 4 ** 0.5, (3, T, 4))], -1)
  want = sasrec.encode(params, c.model, x, ids(), train=False, rng=None,
                       plan=BlockPlan(), unroll=True)
  np.testing.assert_allclose(hidden(params, c, users), want, atol=1e-5)


def test_sse_replaces_real_items_and_users_at_their_rates():
  c = cfg(sse_user=0.5, sse_item=0.25)
  rows = np.random.default_rng(1).integers(1, V, (400, 50)).astype(np.int32)
  rows[:, :10] = 0
  users = np.full(400, 3, np.int32)
  new_ids, new_users = ssept.sse(c.model, jnp.asarray(rows),
                                 jnp.asarray(users), jax.random.key(0))
  new_ids, new_users = np.asarray(new_ids), np.asarray(new_users)
  assert (new_ids[:, :10] == 0).all()  # Padding stays padding.
  assert new_ids[:, 10:].min() >= 1 and new_ids.max() < V
  # A replacement can draw the same item: rate * (1 - 1/(V-1)) differ.
  assert abs((new_ids[:, 10:] != rows[:, 10:]).mean() - 0.25 * 23 / 24) < 0.01
  assert abs((new_users != 3).mean() - 0.5 * 7 / 8) < 0.08
  assert new_users.min() >= 1 and new_users.max() < U


def test_sse_is_off_in_evaluation_and_on_in_training():
  c = cfg(sse_user=1.0, sse_item=1.0)
  c = c.replace(model=dataclasses.replace(c.model, dropout=0.0))
  params = perturbed(c)
  users = {"users": jnp.array([1, 2, 3], jnp.int32)}
  key = jax.random.key(3)
  a = models.hidden_states(params, c, ids(), extra=users)
  b = models.hidden_states(params, c, ids(), extra=users)
  np.testing.assert_array_equal(a, b)
  trained = models.hidden_states(params, c, ids(), extra=users, train=True,
                                 rng=key)
  assert np.abs(np.asarray(trained - a)).max() > 1e-3


def test_a_tied_head_is_refused_in_one_line():
  model = SsePTConfig(embed_dim=8, num_blocks=2).fit_data(V, T).fit_users(U)
  with pytest.raises(JaxrecError, match="tie_embeddings.*width 4"):
    config.Config(model=model,
                  head=SoftmaxConfig(tie_embeddings=True)).validate()


def test_data_without_users_is_refused_in_one_line():
  with pytest.raises(JaxrecError, match="ssept.*has none"):
    SsePTConfig().fit_users(0)


def test_a_run_keeps_its_user_table_size():
  with pytest.raises(JaxrecError, match="model.num_users=9.*12"):
    SsePTConfig(num_users=9).fit_users(12)


def events(lengths):
  users = np.repeat(np.arange(len(lengths)), lengths)
  items = np.concatenate([np.arange(n) % 7 + 1 + u for u, n in
                          enumerate(lengths)])
  return sequences.Interactions(users=users, items=items,
                                timestamps=np.arange(len(users)), name="t")


def test_loo_rows_carry_their_users_and_short_users_are_unseen():
  # User 2 has 3 events: one training item, so no training row.
  data = splits.build_sequences(events([8, 6, 3, 7]), DataConfig(
      source="t", max_len=10, min_user_count=1, min_item_count=1))
  assert data.num_users == 5
  np.testing.assert_array_equal(data.valid_users, [1, 2, 0, 4])
  np.testing.assert_array_equal(data.test_users, [1, 2, 0, 4])
  assert set(data.train_users) == {1, 2, 4}
  for row, user in zip(data.train, data.train_users):
    history = data.valid_inputs[user - 1]  # Every training item, in order.
    np.testing.assert_array_equal(row[row > 0], history[history > 0])


def test_paper_protocol_valid_and_test_users_are_unseen():
  data = splits.build_sequences(events([5] * 20), DataConfig(
      source="t", protocol="paper", max_len=4, min_user_count=1,
      min_item_count=1, test_fraction=0.2, valid_fraction=0.2))
  assert (data.valid_users == 0).all() and (data.test_users == 0).all()
  assert (data.train_users > 0).all()


def test_the_cache_keeps_users(tmp_path):
  data = splits.build_sequences(events([8, 6, 3, 7]), DataConfig(
      source="t", max_len=4, min_user_count=1, min_item_count=1),
      fingerprint="f")
  path = str(tmp_path / "c.npz")
  cache.save_cache(path, data)
  back = cache.load_cache(path, "f")
  for name in ("train_users", "valid_users", "test_users"):
    np.testing.assert_array_equal(getattr(back, name), getattr(data, name))


def test_batches_hold_the_users_of_their_rows():
  data = splits.build_sequences(events([8, 6, 3, 7]), DataConfig(
      source="t", max_len=4, min_user_count=1, min_item_count=1))
  batch = next_item.batch(data, step=1, batch_size=2, seed=0)
  picked = sequences.batch_rows(len(data.train), 1, 2, 0)
  np.testing.assert_array_equal(batch["users"], data.train_users[picked])
  evals = list(sequences.eval_batches(data.valid_inputs, data.valid_targets,
                                      3, data.valid_users))
  np.testing.assert_array_equal(
      np.concatenate([b["users"] for b in evals])[:4], data.valid_users)


def test_evaluation_ranks_with_each_rows_user():
  c = cfg()
  params = perturbed(c)
  rank = jax.jit(next_item.rank_fn(c))
  targets = jnp.array([1, 2, 3], jnp.int32)
  known = rank(params, ids(), targets, jnp.array([1, 2, 3], jnp.int32))
  unseen = rank(params, ids(), targets, jnp.zeros(3, jnp.int32))
  np.testing.assert_array_equal(
      rank(params, ids(), targets, None), unseen)
  assert (np.asarray(known) != np.asarray(unseen)).any()
