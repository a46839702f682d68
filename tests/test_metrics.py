"""Full-ranking metrics against a brute-force numpy reference."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import config
from jaxrec.heads import softmax
from jaxrec.heads.softmax import SoftmaxConfig
from jaxrec import ranking

CFG = config.Config(head=SoftmaxConfig())


def target_ranks(h, w, b, targets, history=None, tile=16384):
  """Ranks under the softmax head's own tile scoring of (h, w, b)."""
  params = {"head": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
  h = jnp.asarray(h)
  score_tile = lambda start, size: softmax.tile_scores(params, CFG, h, start,
                                                       size)
  return ranking.target_ranks(score_tile, params["head"]["kernel"].shape[0],
                              targets, history, tile=tile)


def brute_force_ranks(scores, targets, history=None):
  """Rank = real items (not 0, not masked history) scoring >= the target."""
  ranks = []
  for i, t in enumerate(targets):
    excluded = {0}
    if history is not None:
      excluded |= set(history[i].tolist()) - {t}
    ranks.append(sum(1 for j in range(scores.shape[1])
                     if j not in excluded and j != t
                     and scores[i, j] >= scores[i, t]))
  return np.array(ranks)


def random_case(seed, b=9, v=37, c=5, ties=True):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(b, c)).astype(np.float32)
  w = rng.normal(size=(v, c)).astype(np.float32)
  bias = rng.normal(size=v).astype(np.float32)
  if ties:  # Duplicate items give exact ties.
    w[5], bias[5] = w[3], bias[3]
    w[11], bias[11] = w[12], bias[12]
  targets = rng.integers(1, v, b)
  targets[0], targets[1] = 3, 12
  history = rng.integers(0, v, (b, 6))
  return h, w, bias, targets, history


@pytest.mark.parametrize("tile", [4, 16, 37, 1000])
def test_ranks_equal_brute_force(tile):
  h, w, b, t, _ = random_case(0)
  ranks = target_ranks(jnp.asarray(h), jnp.asarray(w), jnp.asarray(b),
                       jnp.asarray(t), tile=tile)
  np.testing.assert_array_equal(ranks, brute_force_ranks(h @ w.T + b, t))


@pytest.mark.parametrize("tile", [4, 37])
def test_ranks_with_history_mask_equal_brute_force(tile):
  h, w, b, t, hist = random_case(1)
  hist[2, 0] = t[2]  # The target itself in the history stays ranked.
  ranks = target_ranks(jnp.asarray(h), jnp.asarray(w), jnp.asarray(b),
                       jnp.asarray(t), jnp.asarray(hist), tile=tile)
  np.testing.assert_array_equal(ranks,
                                brute_force_ranks(h @ w.T + b, t, hist))


@pytest.mark.parametrize("tile", [4, 16])
def test_ids_past_the_catalogue_are_never_ranked(tile):
  # score_tile may score ids >= num_items anything (here the best score).
  h, w, b, t, _ = random_case(0)
  scores = jnp.asarray(h @ w.T + b)
  v = w.shape[0]

  def score_tile(start, size):
    ids = start + jnp.arange(size)
    inside = jnp.take(scores, ids, axis=1, mode="fill", fill_value=0)
    return jnp.where(ids[None, :] < v, inside, 1e30)

  ranks = ranking.target_ranks(score_tile, v, jnp.asarray(t), tile=tile)
  np.testing.assert_array_equal(ranks, brute_force_ranks(h @ w.T + b, t))


def test_padding_id_is_never_ranked():
  h = jnp.ones((1, 2))
  w = jnp.array([[100.0, 100.0], [1.0, 1.0], [0.0, 0.0]])
  ranks = target_ranks(h, w, jnp.zeros(3), jnp.array([1]))
  assert int(ranks[0]) == 0


def test_ties_count_against_the_target():
  """A constant model must get the worst rank, not the best."""
  v = 10
  ranks = target_ranks(jnp.ones((3, 4)), jnp.zeros((v, 4)), jnp.zeros(v),
                       jnp.array([1, 5, 9]))
  np.testing.assert_array_equal(ranks, [v - 2] * 3)


def test_metrics_from_ranks_formulas():
  out = ranking.metrics_from_ranks(np.array([0, 1, 4, 9, 30]))
  assert out["hr@5"] == pytest.approx(3 / 5)
  assert out["hr@10"] == pytest.approx(4 / 5)
  assert out["mrr@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 5)
  assert out["mrr@20"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 10) / 5)
  assert out["ndcg@5"] == pytest.approx(
      (1 + 1 / np.log2(3) + 1 / np.log2(6)) / 5)
  assert out["ndcg@20"] == pytest.approx(
      (1 + 1 / np.log2(3) + 1 / np.log2(6) + 1 / np.log2(11)) / 5)


def test_evaluate_ignores_padded_rows_of_the_last_batch():
  inputs = np.arange(1, 8)[:, None].astype(np.int32)
  targets = np.arange(1, 8).astype(np.int32)
  seen = []

  def rank_fn(batch):
    seen.append(batch["inputs"].shape[0])
    return np.where(batch["targets"] % 2 == 0, 0, 50)

  out = ranking.evaluate(rank_fn, inputs, targets, batch_size=4)
  assert seen == [4, 4]
  assert out["count"] == 7
  assert out["hr@5"] == pytest.approx(3 / 7)


@pytest.mark.parametrize("mask_history", [False, True])
def test_popularity_ranks_equal_brute_force(mask_history):
  rng = np.random.default_rng(3)
  counts = rng.integers(0, 6, 25)  # Many ties.
  counts[0] = 10**6  # Padding must not count however "popular".
  targets = rng.integers(1, 25, 40)
  hist = rng.integers(0, 25, (40, 5))
  scores = np.tile(counts.astype(float), (40, 1))
  expected = brute_force_ranks(scores, targets,
                               hist if mask_history else None)
  np.testing.assert_array_equal(
      ranking.popularity_ranks(counts, hist, targets, mask_history), expected)


def test_sampled_ranks_count_ties_against_the_target():
  h = jnp.ones((1, 2))
  w = jnp.array([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0], [3.0, 3.0]])
  b, targets, negatives = jnp.zeros(5), jnp.array([1]), jnp.array([[2, 3, 4]])
  target_scores = jnp.sum(h * w[targets], axis=1) + b[targets]
  negative_scores = jnp.einsum("bc,bnc->bn", h, w[negatives]) + b[negatives]
  ranks = ranking.sampled_ranks(target_scores, negative_scores)
  assert int(ranks[0]) == 2


def test_sampled_negatives_never_hit_the_target_or_padding():
  rng = np.random.default_rng(0)
  targets = np.array([1, 2, 3] * 50)
  neg = ranking.sample_negatives(rng, targets, 5, 30)
  assert neg.min() >= 1 and neg.max() <= 4
  assert not (neg == targets[:, None]).any()
