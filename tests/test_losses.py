"""Tests for the softmax losses: chunked and sampled softmax, samplers, and
the softmax head's loss dispatch (jaxrec.heads).

Everything runs under a few module-level jits with repeated shapes: eager
JAX compiles every primitive on its own, and compilation dominates here.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import config
from jaxrec.config import TrainConfig
from jaxrec.errors import JaxrecError
from jaxrec.heads import chunked_softmax, sampled_softmax, softmax
from jaxrec.heads.softmax import SoftmaxConfig

C = 8
N = 12
V = 37  # Not a multiple of any chunk below.


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=("chunk_size", "num_samples"))
def value_and_grads(fn, h, w, b, targets, mask, *args, **kw):
  """fn(h, w, b, targets, mask, *args, **kw) and its grads wrt h, w, b."""
  loss = lambda h, w, b: fn(h, w, b, targets, mask, *args, **kw)
  return jax.value_and_grad(loss, argnums=(0, 1, 2))(h, w, b)


def chunked(h, w, b, targets, mask, chunk_size):
  return value_and_grads(chunked_softmax.softmax_cross_entropy, h, w, b,
                         targets, mask, chunk_size=chunk_size)


def naive(h, w, b, targets, mask):
  return value_and_grads(chunked_softmax.naive_softmax_cross_entropy, h, w, b,
                         targets, mask)


def sampled(h, w, b, targets, mask, rng, sampler, num_samples):
  return value_and_grads(sampled_softmax.sampled_softmax_cross_entropy, h, w,
                         b, targets, mask, rng, num_samples=num_samples,
                         sampler=sampler)


@functools.partial(jax.jit, static_argnums=2)
def sample(sampler, rng, n):
  return sampler.sample(rng, n)


def head_config(cfg_train, tie_embeddings=False):
  return config.Config(train=cfg_train,
                       head=SoftmaxConfig(tie_embeddings=tie_embeddings))


def head_params(w, b, tie_embeddings=False):
  if tie_embeddings:
    return {"item_embedding": {"embedding": w}, "head": {"bias": b}}
  return {"head": {"kernel": w, "bias": b}}


def _head_loss(h, w, b, targets, mask, rng, cfg_train, sampler=None,
               tie_embeddings=False):
  """The softmax head's loss on the output layer (w, b)."""
  return softmax.loss(head_params(w, b, tie_embeddings),
                      head_config(cfg_train, tie_embeddings), h, targets,
                      mask, rng=rng, sampler=sampler)


output_loss = jax.jit(_head_loss, static_argnums=6,
                      static_argnames="tie_embeddings")


def _key(seed: int) -> jax.Array:
  return jax.random.PRNGKey(seed)


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def _inputs(n: int = N, v: int = V, seed: int = 0, masked: int = 3):
  """Random h, w, b, targets in 1..V-1 and a mask with `masked` zeros.

  Token 0 has the padding target, masked as the data pipeline does.
  """
  r = np.random.default_rng(seed)
  h = r.normal(size=(n, C)).astype(np.float32)
  w = (r.normal(size=(v, C)) * 0.5).astype(np.float32)
  b = (r.normal(size=(v,)) * 0.1).astype(np.float32)
  targets = r.integers(1, v, size=n).astype(np.int32)
  targets[0] = 0
  mask = np.ones((n,), np.float32)
  mask[:masked] = 0.0
  return tuple(jnp.asarray(x) for x in (h, w, b, targets, mask))


# ---------------------------------------------------------------- full softmax

SHAPES = [(7, 3), (V, 5), (101, 1000), (23, 1)]


@pytest.mark.parametrize("v,chunk", SHAPES)
def test_chunked_loss_matches_naive(v, chunk):
  args = _inputs(v=v)
  got, _ = chunked(*args, chunk)
  want, _ = naive(*args)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("v,chunk", SHAPES)
def test_chunked_gradients_match_naive(v, chunk):
  args = _inputs(v=v)
  _, got = chunked(*args, chunk)
  _, want = naive(*args)
  for g, ref in zip(got, want):
    np.testing.assert_allclose(g, ref, atol=1e-5)


def test_naive_loss_matches_hand_computed_softmax():
  h, w, b, targets, mask = _inputs()
  logits = _np(h) @ _np(w).T + _np(b)
  logits[:, 0] = -np.inf
  lse = np.log(np.exp(logits).sum(1))
  ce = lse - logits[np.arange(N), np.asarray(targets)]
  want = ce[3:].mean()  # Tokens 0..2 masked.
  np.testing.assert_allclose(naive(h, w, b, targets, mask)[0], want,
                             rtol=1e-5)


@pytest.mark.parametrize("use_chunked", [True, False])
def test_padding_id_gets_no_gradient(use_chunked):
  h, w, b, _, mask = _inputs()
  # Even unmasked padding targets must not train id 0.
  targets = jnp.array([0, 0, 1, 2, 3, 36, 5, 6, 7, 8, 0, 9])
  mask = jnp.ones_like(mask)
  args = (h, w, b, targets, mask)
  _, (_, dw, db) = chunked(*args, 5) if use_chunked else naive(*args)
  assert np.all(np.asarray(dw[0]) == 0.0)
  assert float(db[0]) == 0.0
  assert np.any(np.asarray(dw[1:]) != 0.0)


def test_padding_logit_does_not_change_loss():
  h, w, b, targets, mask = _inputs()
  big_pad = jnp.asarray(np.concatenate([[1e4], np.asarray(b)[1:]]),
                        jnp.float32)
  loss, _ = chunked(h, w, b, targets, mask, 5)
  loss_big_pad, _ = chunked(h, w, big_pad, targets, mask, 5)
  assert float(loss) == float(loss_big_pad)


def test_mean_is_over_counted_tokens():
  h, w, b, targets, mask = _inputs()
  per_token = []
  for i in range(3, N):  # One counted token at a time.
    only_i = jnp.asarray(np.arange(N) == i, jnp.float32)
    per_token.append(chunked(h, w, b, targets, only_i, 5)[0])
  mean, _ = chunked(h, w, b, targets, mask, 5)
  np.testing.assert_allclose(mean, np.mean(per_token), rtol=1e-6)


def test_all_masked_gives_zero_loss_and_gradient():
  h, w, b, targets, mask = _inputs()
  loss, grads = chunked(h, w, b, targets, 0 * mask, 5)
  assert float(loss) == 0.0
  assert all(np.all(np.asarray(g) == 0.0) for g in grads)


def test_leading_batch_dims_and_bool_mask_are_accepted():
  h, w, b, targets, mask = _inputs()
  flat, _ = chunked(h, w, b, targets, mask, 5)
  got = jax.jit(chunked_softmax.softmax_cross_entropy,
                static_argnames="chunk_size")(
      h.reshape(3, 4, C), w, b, targets.reshape(3, 4), mask.reshape(3, 4) > 0,
      chunk_size=5)
  np.testing.assert_allclose(got, flat, rtol=1e-6)


def test_bfloat16_hidden_states_close_to_float32():
  h, w, b, targets, mask = _inputs(32, 301, seed=2)
  loss, (dh, dw, _) = chunked(h.astype(jnp.bfloat16), w, b, targets, mask, 64)
  ref, (ref_dh, ref_dw, _) = chunked(h, w, b, targets, mask, 64)
  assert loss.dtype == jnp.float32
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  np.testing.assert_allclose(loss, ref, rtol=2e-2)
  np.testing.assert_allclose(dh.astype(jnp.float32), ref_dh, atol=2e-3)
  np.testing.assert_allclose(dw, ref_dw, atol=2e-3)


def test_chunked_loss_is_jit_compatible():
  # The unjitted forward (its scan compiles on its own) equals the jitted
  # value-and-grad program the training step uses.
  args = _inputs()
  eager = chunked_softmax.softmax_cross_entropy(*args, chunk_size=5)
  loss, grads = chunked(*args, 5)
  np.testing.assert_allclose(loss, eager, rtol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in grads)


def _largest_array(fn, *args) -> int:
  """Element count of the largest array in fn's value-and-grad jaxpr."""
  text = str(jax.make_jaxpr(jax.value_and_grad(fn, argnums=(0, 1, 2)))(*args))
  shapes = re.findall(r"\b(?:f32|bf16|f16|i32|bool)\[([\d,]+)\]", text)
  return max(int(np.prod([int(d) for d in s.split(",")])) for s in shapes)


def test_chunked_loss_never_materialises_all_logits():
  n, v = 48, 4099
  h, w, b, targets, mask = _inputs(n, v)
  tiled = lambda h, w, b: (  # pylint: disable=g-long-lambda
      chunked_softmax.softmax_cross_entropy(h, w, b, targets, mask,
                                            chunk_size=256))
  full = lambda h, w, b: (  # pylint: disable=g-long-lambda
      chunked_softmax.naive_softmax_cross_entropy(h, w, b, targets, mask))
  # The probe does see [N, V] where it exists.
  assert _largest_array(full, h, w, b) >= n * v
  assert _largest_array(tiled, h, w, b) < n * v // 4


# ------------------------------------------------------------------- samplers


@pytest.mark.parametrize("name", sampled_softmax.SAMPLERS)
def test_sampler_probabilities_sum_to_one_and_exclude_padding(name):
  sampler = sampled_softmax.make_sampler(name, 23, np.arange(23) % 5)
  q = np.exp(_np(sampler.log_q))
  assert q[0] == 0.0
  assert np.all(q[1:] > 0)
  np.testing.assert_allclose(q[1:].sum(), 1.0, rtol=1e-6)


def test_log_uniform_is_zipfian_over_ids():
  q = sampled_softmax.sampler_probs("log_uniform", 50)
  ids = np.arange(1, 50)
  np.testing.assert_allclose(q[1:], np.log((ids + 1) / ids) / np.log(50))
  assert np.all(np.diff(q[1:]) < 0)  # id 1 most popular.


def test_unigram_uses_smoothed_counts():
  q = sampled_softmax.sampler_probs("unigram", 4, np.array([100, 10, 0, 30]))
  np.testing.assert_allclose(q, [0.0, 11 / 43, 1 / 43, 31 / 43])


@pytest.mark.parametrize("name", sampled_softmax.SAMPLERS)
def test_sample_frequencies_match_q(name):
  v, n = 20, 200_000
  sampler = sampled_softmax.make_sampler(name, v, (np.arange(v) * 7) % 13)
  ids = np.asarray(sample(sampler, _key(3), n))
  assert ids.min() >= 1 and ids.max() <= v - 1
  observed = np.bincount(ids, minlength=v)[1:]
  expected = n * np.exp(_np(sampler.log_q))[1:]
  chi2 = np.sum((observed - expected)**2 / expected)
  assert chi2 < 60  # 18 degrees of freedom: p ~ 1e-6.


def test_sampler_errors_name_the_problem():
  with pytest.raises(JaxrecError, match="train.sampler"):
    sampled_softmax.make_sampler("zipf", 10)
  with pytest.raises(JaxrecError, match="item_counts"):
    sampled_softmax.make_sampler("unigram", 10)
  with pytest.raises(JaxrecError, match="shape"):
    sampled_softmax.make_sampler("unigram", 10, np.ones(9))


# ------------------------------------------------------------ sampled softmax

SV, S = 15, 6  # Few items, so some samples hit targets.


def _sampled_reference(h, w, b, targets, mask, ids, log_q, s):
  """TF's sampled softmax in float64 numpy, for the samples `ids`."""
  h, w, b, log_q = _np(h), _np(w), _np(b), _np(log_q)
  targets, ids, mask = np.asarray(targets), np.asarray(ids), np.asarray(mask)
  keep = (mask > 0) & (targets > 0)
  h, targets = h[keep], targets[keep]
  log_expected = np.log(s) + log_q
  true = (h * w[targets]).sum(1) + b[targets] - log_expected[targets]
  negatives = h @ w[ids].T + b[ids] - log_expected[ids]
  negatives[ids[None, :] == targets[:, None]] = -np.inf
  logits = np.concatenate([true[:, None], negatives], 1)
  return np.mean(np.log(np.exp(logits).sum(1)) - true)


@pytest.mark.parametrize("name", ["uniform", "log_uniform"])
def test_sampled_loss_matches_log_q_corrected_formula(name):
  args = _inputs(v=SV)
  sampler = sampled_softmax.make_sampler(name, SV)
  ids = sample(sampler, _key(7), S)
  assert set(np.asarray(ids)) & set(np.asarray(args[3][3:]))  # Has hits.
  got, _ = sampled(*args, _key(7), sampler, S)
  want = _sampled_reference(*args, ids, sampler.log_q, S)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sampled_loss_on_tiny_example_by_hand():
  # V = 3, C = 1, h = 1, w = 0: logits are the bias. Uniform q = 1/2, S = 2,
  # so every logit loses log(S q) = log 1 = 0. Target 1: a sample of 1 is
  # an accidental hit, a sample of 2 has logit b[2].
  sampler = sampled_softmax.make_sampler("uniform", 3)
  num_twos = int((np.asarray(sample(sampler, _key(0), 2)) == 2).sum())
  want = np.log(np.exp(0.5) + num_twos * np.exp(2.0)) - 0.5
  got, _ = sampled(jnp.ones((1, 1)), jnp.zeros((3, 1)),
                   jnp.array([0.0, 0.5, 2.0]), jnp.array([1]), jnp.ones(1),
                   _key(0), sampler, 2)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_sampled_accidental_hits_are_removed():
  # With V = 2 every sample is item 1, the only target: all are hits, so the
  # softmax is over the true logit alone and the loss is exactly 0 (it would
  # be log 2 with the hits kept).
  h, w, b, _, mask = _inputs(v=2)
  targets = jnp.ones(N, jnp.int32)
  loss, _ = sampled(h, w, b, targets, mask, _key(0),
                    sampled_softmax.make_sampler("uniform", 2), S)
  assert float(loss) == 0.0


def test_sampled_loss_trains_only_targets_and_samples_never_padding():
  h, w, b, _, mask = _inputs(v=SV)
  targets = jnp.array([0, 0, 1, 1, 2, 2, 3, 3, 1, 2, 0, 3])
  sampler = sampled_softmax.make_sampler("unigram", SV, np.arange(SV))
  loss, (_, dw, db) = sampled(h, w, b, targets, jnp.ones_like(mask), _key(1),
                              sampler, S)
  assert np.isfinite(float(loss))
  assert float(db[0]) == 0.0 and np.all(np.asarray(dw[0]) == 0.0)
  ids = np.asarray(sample(sampler, _key(1), S))
  untouched = sorted(set(range(1, SV)) - set(ids) - {1, 2, 3})
  assert untouched and np.all(np.asarray(db)[untouched] == 0.0)
  assert np.all(np.asarray(db)[ids] != 0.0)


def test_sampled_loss_by_name_equals_prebuilt_sampler():
  args = _inputs(v=SV)
  by_name = jax.jit(functools.partial(
      sampled_softmax.sampled_softmax_cross_entropy, num_samples=S,
      sampler="log_uniform"))(*args, _key(2))
  prebuilt, _ = sampled(*args, _key(2),
                        sampled_softmax.make_sampler("log_uniform", SV), S)
  np.testing.assert_allclose(by_name, prebuilt, rtol=1e-6)


# ----------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_output_loss_full_is_the_chunked_softmax(tie_embeddings):
  args = _inputs()
  got = output_loss(*args, None, TrainConfig(loss="full", loss_chunk=5),
                    tie_embeddings=tie_embeddings)
  np.testing.assert_allclose(got, chunked(*args, 5)[0], rtol=1e-6)


def test_output_loss_sampled_uses_the_given_sampler():
  args = _inputs(v=SV)
  sampler = sampled_softmax.make_sampler("unigram", SV, np.arange(SV))
  cfg = TrainConfig(loss="sampled", num_samples=S, sampler="unigram")
  got = output_loss(*args, _key(4), cfg, sampler)
  np.testing.assert_allclose(got, sampled(*args, _key(4), sampler, S)[0],
                             rtol=1e-6)


def test_output_loss_sampled_unigram_needs_a_prebuilt_sampler():
  cfg = TrainConfig(loss="sampled", sampler="unigram")
  with pytest.raises(JaxrecError, match="item_counts"):
    _head_loss(*_inputs(), _key(0), cfg)


@pytest.mark.parametrize("chunk", [7, 64])
def test_label_smoothing_chunked_matches_naive_value_and_gradients(chunk):
  rng = np.random.default_rng(5)
  h = jnp.asarray(rng.normal(size=(2, 5, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(23, 6)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(23,)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 23, size=(2, 5)), jnp.int32)
  mask = jnp.ones((2, 5))
  chunked = jax.value_and_grad(
      lambda h, w, b: chunked_softmax.softmax_cross_entropy(
          h, w, b, targets, mask, chunk_size=chunk, label_smoothing=0.1),
      argnums=(0, 1, 2))(h, w, b)
  naive = jax.value_and_grad(
      lambda h, w, b: chunked_softmax.naive_softmax_cross_entropy(
          h, w, b, targets, mask, label_smoothing=0.1),
      argnums=(0, 1, 2))(h, w, b)
  np.testing.assert_allclose(chunked[0], naive[0], rtol=1e-5)
  for got, want in zip(chunked[1], naive[1]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  plain = chunked_softmax.softmax_cross_entropy(h, w, b, targets, mask,
                                                chunk_size=chunk)
  assert abs(float(chunked[0]) - float(plain)) > 1e-3  # Smoothing acted.


def test_label_smoothing_is_cross_entropy_against_the_smoothed_target():
  rng = np.random.default_rng(6)
  h = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
  b = jnp.zeros(9)
  targets = jnp.array([1, 4, 8])
  eps = 0.2
  logits = np.array(h @ w.T)
  logits[:, 0] = -np.inf  # Padding is never a class.
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  q = np.full((3, 9), eps / 8)
  q[:, 0] = 0
  q[np.arange(3), targets] += 1 - eps
  expected = -(q[:, 1:] * logp[:, 1:]).sum(1).mean()
  got = chunked_softmax.softmax_cross_entropy(h, w, b, targets, jnp.ones(3),
                                              chunk_size=4,
                                              label_smoothing=eps)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
