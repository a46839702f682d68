"""CpRec: frequency bands, the adaptive embedding, the tree softmax (exact
log-probabilities, loss, early-exit top-N) and the layer-sharing schemes."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import cli, method_api, serving
from jaxrec import config as config_lib
from jaxrec import models
from jaxrec.errors import JaxrecError
from jaxrec.heads import tree_softmax as ts
from jaxrec.nn import bands, embedding
from jaxrec.methods.cprec import factorise, sharing
from jaxrec.methods.cprec.config import CpRecConfig
from jaxrec.methods.stackrec import growth
from jaxrec import ranking

V, C = 61, 16
# Long-tailed training counts in id order, as the pipeline makes them.
COUNTS = np.r_[0, np.sort(np.random.default_rng(0).zipf(1.3, V - 1))[::-1]]
SCHEMES = ("cross_layer", "cross_block", "adjacent_layer", "adjacent_block")


def make_cfg(head="tree_softmax", head_options=None, **model):
  """Model fields, and CpRec's sharing under its version-2 names (`share`,
  `share_leaves`, ...), read through the config upgrade."""
  model.setdefault("embed_dim", C)
  model.setdefault("num_blocks", 4)
  model.setdefault("num_bands", 4)
  raw = {"version": 2, "model": model,
         "head": {"name": head, **(head_options or {})}}
  cfg = config_lib.from_dict(raw)
  return cfg.fit_data(V, 8, COUNTS).validate()


def init(cfg, seed=0, alpha=0.5):
  """Fresh params with non-zero residual gates, so blocks do something."""
  params = models.init_params(cfg, jax.random.key(seed))
  return jax.tree_util.tree_map_with_path(
      lambda p, a: a + alpha if jax.tree_util.keystr(p).endswith(
          "['alpha']") else a, params)


def hidden(batch=23, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, C)) * 3.0


def reference_log_probs(params, cfg, h):
  """Brute force, written from the paper's formula: [B, V] log p."""
  head = params["head"]
  lay = ts.layout(cfg.model, cfg.head)
  logits = h @ head["head_kernel"].T + head["head_bias"]
  logits = logits.at[:, 0].set(-jnp.inf)
  hl = logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
  out = [hl[:, :lay.sizes[0]]]
  for j in range(1, len(lay.sizes)):
    band = head[f"band_{j}"]
    z = h @ band["projection"] @ band["kernel"].T + band["bias"]
    z = z - jax.scipy.special.logsumexp(z, axis=1, keepdims=True)
    out.append(hl[:, lay.sizes[0] + j - 1][:, None] + z)
  return jnp.concatenate(out, axis=1)


# ------------------------------------------------------------------ bands


def test_default_cutoffs_put_80_percent_of_training_events_in_the_head():
  cut = bands.cutoffs_from_counts(COUNTS, 4)
  share = COUNTS[1:cut[0]].sum() / COUNTS.sum()
  before = COUNTS[1:cut[0] - 1].sum() / COUNTS.sum()
  assert share >= 0.8 > before
  assert list(cut) == sorted(set(cut)) and 1 < cut[0] and cut[-1] < V


def test_cutoffs_as_shares_or_as_item_ids_give_the_same_model():
  by_share = make_cfg(band_shares=[0.5, 0.7, 0.9])
  by_id = make_cfg(band_cutoffs=list(by_share.model.band_cutoffs))
  assert by_share.model.band_cutoffs == by_id.model.band_cutoffs


@pytest.mark.parametrize("cutoffs", [[5, 3, 9], [1, 3, 9], [5, 9, V], [5, 9]])
def test_bad_cutoffs_are_one_line_errors(cutoffs):
  with pytest.raises(JaxrecError, match="model.band_cutoffs"):
    make_cfg(band_cutoffs=cutoffs)


@pytest.mark.parametrize("option, value", [
    ("band_dims", [16, 4, 0, 1]), ("band_dims", [16, 4]),
    ("band_shares", [0.9, 0.5]), ("num_bands", 0)])
def test_bad_band_options_are_one_line_errors(option, value):
  with pytest.raises(JaxrecError, match=f"model.{option}"):
    make_cfg(**{option: value})


def test_band_of_maps_ids_to_bands_head_first():
  got = bands.band_of(jnp.array([0, 1, 4, 5, 9, 10, 60]), (5, 10))
  np.testing.assert_array_equal(got, [0, 0, 0, 1, 1, 2, 2])


# ------------------------------------------------------ adaptive embedding


def test_adaptive_embedding_reads_each_ids_band_row_through_its_projection():
  cfg = make_cfg(head="softmax", embedding="adaptive")
  params = init(cfg)
  table = params["item_embedding"]
  ids = jnp.arange(V)
  got = embedding.lookup(params, cfg.model, ids)
  for j, (start, size) in enumerate(embedding.band_ranges(cfg.model)):
    band = table[f"band_{j}"]
    want = band["embedding"] @ band["projection"]
    np.testing.assert_allclose(got[start:start + size], want, rtol=1e-5,
                               atol=1e-6)
  dims = [table[f"band_{j}"]["embedding"].shape[1] for j in range(4)]
  assert dims == [C, C // 4, C // 16, 1]


def test_adaptive_embedding_keeps_padding_out_of_the_stack():
  cfg = make_cfg(head="softmax", embedding="adaptive")
  params = init(cfg)
  padded = models.hidden_states(params, cfg, jnp.array([[0, 0, 3, 50]]))
  short = models.hidden_states(params, cfg, jnp.array([[3, 50]]))
  # Left padding reads as the causal convs' own zero padding.
  np.testing.assert_allclose(padded[:, 2:], short, rtol=1e-5, atol=1e-5)


def test_tied_softmax_with_adaptive_embedding_is_refused():
  raw = {"model": {"embedding": "adaptive"},
         "head": {"name": "softmax", "tie_embeddings": True}}
  with pytest.raises(JaxrecError, match="tie_embeddings"):
    config_lib.from_dict(raw).validate()


# ------------------------------------------------------------ tree softmax


def test_tree_softmax_is_a_normalised_distribution():
  cfg = make_cfg()
  full = ts.full_log_probs(init(cfg), cfg, hidden())
  np.testing.assert_allclose(jnp.exp(full[:, 1:]).sum(axis=1), 1.0,
                             rtol=1e-5)


def test_tile_scores_equal_the_brute_force_log_probabilities():
  cfg = make_cfg()
  cfg = cfg.replace(train=dataclasses.replace(cfg.train, loss_chunk=7))
  params, h = init(cfg), hidden()
  ctx = ts.prepare(params, cfg, h)
  tiles = [ts.tile_scores(params, cfg, ctx, jnp.array(s), 7)
           for s in range(0, V, 7)]
  got = jnp.concatenate(tiles, axis=1)[:, 1:V]
  want = reference_log_probs(params, cfg, h)[:, 1:]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_full_ranking_ranks_equal_the_brute_force_ranks():
  cfg = make_cfg()
  params, h = init(cfg), hidden()
  targets = jax.random.randint(jax.random.key(5), (h.shape[0],), 1, V)
  ctx = ts.prepare(params, cfg, h)
  got = ranking.target_ranks(
      lambda s, n: ts.tile_scores(params, cfg, ctx, s, n), V, targets,
      tile=16)
  ref = np.asarray(reference_log_probs(params, cfg, h))[:, 1:]
  t = np.asarray(targets)
  own = ref[np.arange(len(t)), t - 1]
  want = (ref >= own[:, None]).sum(axis=1) - 1  # Ties against the target.
  np.testing.assert_array_equal(got, want)


def test_item_scores_equal_the_brute_force_log_probabilities():
  cfg = make_cfg()
  params, h = init(cfg), hidden()
  ids = jax.random.randint(jax.random.key(6), (h.shape[0], 9), 1, V)
  got = ts.item_scores(params, cfg, ts.prepare(params, cfg, h), ids)
  want = jnp.take_along_axis(reference_log_probs(params, cfg, h), ids, 1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tail_dims_give_the_output_tables_their_own_widths():
  cfg = make_cfg(embedding="adaptive", band_dims=[16, 8, 4, 2],
                 head_options={"tail_dims": [2, 1, 1]})
  params, h = init(cfg), hidden()
  sizes = bands.band_sizes(cfg.model.band_cutoffs, V)
  for j, (d_in, d_out) in enumerate(zip([8, 4, 2], [2, 1, 1]), start=1):
    assert params["item_embedding"][f"band_{j}"]["embedding"].shape == (
        sizes[j], d_in)
    assert params["head"][f"band_{j}"]["kernel"].shape == (sizes[j], d_out)
    assert params["head"][f"band_{j}"]["projection"].shape == (C, d_out)
  np.testing.assert_allclose(ts.full_log_probs(params, cfg, h)[:, 1:],
                             reference_log_probs(params, cfg, h)[:, 1:],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail_dims", [[4, 2], [4, 0, 1]])
def test_tail_dims_that_do_not_fit_the_bands_are_one_line_errors(tail_dims):
  with pytest.raises(JaxrecError, match="head.tail_dims"):
    make_cfg(head_options={"tail_dims": tail_dims})


@pytest.mark.parametrize("chunk, tail_dims", [(3, []), (64, []), (3, [3, 2, 1])])
def test_loss_and_its_gradient_equal_the_brute_force_nll(chunk, tail_dims):
  cfg = make_cfg(head="tree_softmax", head_options={"tail_dims": tail_dims})
  cfg = cfg.replace(head=dataclasses.replace(cfg.head, token_chunk=chunk))
  params, h = init(cfg), hidden(batch=30)
  targets = jax.random.randint(jax.random.key(7), (30,), 0, V)
  mask = jnp.arange(30) % 4 != 0

  def ref_loss(p):
    lp = jnp.take_along_axis(reference_log_probs(p, cfg, h),
                             targets[:, None], 1)[:, 0]
    w = mask & (targets > 0)
    return -jnp.sum(jnp.where(w, lp, 0.0)) / jnp.sum(w)

  loss = lambda p: ts.loss(p, cfg, h, targets, mask)
  np.testing.assert_allclose(loss(params), ref_loss(params), rtol=1e-5)
  got, want = jax.grad(loss)(params), jax.grad(ref_loss)(params)
  for g, w in zip(jax.tree.leaves(got["head"]), jax.tree.leaves(want["head"])):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_head_targets_leave_the_tail_bands_without_gradient():
  cfg = make_cfg()
  params, h = init(cfg), hidden(batch=12)
  targets = jnp.full((12,), 1)  # All in the head band.
  g = jax.grad(lambda p: ts.loss(p, cfg, h, targets,
                                 jnp.ones(12, bool)))(params)["head"]
  for j in (1, 2, 3):
    assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(
        g[f"band_{j}"]))


def test_tree_softmax_refuses_the_sampled_loss():
  raw = {"head": {"name": "tree_softmax"}, "train": {"loss": "sampled"}}
  with pytest.raises(JaxrecError, match="tree_softmax"):
    config_lib.from_dict(raw).validate()


# ------------------------------------------------------ early-exit top-N


@pytest.mark.parametrize("n", [5, 10, 20])
def test_early_exit_top_n_equals_the_full_computation(n):
  cfg = make_cfg()
  params, h = init(cfg), hidden(batch=40)
  scores, ids, _ = ts.top_n(params, cfg, h, n)
  full_scores, full_ids, scored = ts.top_n(params, cfg, h, n,
                                           early_exit=False)
  assert bool(scored.all())
  np.testing.assert_array_equal(ids, full_ids)
  np.testing.assert_array_equal(scores, full_scores)
  ref = reference_log_probs(params, cfg, h).at[:, 0].set(-jnp.inf)
  np.testing.assert_array_equal(ids, jax.lax.top_k(ref, n)[1])


def test_early_exit_skips_bands_that_cannot_reach_the_top_n_and_stays_exact():
  cfg = make_cfg(band_cutoffs=[30, 40, 50])  # 29 head items: tau is finite.
  params, h = init(cfg), hidden(batch=40)
  lay = ts.layout(cfg.model, cfg.head)
  # Push two band tokens far down: their items cannot reach any top 20.
  bias = params["head"]["head_bias"]
  params["head"]["head_bias"] = bias.at[lay.sizes[0]:lay.sizes[0] + 2].add(
      -30.0)
  _, ids, scored = ts.top_n(params, cfg, h, 20)
  _, full_ids, _ = ts.top_n(params, cfg, h, 20, early_exit=False)
  assert scored.shape == (40, 3)
  assert not scored[:, :2].any()
  np.testing.assert_array_equal(ids, full_ids)


def test_early_exit_searches_a_band_only_for_the_rows_it_can_reach():
  cfg = make_cfg(band_cutoffs=[30, 40, 50])
  params, h = init(cfg), hidden(batch=40)
  lay = ts.layout(cfg.model, cfg.head)
  full = ts.full_log_probs(params, cfg, h).at[:, 0].set(-jnp.inf)
  tau = jax.lax.top_k(full[:, :lay.sizes[0]], 20)[0][:, -1]
  _, _, scored = ts.top_n(params, cfg, h, 20)
  for j, (lo, hi) in enumerate(zip((30, 40, 50), (40, 50, V))):
    band_best = full[:, lo:hi].max(axis=1)
    np.testing.assert_array_equal(scored[:, j], np.asarray(band_best >= tau))


@pytest.mark.parametrize("batch", [1, 3, 17, 40])
def test_early_exit_is_exact_bit_for_bit_when_only_some_rows_search_a_band(
    batch):
  cfg = make_cfg(band_cutoffs=[30, 40, 50])
  params, h = init(cfg), hidden(batch=batch, seed=batch)
  lay = ts.layout(cfg.model, cfg.head)
  # Raise the band tokens until some rows, not all, reach each band.
  params["head"]["head_bias"] = params["head"]["head_bias"].at[
      lay.sizes[0]:].add(2.0)
  scores, ids, scored = ts.top_n(params, cfg, h, 20)
  full_scores, full_ids, _ = ts.top_n(params, cfg, h, 20, early_exit=False)
  if batch >= 17:
    assert 0 < scored.mean() < 1
  np.testing.assert_array_equal(ids, full_ids)
  np.testing.assert_array_equal(scores, full_scores)


def test_metrics_from_the_early_exit_top_20_equal_full_ranking_metrics():
  cfg = make_cfg()
  params, h = init(cfg), hidden(batch=64, seed=3)
  targets = jax.random.randint(jax.random.key(8), (64,), 1, V)
  ctx = ts.prepare(params, cfg, h)
  full = ranking.target_ranks(
      lambda s, n: ts.tile_scores(params, cfg, ctx, s, n), V, targets)
  early = ts.top_n_ranks(params, cfg, h, targets, 20)
  assert ranking.metrics_from_ranks(np.asarray(early)) == \
      ranking.metrics_from_ranks(np.asarray(full))


# ------------------------------------------------ logit-skipping top-N


def spread_biases(params, cfg, seed=4):
  """Band biases spread like a trained model's, and tokens raised, so the
  bound rules out some rows and not others."""
  lay = ts.layout(cfg.model, cfg.head)
  keys = jax.random.split(jax.random.key(seed), lay.num_tail)
  head = params["head"]
  for j, key in enumerate(keys, start=1):
    band = head[f"band_{j}"]
    band["bias"] = jax.random.normal(key, band["bias"].shape) * 2.0
  head["head_bias"] = head["head_bias"].at[lay.sizes[0]:].add(1.0)
  return params


@pytest.mark.parametrize("clusters", [1, 3, 100])
def test_a_band_bound_is_never_below_the_bands_best_item(clusters):
  cfg = make_cfg(band_cutoffs=[30, 40, 50])
  params = spread_biases(init(cfg), cfg)
  h = hidden(batch=64, seed=5)
  lay = ts.layout(cfg.model, cfg.head)
  index = ts.search_index(params, cfg, clusters=clusters)
  full = ts.full_log_probs(params, cfg, h)
  hl = ts.head_log_probs(params["head"], h)
  for j, (lo, hi) in enumerate(zip((30, 40, 50), (40, 50, V)), start=1):
    bound = ts.band_bound(params["head"][f"band_{j}"], index[j - 1], h,
                          hl[:, lay.sizes[0] + j - 1])
    assert bool((bound >= full[:, lo:hi].max(axis=1)).all())


@pytest.mark.parametrize("n,batch", [(5, 40), (20, 17), (20, 1)])
def test_logit_skipping_top_n_gives_the_full_computations_items(n, batch):
  cfg = make_cfg(band_cutoffs=[30, 40, 50])
  params = spread_biases(init(cfg), cfg)
  h = hidden(batch=batch, seed=batch)
  index = ts.search_index(params, cfg, clusters=4)
  scores, ids, searched = ts.top_n(params, cfg, h, n, index=index)
  full_scores, full_ids, _ = ts.top_n(params, cfg, h, n, early_exit=False)
  np.testing.assert_array_equal(ids, full_ids)
  np.testing.assert_allclose(scores, full_scores, rtol=1e-6, atol=1e-6)
  assert searched.shape == (batch, 3)


def test_logit_skipping_computes_a_band_only_where_its_bound_reaches_tau():
  cfg = make_cfg(band_cutoffs=[30, 40, 50])
  params = spread_biases(init(cfg), cfg)
  lay = ts.layout(cfg.model, cfg.head)
  h = hidden(batch=40, seed=6)
  index = ts.search_index(params, cfg, clusters=4)
  b = ts._bound_jit(params, cfg, index, h, 20)  # pylint: disable=protected-access
  _, _, searched = ts.top_n(params, cfg, h, 20, index=index)
  np.testing.assert_array_equal(
      searched, np.asarray(b.bound >= b.scores[:, -1:]))
  assert 0 < searched.mean() < 1  # Some rows ruled out, not all.
  # A band whose token is pushed far down is never searched.
  params["head"]["head_bias"] = params["head"]["head_bias"].at[
      lay.sizes[0]].add(-40.0)
  _, _, searched = ts.top_n(params, cfg, h, 20, index=index)
  assert not searched[:, 0].any()


def test_an_index_of_another_layout_is_refused_in_one_line():
  cfg = make_cfg(band_cutoffs=[30, 40, 50])
  params = init(cfg)
  index = ts.search_index(params, cfg)[:2]
  with pytest.raises(JaxrecError, match="the index has 2 bands"):
    ts.top_n(params, cfg, hidden(batch=4), 5, index=index)


# ----------------------------------------------------------------- sharing


@pytest.mark.parametrize("leaves", ["all", "convs"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_untying_a_shared_model_preserves_its_function(scheme, leaves):
  cfg = make_cfg(head="softmax", share=scheme, share_leaves=leaves)
  params = init(cfg)
  ids = jax.random.randint(jax.random.key(2), (3, 8), 0, V)
  untied, untied_cfg = sharing.untie(params, cfg)
  models.check_params(untied, untied_cfg)
  np.testing.assert_array_equal(models.hidden_states(params, cfg, ids),
                                models.hidden_states(untied, untied_cfg, ids))
  assert models.count_params(untied) > models.count_params(params)


@pytest.mark.parametrize("scheme, stored", [
    ("cross_layer", 1), ("cross_block", 2), ("adjacent_layer", 4),
    ("adjacent_block", 2)])
def test_sharing_schemes_store_the_papers_blocks(scheme, stored):
  cfg = make_cfg(head="softmax", share=scheme)
  params = init(cfg)
  conv = params["blocks"]["conv1"]["kernel"]
  assert conv.shape[0] == stored
  has_conv2 = "conv2" in params["blocks"]
  assert has_conv2 == (scheme not in ("cross_layer", "adjacent_layer"))


def test_shared_model_matches_its_scan_unrolled():
  cfg = make_cfg(head="softmax", share="cross_block", share_leaves="convs")
  params = init(cfg)
  ids = jax.random.randint(jax.random.key(4), (2, 8), 0, V)
  np.testing.assert_allclose(
      models.hidden_states(params, cfg, ids),
      models.hidden_states(params, cfg, ids, unroll=True), atol=1e-5)


def test_growing_a_shared_model_composes_maps_without_new_block_arrays():
  cfg = make_cfg(head="softmax", share="cross_block")
  params = init(cfg)
  deep, deep_cfg = growth.stack(params, cfg, "adjacent", "full",
                                rng=jax.random.key(0))
  assert deep_cfg.method("cprec").block_source == (0, 0, 1, 1, 0, 0, 1, 1)
  for a, b in zip(jax.tree.leaves(params["blocks"]),
                  jax.tree.leaves(deep["blocks"])):
    np.testing.assert_array_equal(a, b)


def test_preserve_growth_of_a_model_sharing_only_convs_is_exact():
  cfg = make_cfg(head="softmax", share="cross_block", share_leaves="convs")
  params = init(cfg)
  ids = jax.random.randint(jax.random.key(2), (3, 8), 0, V)
  deep, deep_cfg = growth.stack(params, cfg, "cross", "preserve",
                                rng=jax.random.key(0))
  assert deep["blocks"]["conv1"]["kernel"].shape[0] == 2
  np.testing.assert_allclose(models.hidden_states(deep, deep_cfg, ids),
                             models.hidden_states(params, cfg, ids),
                             atol=1e-5)


def test_preserve_growth_of_a_model_sharing_its_gates_is_refused():
  cfg = make_cfg(head="softmax", share="cross_block")
  with pytest.raises(JaxrecError, match="untie"):
    growth.stack(init(cfg), cfg, "cross", "preserve", rng=jax.random.key(0))



@pytest.mark.parametrize("scheme, first", [
    ("cross_block", [0, 1]), ("adjacent_block", [0, 2]),
    ("cross_layer", [0])])
def test_sharing_attached_to_a_trained_model_ties_its_first_blocks(
    scheme, first):
  plain = make_cfg(head="softmax")
  trained = init(plain)
  cfg = plain.with_method(CpRecConfig(share=scheme)).validate()
  tied = method_api.attach(trained, cfg, jax.random.key(0), {"cprec"})
  models.check_params(tied, cfg)
  np.testing.assert_array_equal(tied["blocks"]["conv1"]["kernel"],
                                trained["blocks"]["conv1"]["kernel"][
                                    np.array(first)])

@pytest.mark.parametrize("model, option", [
    ({"share": "cross_block", "share_period": 3}, "methods.cprec.period"),
    ({"share": "adjacent_block", "num_blocks": 3}, "model.num_blocks"),
    ({"share": "sideways"}, "methods.cprec.share"),
    ({"block_source": [0, 2, 2, 0]}, "methods.cprec.block_source")])
def test_bad_sharing_options_are_one_line_errors(model, option):
  with pytest.raises(JaxrecError, match=option):
    make_cfg(head="softmax", **model)


def test_compression_ratio_counts_against_the_uncompressed_model():
  cfg = make_cfg(embedding="adaptive", share="cross_layer")
  ratio = models.compression_ratio(cfg)
  plain = models.count_params(models.abstract_params(models.uncompressed(cfg)))
  assert ratio == pytest.approx(plain / models.count_params(init(cfg)))
  assert ratio > 2


# ------------------------------------------------------------- end to end


def test_cprec_run_trains_evaluates_inspects_and_grows_through_the_cli(
    tmp_path, capsys):
  run, grown = str(tmp_path / "run"), str(tmp_path / "grown")
  cache = str(tmp_path / "cache")
  assert cli.main([
      "train", "--data", "synthetic:tiny", "--out", run, "--cache-dir", cache,
      "--embedding", "adaptive", "--head", "tree_softmax", "--num-bands", "3",
      "--share", "cross_block", "--num-blocks", "4", "--embed-dim", "16",
      "--steps", "6", "--eval-every", "3", "--batch-size", "16",
      "--max-len", "10"]) == 0
  with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
    stored = json.load(f)["model"]
  assert len(stored["band_cutoffs"]) == 2  # Resolved and recorded.
  assert cli.main(["eval", "--ckpt", run]) == 0
  assert cli.main(["inspect", run]) == 0
  assert "compression:" in capsys.readouterr().out
  assert cli.main(["grow", "--from", run, "--out", grown, "--method", "adjacent",
                   "--preset", "full"]) == 0
  params, cfg, meta = models_load(grown)
  assert cfg.method("cprec").block_source == (0, 0, 1, 1, 0, 0, 1, 1)
  assert meta["lineage"][-1]["op"] == "grow"
  assert meta["lineage"][-1]["block_source"] == [0, 0, 1, 1, 0, 0, 1, 1]
  models.check_params(params, cfg)


def test_a_tree_softmax_run_serves_through_its_early_exit_exactly():
  """Predictor uses the head's own top-k (the early exit); its answer
  equals the tile scan over every item."""
  predictor = serving.Predictor(os.path.join(
      os.path.dirname(__file__), "fixtures", "v2_runs", "cprec"))
  assert predictor.cfg.head.name == "tree_softmax"
  items = list(predictor.vocab.items[1:])
  histories = [items[i:i + 7] for i in range(0, len(items) - 7, 4)]
  early = predictor.topk(histories, k=20)
  scan = jax.jit(serving.topk_fn(predictor.cfg, 20))
  inputs, _, _ = serving.encode_histories(predictor.vocab, histories,
                                          predictor.max_len)
  ids, scores = scan(predictor.params, inputs)
  assert len(early) > 8
  for row, pred in enumerate(early):
    assert pred.fallback is None
    assert pred.items == list(predictor.vocab.decode_items(np.asarray(
        ids[row])))
    np.testing.assert_allclose(pred.scores, scores[row], rtol=1e-5)


def models_load(run_dir):
  from jaxrec.training import state  # pylint: disable=import-outside-toplevel
  return state.load_params(run_dir)


# ----------------------------------- compressing a trained model's tables


def trained_flat(seed=0):
  """A flat-softmax NextItNet with random (not init-scale) tables."""
  cfg = config_lib.Config(model=models.get("nextitnet").config(
      num_items=V, embed_dim=C, num_blocks=2, dropout=0.0)).validate()
  params = init(cfg, seed)
  keys = jax.random.split(jax.random.key(seed + 100), 3)
  params["item_embedding"]["embedding"] = jax.random.normal(keys[0], (V, C))
  params["head"] = {"kernel": jax.random.normal(keys[1], (V, C)),
                    "bias": jax.random.normal(keys[2], (V,))}
  return params, cfg


def test_bands_as_wide_as_the_embedding_keep_the_model_exactly():
  params, cfg = trained_flat()
  small, small_cfg = factorise.compress(params, cfg, (8, 30), (C, C, C),
                                        tree_softmax=False)
  assert small_cfg.model.embedding == "adaptive"
  models.require_fit(small, small_cfg, "test")
  x = jnp.asarray(np.random.default_rng(0).integers(0, V, (4, 9)))
  np.testing.assert_allclose(models.hidden_states(small, small_cfg, x),
                             models.hidden_states(params, cfg, x), atol=1e-4)


def test_a_narrow_band_is_the_best_low_rank_approximation_of_its_rows():
  rows = np.random.default_rng(1).normal(size=(40, C)).astype(np.float32)
  a, b = factorise.low_rank(rows, 4)
  s = np.linalg.svd(rows, compute_uv=False)
  np.testing.assert_allclose(np.linalg.norm(rows - a @ b),
                             np.sqrt(np.sum(s[4:] ** 2)), rtol=1e-4)


def test_the_tree_keeps_the_flat_softmax_within_each_band():
  params, cfg = trained_flat()
  tree, tree_cfg = factorise.compress(params, cfg, (8, 30), (C, C, C))
  assert tree_cfg.head.name == "tree_softmax"
  models.require_fit(tree, tree_cfg, "test")
  h = jax.random.normal(jax.random.key(3), (5, C))
  flat = np.asarray(h @ params["head"]["kernel"].T + params["head"]["bias"])
  got = np.asarray(ts.full_log_probs(tree, tree_cfg, h))
  for lo, hi in ((8, 30), (30, V)):  # Conditional log-probs per tail band.
    want = flat[:, lo:hi] - np.log(np.exp(flat[:, lo:hi]).sum(1,
                                                              keepdims=True))
    cond = got[:, lo:hi] - np.log(np.exp(got[:, lo:hi]).sum(1,
                                                            keepdims=True))
    np.testing.assert_allclose(cond, want, atol=1e-4)
  # Head items keep their order against each other.
  np.testing.assert_allclose(got[:, 2:8] - got[:, 1:2],
                             flat[:, 2:8] - flat[:, 1:2], atol=1e-4)


def test_compressing_a_banded_model_again_is_one_line():
  params, cfg = trained_flat()
  small, small_cfg = factorise.compress(params, cfg, (8, 30), (C, 4, 1))
  with pytest.raises(JaxrecError, match="compress: model.embedding="
                     "'adaptive'; expected 'full'"):
    factorise.compress(small, small_cfg, (8, 30), (C, 4, 1))
