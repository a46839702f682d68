"""Tests for jaxrec.data.synthetic: determinism, ranges, structure, options."""
import dataclasses

import numpy as np
import pytest

from jaxrec.data import synthetic
from jaxrec.errors import JaxrecError


def _sequences(spec):
  """The per-user item sequences of `spec`, with its world."""
  world = synthetic.make_world(spec)
  data = synthetic.generate_spec(spec)
  bounds = np.cumsum(world.lengths)[:-1]
  return world, data, np.split(data.items, bounds)


def test_same_spec_gives_byte_identical_arrays():
  a, b = synthetic.generate("tiny"), synthetic.generate("tiny")
  for field in ("users", "items", "timestamps"):
    assert getattr(a, field).tobytes() == getattr(b, field).tobytes()


def test_different_seeds_give_different_items():
  a = synthetic.generate("tiny,seed=0")
  b = synthetic.generate("tiny,seed=1")
  assert a.items.shape != b.items.shape or np.any(a.items != b.items)


def test_ids_are_int64_and_items_within_1_to_items():
  spec = synthetic.SIZES["tiny"]
  data = synthetic.generate_spec(spec)
  assert data.users.dtype == np.int64 and data.items.dtype == np.int64
  assert data.items.min() >= 1 and data.items.max() <= spec.items
  assert set(np.unique(data.users)) == set(range(1, spec.users + 1))


def test_events_are_grouped_by_user():
  users = synthetic.generate("tiny").users
  assert np.all(np.diff(users) >= 0)


def test_timestamps_strictly_increase_within_each_user():
  data = synthetic.generate("tiny")
  same_user = data.users[1:] == data.users[:-1]
  assert np.all(np.diff(data.timestamps)[same_user] > 0)


def test_lengths_lie_in_range_with_the_requested_mean():
  spec = synthetic.SIZES["small"]
  lengths = synthetic.make_world(spec).lengths
  assert lengths.min() >= spec.min_len and lengths.max() <= spec.max_len
  assert abs(lengths.mean() - spec.mean_len) < 0.5


def test_popularity_is_zipf_like():
  spec = synthetic.SIZES["small"]
  counts = np.sort(np.bincount(synthetic.generate_spec(spec).items))[::-1]
  top = max(1, spec.items // 100)
  assert counts[:top].sum() / counts.sum() > 0.05  # 5x its 1% share.


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_each_lag_rule_holds_at_least_its_probability(size):
  spec = synthetic.SIZES[size]
  world, _, seqs = _sequences(spec)
  for j, (lag, prob) in enumerate(zip(spec.lags, spec.lag_probs)):
    hits = np.concatenate(
        [s[lag:] == world.succ[j, s[:-lag]] for s in seqs if len(s) > lag])
    assert hits.mean() >= prob - 0.02, (lag, hits.mean(), prob)


def test_successors_stay_within_the_source_topic():
  world = synthetic.make_world(synthetic.SIZES["tiny"])
  items = np.arange(1, len(world.topic_of))
  assert np.all(world.topic_of[world.succ[:, items]] == world.topic_of[items])


def test_users_draw_interest_items_only_from_their_topics():
  spec = dataclasses.replace(synthetic.SIZES["tiny"], lag_probs=(0, 0, 0),
                             interest_prob=1.0, popularity_prob=0.0)
  world, _, seqs = _sequences(spec)
  for user, seq in enumerate(seqs[:20]):
    assert set(world.topic_of[seq]) <= set(world.user_topics[user])


def test_next_item_probs_is_a_distribution_over_real_items():
  spec = synthetic.SIZES["tiny"]
  world, _, seqs = _sequences(spec)
  probs = synthetic.next_item_probs(spec, world, 0, seqs[0][:-1])
  assert probs[0] == 0 and np.all(probs >= 0)
  assert probs.sum() == pytest.approx(1.0)


def test_bayes_optimal_ranking_doubles_popularity_ndcg():
  spec = synthetic.parse_size("small,users=400")
  world, _, seqs = _sequences(spec)
  counts = np.bincount(np.concatenate([s[:-1] for s in seqs]),
                       minlength=spec.items + 1)
  counts[0] = -1
  popular = np.argsort(-counts, kind="stable")[:10]

  def ndcg(top, target):
    rank = np.flatnonzero(top == target)
    return 1 / np.log2(rank[0] + 2) if len(rank) else 0.0

  oracle = pop = 0.0
  for user, seq in enumerate(seqs):
    probs = synthetic.next_item_probs(spec, world, user, seq[:-1])
    oracle += ndcg(np.argsort(-probs, kind="stable")[:10], seq[-1])
    pop += ndcg(popular, seq[-1])
  assert oracle > 2 * pop


def test_overrides_replace_preset_fields():
  spec = synthetic.parse_size("small,users=300,items=50,seed=3,zipf=0.8")
  assert (spec.users, spec.items, spec.seed, spec.zipf) == (300, 50, 3, 0.8)
  assert spec.max_len == synthetic.SIZES["small"].max_len


def test_lags_override_splits_the_preset_lag_share_evenly():
  spec = synthetic.parse_size("small,lags=1/4")
  assert spec.lags == (1, 4)
  assert spec.lag_probs == pytest.approx((0.3, 0.3))


def test_unknown_option_raises_naming_it():
  with pytest.raises(JaxrecError, match="unknown option 'foo'"):
    synthetic.generate("tiny,foo=1")


def test_bad_value_raises_naming_the_option():
  # The config coercer reads the value; the message names option and value.
  with pytest.raises(JaxrecError, match=r"users.*'many'"):
    synthetic.parse_size("tiny,users=many")


def test_inconsistent_probabilities_raise():
  with pytest.raises(JaxrecError, match="popularity_prob"):
    synthetic.parse_size("tiny,popularity_prob=0.5")


def test_unknown_preset_raises_listing_presets():
  with pytest.raises(JaxrecError, match="'huge'.*tiny"):
    synthetic.generate("huge")


def test_presets_exist_and_validate():
  assert {"tiny", "small", "medium", "ml20m", "deep"} <= set(synthetic.SIZES)
  for name, spec in synthetic.SIZES.items():
    assert spec.name == name
    spec.validate()
  assert max(synthetic.SIZES["deep"].lags) >= 40


def test_name_and_describe_record_overrides():
  data = synthetic.generate("tiny,seed=7")
  assert data.name == "synthetic:tiny,seed=7"
  text = synthetic.describe(synthetic.parse_size("tiny,seed=7"))
  assert "seed=7" in text and "lag8 0.15" in text
