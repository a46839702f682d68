"""SkipRec: the policy subtree, straight-through Gumbel gates, the joint
loss, real skipping, growth of the policy rows, and the run/CLI paths."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import cli
from jaxrec import config as config_lib
from jaxrec import models
from jaxrec.errors import JaxrecError
from jaxrec.nn import embedding
from jaxrec.methods.skiprec import attach, policy, skipping, training
from jaxrec.methods.stackrec import growth
from jaxrec.tasks import next_item
from jaxrec.training import state as state_lib

V, C, L, T, B = 31, 16, 6, 12, 9


def make_cfg(**model):
  """A SkipRec config from model fields and SkipRec's version-2 names
  (`skip_lambda`, ...), read through the config upgrade."""
  model.setdefault("embed_dim", C)
  model.setdefault("num_blocks", L)
  model.setdefault("skip", "gumbel")
  model.setdefault("dropout", 0.0)
  cfg = config_lib.from_dict({"version": 2, "model": model})
  return cfg.fit_data(V, T, None).validate()


def opts(cfg):
  return cfg.method("skiprec")


def gated(params, cfg, x, gates):
  return models.hidden_states(params, cfg, x, sides={"skiprec": gates})


def init(cfg, seed=0):
  """Fresh params with non-zero alphas, so every block changes x."""
  params = models.init_params(cfg, jax.random.key(seed))
  params["blocks"]["alpha"] = params["blocks"]["alpha"] + 0.5
  return params


def ids(seed=1, batch=B):
  x = jax.random.randint(jax.random.key(seed), (batch, T), 1, V)
  lengths = jnp.arange(batch) % (T - 2) + 2  # Left padding of every length.
  return jnp.where(jnp.arange(T)[None] >= T - lengths[:, None], x, 0)


def batch_of(seed=1):
  x = ids(seed)
  nxt = jax.random.randint(jax.random.key(seed + 7), (B, 1), 1, V)
  row = jnp.concatenate([x, nxt], axis=1)
  return {"inputs": row[:, :-1], "targets": row[:, 1:]}


# --------------------------------------------------------- policy and gates


def test_policy_is_its_own_subtree_with_a_head_row_per_block():
  params = init(make_cfg(skip_policy_dim=8))
  pol = params["skiprec"]
  assert pol["embedding"].shape == (V, 8)
  assert pol["blocks"]["conv1"]["kernel"].shape[0] == 2
  assert pol["head"]["kernel"].shape == (L, 8, 2)
  assert pol["head"]["bias"].shape == (L, 2)
  cfg = make_cfg(skip_policy_dim=8)
  z = policy.logits(pol, cfg.model, opts(cfg), ids())
  assert z.shape == (B, L, 2)


def test_training_gates_are_hard_one_hot_forward():
  z = jax.random.normal(jax.random.key(0), (B, L, 2))
  gates = policy.gumbel_gates(z, jax.random.key(1), tau=10.0)
  assert gates.shape == (L, B)
  assert set(np.unique(np.asarray(gates))) <= {0.0, 1.0}


def test_training_gates_follow_softmax_gradient_of_the_temperature():
  z = jax.random.normal(jax.random.key(0), (B, L, 2))
  key = jax.random.key(1)

  def soft_keep(z, tau):
    noisy = z + jax.random.gumbel(key, z.shape)
    return jax.nn.softmax(noisy / tau, axis=-1)[..., policy.KEEP].T.sum()

  for tau in (1.0, 10.0):
    got = jax.grad(lambda z: policy.gumbel_gates(z, key, tau).sum())(z)
    np.testing.assert_allclose(got, jax.grad(soft_keep)(z, tau), atol=1e-6)


def test_gumbel_samples_keep_with_the_softmax_probability():
  z = jnp.zeros((4000, 1, 2)).at[..., policy.KEEP].set(1.0)
  gates = policy.gumbel_gates(z, jax.random.key(3), tau=10.0)
  assert abs(float(gates.mean()) - float(jax.nn.sigmoid(1.0))) < 0.03


def test_inference_gates_are_the_argmax_without_noise():
  cfg = make_cfg()
  params = init(cfg)
  params["skiprec"]["head"]["bias"] = jnp.zeros((L, 2)).at[::2, 1].set(5.0)
  g1 = policy.inference_gates(params, cfg, ids())
  g2 = policy.inference_gates(params, cfg, ids())
  np.testing.assert_array_equal(g1, g2)
  z = policy.logits(params["skiprec"], cfg.model, opts(cfg), ids())
  np.testing.assert_array_equal(
      g1, (z[..., 1] > z[..., 0]).astype(np.float32).T)
  assert set(np.asarray(g1[::2]).ravel()) == {1.0}


def test_confine_flag_reproduces_the_official_sigmoid_trap():
  cfg = make_cfg(skip_confine=True)
  params = init(cfg)
  params["skiprec"]["head"]["bias"] = jnp.full((L, 2), 50.0).at[:, 0].set(-50)
  z = policy.logits(params["skiprec"], cfg.model, opts(cfg), ids())
  keep = jax.nn.softmax(z, -1)[..., 1]
  assert float(keep.max()) <= 0.7311 and float(keep.min()) >= 0.268


# ------------------------------------------------- gated backbone and loss


def test_a_skipped_block_is_the_identity_and_kept_blocks_unchanged():
  cfg = make_cfg()
  params = init(cfg)
  x = ids()
  gates = jnp.ones((L, B)).at[2].set(0.0)
  got = gated(params, cfg, x, gates)
  no_block_2 = dict(params, blocks=dict(
      params["blocks"], alpha=params["blocks"]["alpha"].at[2].set(0.0)))
  want = gated(no_block_2, cfg, x, jnp.ones((L, B)))
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_gradient_reaches_the_policy_through_the_gates():
  cfg = make_cfg()
  params = init(cfg)
  grads = jax.grad(lambda p: next_item.loss(p, cfg, batch_of(),
                                          jax.random.key(0)))(params)
  head = grads["skiprec"]["head"]
  assert float(jnp.abs(head["kernel"]).sum()) > 0
  assert float(jnp.abs(head["bias"]).sum()) > 0
  assert float(jnp.abs(grads["skiprec"]["embedding"]).sum()) > 0
  assert float(jnp.abs(grads["blocks"]["conv1"]["kernel"]).sum()) > 0


def test_usage_penalty_adds_lambda_times_mean_gate():
  cfg0, cfg1 = make_cfg(), make_cfg(skip_lambda=0.7)
  params = init(cfg0)
  key = jax.random.key(4)
  diff = (next_item.loss(params, cfg1, batch_of(), key)
          - next_item.loss(params, cfg0, batch_of(), key))
  # The same forward pass the loss made (its model key), so the same gates.
  _, aux = models.forward(params, cfg0, batch_of()["inputs"], train=True,
                          rng=jax.random.split(key)[0])
  usage = aux["skiprec"]["gates"].mean()
  assert 0 < float(usage) <= 1
  np.testing.assert_allclose(diff, 0.7 * usage, rtol=1e-5)


def test_policy_never_reads_the_targets_it_is_trained_on():
  cfg = make_cfg()
  params = init(cfg)
  inputs = ids()
  read, scored = training.split_masks(opts(cfg), inputs)
  z = policy.logits(params["skiprec"], cfg.model, opts(cfg), inputs, read)
  # Change every input at or after the first scored position (those are
  # the scored targets, shifted by one): the logits must not move.
  first = jnp.argmax(scored, axis=1)[:, None]
  later = jnp.arange(T)[None] > first
  changed = jnp.where(later & (inputs != 0), (inputs % (V - 1)) + 1, inputs)
  z2 = policy.logits(params["skiprec"], cfg.model, opts(cfg), changed,
                     training.split_masks(opts(cfg), changed)[0])
  np.testing.assert_allclose(z, z2, atol=1e-6)
  assert bool((scored & (inputs != 0)).any(1).all())


def test_rl_variant_trains_backbone_and_policy():
  cfg = make_cfg(skip="rl", skip_rl_penalty=0.5)
  params = init(cfg)
  grads = jax.grad(lambda p: next_item.loss(p, cfg, batch_of(),
                                          jax.random.key(2)))(params)
  assert float(jnp.abs(grads["blocks"]["conv1"]["kernel"]).sum()) > 0
  assert np.isfinite(float(jnp.abs(grads["skiprec"]["head"]["kernel"]).sum()))


def mean_keep_probability_after_rl(penalty, steps=40):
  """The mean keep probability over a batch after `steps` of the RL
  variant (Adam) from one initialisation."""
  import optax  # pylint: disable=import-outside-toplevel
  cfg = make_cfg(skip="rl", skip_rl_penalty=penalty)
  params = init(cfg)
  opt = optax.adam(1e-2)
  grad = jax.jit(jax.grad(lambda p, key: next_item.loss(p, cfg, batch_of(),
                                                       key)))
  state = opt.init(params)
  for step in range(steps):
    updates, state = opt.update(grad(params, jax.random.key(step)), state)
    params = optax.apply_updates(params, updates)
  z = policy.logits(params["skiprec"], cfg.model, opts(cfg), ids())
  return float(jax.nn.softmax(z, axis=-1)[..., policy.KEEP].mean())


def test_a_larger_rl_penalty_makes_the_policy_keep_fewer_blocks():
  free, taxed = (mean_keep_probability_after_rl(p) for p in (0.0, 2.0))
  assert taxed < free - 0.1, (taxed, free)


@pytest.mark.parametrize("bad,msg", [
    ({"skip": "always"}, "methods.skiprec.mode="),
    ({"skip_tau": 0.0}, "methods.skiprec.tau="),
    ({"skip_lambda": -1.0}, "methods.skiprec.lam="),
])
def test_bad_skip_options_fail_in_one_line_naming_the_option(bad, msg):
  with pytest.raises(JaxrecError, match=msg) as e:
    make_cfg(**bad)
  assert "\n" not in str(e.value)


# ------------------------------------------------------------ real skipping


@pytest.mark.parametrize("mode", ["cond", "compact"])
@pytest.mark.parametrize("batch", [1, B])
def test_real_skipping_equals_the_masked_pass(mode, batch):
  cfg = make_cfg(dilations=(1, 2))
  params = init(cfg)
  x = ids(batch=batch)
  gates = jax.random.bernoulli(jax.random.key(5), 0.5, (L, batch))
  gates = gates.at[1].set(False).at[3].set(True).astype(jnp.float32)
  run = jax.jit(lambda p, g, m: skipping.hidden_states(p, cfg, x, m, g),
                static_argnums=2)
  np.testing.assert_allclose(run(params, gates, mode),
                             run(params, gates, "masked"), atol=1e-5)


def test_compaction_computes_only_the_keeping_rows():
  calls = []

  def block(p, x, static, inputs):
    calls.append(x.shape[0])  # Traced once per bucket branch.
    return x + p * inputs[:, None]

  run = skipping.compacted(block, lambda g: g, lambda _, g: g, buckets=(2, 8))
  x = jnp.arange(8.0)[:, None] * jnp.ones((8, 3))
  gate = jnp.zeros(8).at[5].set(1.0)
  out = run(1.0, x, None, gate)
  np.testing.assert_allclose(out, x.at[5].add(1.0))
  assert sorted(calls) == [2, 8]
  jaxpr = str(jax.make_jaxpr(lambda x, g: run(1.0, x, None, g))(x, gate))
  assert "cond" in jaxpr  # A switch: only the chosen bucket runs.


# ------------------------------------------------------------------ growth


def test_policy_head_rows_follow_the_stackrec_index_map():
  cfg = make_cfg(num_blocks=4)
  params = init(cfg)
  for method in ("adjacent", "cross"):
    deep, deep_cfg = growth.stack(params, cfg, method, "preserve",
                                  rng=jax.random.key(0))
    idx = np.asarray(growth.index_map(method, 4))
    assert opts(deep_cfg).mode == "gumbel" and deep_cfg.model.num_blocks == 8
    for leaf in ("kernel", "bias"):
      np.testing.assert_array_equal(deep["skiprec"]["head"][leaf],
                                    params["skiprec"]["head"][leaf][idx])
    np.testing.assert_array_equal(deep["skiprec"]["embedding"],
                                  params["skiprec"]["embedding"])
    models.check_params(deep, deep_cfg)


def test_grown_policy_gives_fresh_blocks_fresh_rows():
  cfg = make_cfg(num_blocks=4)
  params = init(cfg)
  deep, deep_cfg = growth.stack(params, cfg, "random_top", "full",
                                rng=jax.random.key(0))
  fresh = models.init_params(deep_cfg, jax.random.key(0))["skiprec"]["head"]
  np.testing.assert_array_equal(deep["skiprec"]["head"]["kernel"][:4],
                                params["skiprec"]["head"]["kernel"])
  np.testing.assert_array_equal(deep["skiprec"]["head"]["kernel"][4:],
                                fresh["kernel"][4:])


# ------------------------------------------------- starting from a backbone


def test_add_policy_keeps_the_backbone_and_copies_its_embedding():
  plain = config_lib.from_dict({"model": {"embed_dim": C, "num_blocks": L}})
  plain = plain.fit_data(V, T, None).validate()
  params = models.init_params(plain, jax.random.key(0))
  new, cfg = attach.add_policy(params, plain, jax.random.key(1),
                               mode="gumbel", lam=0.1)
  models.check_params(new, cfg)
  assert opts(cfg).lam == 0.1
  np.testing.assert_array_equal(new["skiprec"]["embedding"],
                                params["item_embedding"]["embedding"])
  for name in ("item_embedding", "blocks", "head"):
    assert new[name] is params[name]


@pytest.mark.slow  # Two training runs: about 20 s on 2 cores.
def test_skiprec_trains_from_a_run_evaluates_and_inspects_through_the_cli(
    tmp_path, capsys):
  base, run = str(tmp_path / "base"), str(tmp_path / "skip")
  common = ["--data", "synthetic:tiny", "--cache-dir", str(tmp_path / "c"),
            "--batch-size", "16", "--max-len", "10", "--quiet"]
  assert cli.main(["train", "--out", base, "--num-blocks", "4",
                   "--embed-dim", "8", "--steps", "2", "--eval-every", "2",
                   *common]) == 0
  assert cli.main(["train", "--out", run, "--init-from", base,
                   "--skip", "gumbel", "--skip-lambda", "0.5", "--steps", "2",
                   "--eval-every", "2", *common]) == 0
  _, cfg, _ = state_lib.load_params(run)
  assert opts(cfg).mode == "gumbel" and opts(cfg).lam == 0.5
  with open(os.path.join(run, "metrics.json"), encoding="utf-8") as f:
    metrics = json.load(f)
  assert 0.0 <= metrics["block_usage"]["test"] <= 1.0
  capsys.readouterr()
  assert cli.main(["eval", "--ckpt", run]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["block_usage"]["test"] == pytest.approx(
      metrics["block_usage"]["test"])
  assert cli.main(["inspect", run]) == 0
  text = capsys.readouterr().out
  assert "skiprec/head/kernel" in text and "skiprec total" in text
  assert "op=attach" in text and "method=skiprec" in text


def test_attach_checkpoint_saves_a_start_that_train_init_from_reads(
    tmp_path):
  base, start = str(tmp_path / "base"), str(tmp_path / "start")
  plain = config_lib.from_dict({"model": {"embed_dim": 8, "num_blocks": 2}})
  plain = plain.fit_data(V, T, None).validate()
  from jaxrec.surgery.checkpoint import save_start_checkpoint
  save_start_checkpoint(base, plain, models.init_params(plain,
                                                        jax.random.key(0)),
                        "fingerprint", [])
  cfg = attach.attach_checkpoint(base, start, mode="gumbel", lam=0.2)
  params, loaded, meta = state_lib.load_params(start)
  assert opts(loaded).mode == "gumbel" and opts(loaded).lam == 0.2
  assert loaded == cfg and meta["lineage"][-1]["op"] == "add_policy"
  assert meta["data_fingerprint"] == "fingerprint"
  models.check_params(params, loaded)


# ------------------------------------------------------------- experiment


@pytest.mark.slow
def test_skiprec_experiment_compares_equal_budgets_and_the_policys_depth(
    tmp_path, monkeypatch):
  import importlib
  import sys
  monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..",
                                           "experiments"))
  module = importlib.import_module("skiprec")
  monkeypatch.setattr(module, "CPU", dict(
      module.CPU, users=40, items=30, num_blocks=4, embed_dim=8, max_len=12,
      batch_size=16, base_steps=4, tune_steps=2, eval_every=2,
      lambdas=(1.0,), rl_penalty=None, infer_batch=8))
  monkeypatch.setattr(sys, "argv", ["skiprec.py", "--out", str(tmp_path),
                                    "--seeds", "0"])
  module.main()
  with open(tmp_path / "results.json", encoding="utf-8") as f:
    results = json.load(f)
  arms = results["arms"]
  assert set(arms) == {"full", "skip_l1", "static_l1"}
  assert {arm["steps"] for arm in arms.values()} == {6}  # Base 4 + 2 each.
  assert all(arm["infer_ms"]["median"] > 0 for arm in arms.values())
  pol = results["policy"]["skip_l1"]["seeds"][0]
  assert set(pol["usage_by_group"]) == {"short users", "long users"}
  depth = results["static_depth"]["static_l1"][0]
  assert depth["usage"] == pytest.approx(pol["usage"])
  assert depth["depth"] == max(1, round(pol["usage"] * 4))
  (claim,) = results["claims"]
  assert claim["arm"] == "skip_l1" and "vs_static" in claim
  assert (tmp_path / "ndcg_vs_usage.png").stat().st_size > 0
  assert "| skip_l1 |" in (tmp_path / "summary.md").read_text()


def test_a_skiprec_run_is_served_and_exported_with_its_inference_gates(
    tmp_path):
  """predict and export run the policy's argmax gates (the model's own
  inference program), and agree."""
  from jaxrec import serving  # pylint: disable=import-outside-toplevel
  run = os.path.join(os.path.dirname(__file__), "fixtures", "v2_runs",
                     "skiprec")
  predictor = serving.Predictor(run)
  items = list(predictor.vocab.items[1:])
  history = items[3:12]
  [pred] = predictor.topk([history], k=5)
  path = str(tmp_path / "skip.zip")
  serving.export_topk(run, path, k=5)
  fn, vocab, spec = serving.load_exported(path)
  ids = np.zeros((1, spec["max_len"]), np.int32)
  ids[0, -len(history):] = vocab.encode_items(history)[0]
  got, scores = fn.call(ids)
  assert [str(vocab.items[i]) for i in np.asarray(got)[0]] == pred.items
  np.testing.assert_allclose(np.asarray(scores)[0], pred.scores, rtol=1e-5)


def test_a_policy_added_to_a_banded_backbone_starts_from_its_vectors():
  cfg = config_lib.from_dict({"model": {
      "embed_dim": C, "num_blocks": 2, "embedding": "adaptive",
      "num_bands": 2, "band_cutoffs": [10]}})
  cfg = cfg.fit_data(V, T, None).validate()
  params = models.init_params(cfg, jax.random.key(0))
  new, _ = attach.add_policy(params, cfg, jax.random.key(1), mode="gumbel")
  every = jnp.arange(V)
  np.testing.assert_allclose(
      new["skiprec"]["embedding"][1:],
      embedding.lookup(params, cfg.model, every)[1:], rtol=1e-6)
