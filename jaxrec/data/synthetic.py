"""Synthetic sequential-recommendation data with known, learnable structure.

Every event is produced by one of several rules, chosen independently per
step with fixed probabilities:

* lag rule k (one per entry of `lags`): x_t = succ_k[x_{t-k}], where succ_k is
  a fixed random map item -> item (before step k it falls back to the interest
  rule);
* interest rule: a topic from the user's sparse topic mixture, then an item of
  that topic by popularity;
* popularity rule: an item by global Zipf popularity.

Because the rule is drawn independently of the history, the exact next-item
distribution is known (`next_item_probs`), so tests can compare a trained
model with the Bayes-optimal ranking. A popularity baseline can exploit only
the popularity share; a model that sees `max(lags)` items back can exploit
every lag rule, and one with a smaller receptive field cannot use the long
ones.

Generation loops over time steps with numpy over all users at once (users
sorted by length so the active users are always a prefix), so the ML-20M-sized
preset takes seconds.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaxrec import config as config_lib
from jaxrec.errors import JaxrecError
from jaxrec.data.sequences import Interactions

GENERATOR_VERSION = 1  # Bump when the same spec would produce other arrays.

_START_TIME = 1_000_000_000  # Unix seconds (2001): plausible timestamps.
_START_SPREAD = 365 * 24 * 3600  # Users start within a year.
_MAX_GAP = 3600  # Seconds between a user's consecutive events: 1.._MAX_GAP.


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """Every knob of the generator. Rule probabilities must sum to 1."""
  name: str = "custom"  # Preset it came from; only used in names.
  users: int = 2000
  items: int = 300  # Item ids are 1..items.
  topics: int = 10  # Items are partitioned into this many equal topics.
  topics_per_user: int = 2  # Size of each user's (Dirichlet) topic mixture.
  zipf: float = 1.0  # Popularity of the item of rank r is ~ r**-zipf.
  # Successors are drawn from the source item's topic with weights
  # popularity**succ_zipf: 1 keeps the head popular, 0 flattens it, which
  # stops a popularity baseline from riding on the lag rules.
  succ_zipf: float = 0.5
  min_len: int = 20
  max_len: int = 60
  mean_len: float = 40.0  # Realised mean, after clipping to [min, max].
  len_sigma: float = 0.4  # Lognormal shape of the lengths.
  lags: tuple[int, ...] = (1, 2, 8, 24)
  lag_probs: tuple[float, ...] = (0.25, 0.15, 0.1, 0.1)
  interest_prob: float = 0.25
  popularity_prob: float = 0.15
  seed: int = 0

  def validate(self) -> None:
    """Raises JaxrecError naming the first bad option."""
    _check(self.users >= 1, "users", self.users, ">= 1")
    _check(self.items >= 2, "items", self.items, ">= 2")
    _check(1 <= self.topics <= self.items, "topics", self.topics,
           f"in [1, items={self.items}]")
    _check(1 <= self.topics_per_user <= self.topics, "topics_per_user",
           self.topics_per_user, f"in [1, topics={self.topics}]")
    _check(self.zipf >= 0, "zipf", self.zipf, ">= 0")
    _check(self.succ_zipf >= 0, "succ_zipf", self.succ_zipf, ">= 0")
    _check(self.min_len >= 1, "min_len", self.min_len, ">= 1")
    _check(self.max_len >= self.min_len, "max_len", self.max_len,
           f">= min_len={self.min_len}")
    _check(self.min_len <= self.mean_len <= self.max_len, "mean_len",
           self.mean_len, "in [min_len, max_len]")
    _check(self.len_sigma >= 0, "len_sigma", self.len_sigma, ">= 0")
    _check(all(k >= 1 for k in self.lags), "lags", self.lags,
           "positive integers")
    _check(len(set(self.lags)) == len(self.lags), "lags", self.lags,
           "distinct lags")
    _check(len(self.lag_probs) == len(self.lags), "lag_probs",
           self.lag_probs, f"one probability per lag ({len(self.lags)})")
    probs = self.rule_probs()
    _check(all(p >= 0 for p in probs), "lag_probs", probs,
           "non-negative probabilities")
    _check(abs(sum(probs) - 1.0) < 1e-6, "popularity_prob",
           self.popularity_prob,
           f"lag_probs + interest_prob + popularity_prob = 1 "
           f"(they sum to {sum(probs):.6g})")

  def rule_probs(self) -> tuple[float, ...]:
    """Probabilities of the rules: each lag, then interest, then popularity."""
    return (*self.lag_probs, self.interest_prob, self.popularity_prob)


SIZES: dict[str, SyntheticSpec] = {
    # Unit tests: 4,000 events, generates in a few milliseconds.
    "tiny": SyntheticSpec(
        name="tiny", users=200, items=50, topics=5, min_len=10, max_len=30,
        mean_len=20.0, lags=(1, 2, 8), lag_probs=(0.3, 0.15, 0.15)),
    # CPU demo default: a 4-8 block C=64 model learns it in about a minute.
    "small": SyntheticSpec(name="small"),
    "medium": SyntheticSpec(
        name="medium", users=20_000, items=2_000, topics=20, min_len=20,
        max_len=200, mean_len=60.0, len_sigma=0.6),
    # ML-20M's shape: 138,493 users, 26,744 items, ~20M events, long tail.
    "ml20m": SyntheticSpec(
        name="ml20m", users=138_493, items=26_744, topics=100,
        topics_per_user=3, min_len=20, max_len=2_000, mean_len=144.4,
        len_sigma=1.2),
    # Depth matters: a lag-40 rule is invisible to a receptive field < 40.
    "deep": SyntheticSpec(
        name="deep", users=3_000, items=200, topics=8, min_len=60,
        max_len=100, mean_len=80.0, len_sigma=0.2, lags=(1, 40),
        lag_probs=(0.25, 0.35)),
}


def generate(size: str = "small") -> Interactions:
  """Interactions for a preset, optionally with overrides.

  `size` is a preset name from `SIZES` followed by comma-separated
  `key=value` overrides of `SyntheticSpec` fields, e.g.
  "small,users=3000,items=500,seed=3". Tuples use "/": "lags=1/4".
  """
  return generate_spec(parse_size(size))


def generate_spec(spec: SyntheticSpec) -> Interactions:
  """Interactions for a spec: grouped by user (ids 1..users), time-sorted."""
  world = make_world(spec)
  items = _simulate(spec, world)
  users = np.repeat(np.arange(1, spec.users + 1, dtype=np.int64),
                    world.lengths)
  timestamps = _timestamps(spec, world.lengths)
  return Interactions(users=users, items=items, timestamps=timestamps,
                      name=f"synthetic:{spec_key(spec)}")


@dataclasses.dataclass(frozen=True)
class SyntheticWorld:
  """The hidden structure behind the events. Arrays are indexed by item id
  (index 0 unused, probability 0) or by user index 0..users-1."""
  popularity: np.ndarray  # [items+1] float64, sums to 1.
  topic_of: np.ndarray  # [items+1] int64; topic_of[0] = -1.
  succ: np.ndarray  # [len(lags), items+1] int64: succ[j, i] for lags[j].
  user_topics: np.ndarray  # [users, topics_per_user] int64.
  user_weights: np.ndarray  # [users, topics_per_user] float64, rows sum to 1.
  lengths: np.ndarray  # [users] int64.


def make_world(spec: SyntheticSpec) -> SyntheticWorld:
  """The seeded structure of `spec` (the events are drawn from it)."""
  spec.validate()
  item_rng, user_rng = _rng(spec, 0), _rng(spec, 1)
  popularity = _popularity(spec, item_rng)
  topic_of = _topics(spec, item_rng)
  succ = _successors(spec, popularity, topic_of, item_rng)
  user_topics, user_weights = _mixtures(spec, user_rng)
  lengths = _lengths(spec, user_rng)
  return SyntheticWorld(popularity, topic_of, succ, user_topics,
                        user_weights, lengths)


def next_item_probs(spec: SyntheticSpec, world: SyntheticWorld, user: int,
                    history: np.ndarray) -> np.ndarray:
  """The exact distribution [items+1] of the item after `history`.

  `user` is the 0-based user index; `history` the user's items so far. Ranking
  items by this is Bayes-optimal, the ceiling for any model.
  """
  probs = spec.popularity_prob * world.popularity
  interest = spec.interest_prob
  t = len(history)
  for j, (lag, p) in enumerate(zip(spec.lags, spec.lag_probs)):
    if t >= lag:
      probs[world.succ[j, history[t - lag]]] += p
    else:
      interest += p  # A lag rule before its lag falls back to interest.
  return probs + interest * _interest_probs(world, user)


def parse_size(size: str) -> SyntheticSpec:
  """"preset[,key=value...]" -> a validated SyntheticSpec."""
  name, *overrides = [part.strip() for part in size.split(",")]
  if name not in SIZES:
    raise JaxrecError(f"synthetic: unknown size {name!r}; expected one of "
                      f"{sorted(SIZES)}")
  spec = SIZES[name]
  values = {}
  for item in overrides:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep:
      raise JaxrecError(f"synthetic: option {item!r} is not key=value")
    values[key] = _parse_value(key, value.strip())
  if "lags" in values and "lag_probs" not in values:
    # Keep the preset's total lag share, split evenly over the new lags.
    total = sum(spec.lag_probs)
    values["lag_probs"] = (total / len(values["lags"]),) * len(values["lags"])
  spec = dataclasses.replace(spec, **values)
  spec.validate()
  return spec


def spec_key(spec: SyntheticSpec) -> str:
  """A canonical string: the preset name plus the fields that differ."""
  base = SIZES.get(spec.name, SyntheticSpec())
  parts = [spec.name]
  for field in dataclasses.fields(spec):
    value = getattr(spec, field.name)
    if field.name != "name" and value != getattr(base, field.name):
      if isinstance(value, tuple):
        value = "/".join(str(v) for v in value)
      parts.append(f"{field.name}={value}")
  return ",".join(parts)


def describe(spec: SyntheticSpec) -> str:
  """A one-line human summary of a spec."""
  rules = ", ".join(f"lag{k} {p:g}" for k, p in zip(spec.lags, spec.lag_probs))
  return (f"synthetic {spec_key(spec)}: {spec.users} users, {spec.items} "
          f"items, {spec.topics} topics ({spec.topics_per_user}/user), "
          f"length {spec.min_len}..{spec.max_len} (mean {spec.mean_len:g}), "
          f"zipf {spec.zipf:g}; rules: {rules}, interest "
          f"{spec.interest_prob:g}, popularity {spec.popularity_prob:g}; "
          f"seed {spec.seed}")


# --- Structure -------------------------------------------------------------


def _popularity(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
  """Zipf weights over a random ranking of the items (ids carry no rank)."""
  rank = rng.permutation(spec.items) + 1
  weights = np.zeros(spec.items + 1)
  weights[1:] = rank.astype(np.float64)**-spec.zipf
  return weights / weights.sum()


def _topics(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
  """Equal-sized topics, each mixing popular and rare items."""
  topic_of = np.full(spec.items + 1, -1, np.int64)
  topic_of[1:] = rng.permutation(spec.items) % spec.topics
  return topic_of


def _successors(spec: SyntheticSpec, popularity: np.ndarray,
                topic_of: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One map per lag: each item's successor from its own topic."""
  weights = popularity**spec.succ_zipf * (topic_of >= 0)
  sampler = _TopicSampler(weights, topic_of, spec.topics)
  sources = topic_of[1:]
  succ = np.zeros((len(spec.lags), spec.items + 1), np.int64)
  for j in range(len(spec.lags)):
    succ[j, 1:] = sampler.sample(sources, rng.random(spec.items))
  return succ


def _mixtures(spec: SyntheticSpec,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Each user's few distinct topics and Dirichlet(1) weights over them."""
  keys = rng.random((spec.users, spec.topics))
  topics = np.argsort(keys, axis=1)[:, :spec.topics_per_user]
  weights = rng.dirichlet(np.ones(spec.topics_per_user), size=spec.users)
  return topics.astype(np.int64), weights


def _lengths(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
  """Clipped lognormal lengths whose realised mean is `mean_len`."""
  z = spec.len_sigma * rng.standard_normal(spec.users)

  def lengths(mu: float) -> np.ndarray:
    raw = np.exp(np.minimum(mu + z, 50.0))  # Cap avoids overflow warnings.
    return np.clip(np.rint(raw), spec.min_len, spec.max_len).astype(np.int64)

  # Bisection on the log-median: the mean is monotone in it.
  lo, hi = math.log(spec.min_len) - 10, math.log(spec.max_len) + 10
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if lengths(mid).mean() < spec.mean_len else (lo, mid)
  return lengths((lo + hi) / 2)


class _TopicSampler:
  """Vectorised draws of an item given its topic, by fixed weights.

  Items are laid out topic by topic with a cumulative distribution that runs
  from t to t + 1 inside topic t, so one searchsorted serves all topics.
  """

  def __init__(self, weights: np.ndarray, topic_of: np.ndarray,
               topics: int):
    self.order = np.argsort(topic_of[1:], kind="stable") + 1  # Item ids.
    topic = topic_of[self.order]
    w = weights[self.order]
    totals = np.bincount(topic, weights=w, minlength=topics)
    before = (np.cumsum(totals) - totals)[topic]  # Mass of earlier topics.
    self.cdf = topic + (np.cumsum(w) - before) / totals[topic]
    # Each topic's first and last index: rounding must never leave the topic.
    sizes = np.bincount(topic, minlength=topics)
    self.last = np.cumsum(sizes) - 1
    self.first = self.last - sizes + 1

  def sample(self, topics: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    index = np.searchsorted(self.cdf, topics + uniform, side="right")
    index = np.clip(index, self.first[topics], self.last[topics])
    return self.order[index]


def _interest_probs(world: SyntheticWorld, user: int) -> np.ndarray:
  """P(item | interest rule, user) over item ids."""
  within = np.zeros_like(world.popularity)
  for topic, weight in zip(world.user_topics[user], world.user_weights[user]):
    mask = world.topic_of == topic
    within[mask] += weight * world.popularity[mask] / world.popularity[
        mask].sum()
  return within


# --- Events ----------------------------------------------------------------


def _simulate(spec: SyntheticSpec, world: SyntheticWorld) -> np.ndarray:
  """All events, user-major: loops over steps, numpy over active users."""
  rng = _rng(spec, 2)
  order = np.argsort(-world.lengths, kind="stable")  # Longest first.
  # active[t]: users with more than t events, always a prefix of `order`.
  active = spec.users - np.searchsorted(
      world.lengths[order[::-1]], np.arange(world.lengths.max()), "right")
  offsets = np.concatenate([[0], np.cumsum(active)])
  flat = np.zeros(offsets[-1], np.int64)  # Step-major: step t, then user.
  step = _Step(spec, world, order)
  for t, n in enumerate(active):
    history = [flat[offsets[t - lag]:offsets[t - lag] + n] if t >= lag else
               None for lag in spec.lags]
    flat[offsets[t]:offsets[t + 1]] = step(history, rng.random((3, n)))
  return _user_major(flat, world.lengths, order, offsets)


class _Step:
  """Draws one time step for the first n users of `order`."""

  def __init__(self, spec: SyntheticSpec, world: SyntheticWorld,
               order: np.ndarray):
    self.succ = world.succ
    self.topics = world.user_topics[order]
    self.cum_weights = np.cumsum(world.user_weights[order], axis=1)[:, :-1]
    self.interest = _TopicSampler(world.popularity, world.topic_of,
                                  spec.topics)
    self.pop_cdf = np.cumsum(world.popularity)
    self.rule_cdf = np.cumsum(spec.rule_probs())[:-1]  # Last rule: the rest.
    self.items = spec.items

  def __call__(self, history: list[np.ndarray | None],
               uniform: np.ndarray) -> np.ndarray:
    """history[j]: the items lags[j] steps back, or None before that step.

    uniform: [3, n] -- the rule, the user's topic, the item. Only the users
    that need a draw get one: random searchsorted calls dominate the time.
    """
    lag_rules = len(history)
    rule = np.searchsorted(self.rule_cdf, uniform[0], side="right")
    for j, source in enumerate(history):
      if source is None:  # Before its lag the rule falls back to interest.
        rule[rule == j] = lag_rules
    out = np.empty(len(rule), np.int64)
    for j, source in enumerate(history):
      if source is not None:
        mask = rule == j
        out[mask] = self.succ[j, source[mask]]
    users = np.flatnonzero(rule == lag_rules)
    pick = (uniform[1, users, None] > self.cum_weights[users]).sum(1)
    out[users] = self.interest.sample(self.topics[users, pick],
                                      uniform[2, users])
    users = np.flatnonzero(rule == lag_rules + 1)
    out[users] = np.minimum(
        np.searchsorted(self.pop_cdf, uniform[2, users], side="right"),
        self.items)
    return out


def _user_major(flat: np.ndarray, lengths: np.ndarray, order: np.ndarray,
                offsets: np.ndarray) -> np.ndarray:
  """Reorders step-major events to users 0..U-1, each in time order."""
  active = np.diff(offsets)
  steps = np.repeat(np.arange(len(active)), active)
  users = order[np.arange(len(flat)) - offsets[steps]]
  starts = np.cumsum(lengths) - lengths
  out = np.empty_like(flat)
  out[starts[users] + steps] = flat
  return out


def _timestamps(spec: SyntheticSpec, lengths: np.ndarray) -> np.ndarray:
  """int64 seconds: a random start per user plus positive random gaps."""
  rng = _rng(spec, 3)
  start = _START_TIME + rng.integers(0, _START_SPREAD, spec.users)
  gaps = rng.integers(1, _MAX_GAP + 1, int(lengths.sum()))
  firsts = np.cumsum(lengths) - lengths
  gaps[firsts] = 0  # Each user's first event is at its start time.
  within = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[firsts], lengths)
  return np.repeat(start, lengths) + within


# --- Option parsing --------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(SyntheticSpec)
           if f.name != "name"}


def _parse_value(key: str, text: str) -> Any:
  """Parses one override by its field's type (the config coercer; lists
  take '/' between values, as commas separate options); names the key."""
  if key not in _FIELDS:
    raise JaxrecError(f"synthetic: unknown option {key!r}; expected one of "
                      f"{sorted(_FIELDS)}")
  return config_lib.coerce(_FIELDS[key], text, f"synthetic: option {key}")


def _rng(spec: SyntheticSpec, stream: int) -> np.random.Generator:
  """Independent seeded streams, so changing one part leaves the others."""
  return np.random.default_rng([GENERATOR_VERSION, spec.seed, stream])


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
  if not ok:
    raise JaxrecError(f"synthetic: option {key}={value!r}: expected "
                      f"{expected}")
