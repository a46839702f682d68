"""The scenario scripts' shared pieces: nested data, clocks, time to reach."""
import importlib
import json
import os
import sys

import chex
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "experiments"))
import stackrec_common as common  # pylint: disable=wrong-import-position
from jaxrec.data import sequences  # pylint: disable=wrong-import-position
from jaxrec.training import checkpoints  # pylint: disable=wrong-import-position


def toy_data(rows=50):
  train = np.arange(1, rows * 4 + 1, dtype=np.int32).reshape(rows, 4) % 9 + 1
  empty = np.zeros((3, 3), np.int32)
  return sequences.SequenceData(
      num_items=10, train=train, valid_inputs=empty,
      valid_targets=np.ones(3, np.int32), test_inputs=empty,
      test_targets=np.ones(3, np.int32), item_counts=np.zeros(10, np.int64),
      fingerprint="fp", meta={})


def test_subsets_are_nested_and_sized():
  data = toy_data()
  small = common.subset_train(data, 0.2).train
  large = common.subset_train(data, 0.6).train
  assert len(small) == 10 and len(large) == 30
  large_rows = {tuple(r) for r in large}
  assert all(tuple(r) in large_rows for r in small)


def test_subset_counts_only_its_rows_and_changes_fingerprint():
  sub = common.subset_train(toy_data(), 0.4)
  expected = np.bincount(sub.train.ravel(), minlength=10)
  expected[0] = 0
  np.testing.assert_array_equal(sub.item_counts, expected)
  assert sub.fingerprint != "fp"


def test_new_output_layer_keeps_blocks_and_embedding(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel
  from jaxrec import config, evaluation, heads
  from jaxrec.surgery import heads as head_surgery
  from jaxrec.models.nextitnet import NextItNetConfig
  from jaxrec.training import loop
  cfg = config.Config(
      model=NextItNetConfig(num_blocks=2, embed_dim=8),
      data=config.DataConfig(source="synthetic:tiny", max_len=12),
      train=config.TrainConfig(steps=2, eval_every=2, batch_size=8,
                               eval_batch_size=8))
  src, out = str(tmp_path / "src"), str(tmp_path / "head")
  loop.train(cfg, src, progress_bar=False)
  head_surgery.new_head_checkpoint(src, out, seed=5)
  before, src_cfg, _ = evaluation.load_params(src)
  after, _, meta = evaluation.load_params(out)
  fresh = heads.get(src_cfg.head.name).init(src_cfg.head, src_cfg.model,
                                            jax.random.key(5))
  chex.assert_trees_all_equal(after["head"], fresh)
  assert not np.array_equal(after["head"]["kernel"], before["head"]["kernel"])
  for name in ("blocks", "item_embedding"):
    chex.assert_trees_all_equal(after[name], before[name])
  assert meta["lineage"][-1]["op"] == "new_output_head"


# ------------------------------------------- the scripts, end to end (tiny)

def run_script(monkeypatch, name, out, *extra, **settings):
  """Runs experiments/NAME.py's main() with --out OUT and module attributes
  (its settings) patched to tiny ones."""
  module = importlib.import_module(name)
  for key, value in settings.items():
    monkeypatch.setattr(module, key, value)
  monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", str(out),
                                    *extra])
  module.main()


@pytest.mark.slow
def test_demo_trains_grows_finetunes_and_compares(tmp_path, monkeypatch,
                                                  capsys):
  cfg = tmp_path / "demo.json"
  cfg.write_text(json.dumps({
      "model": {"num_blocks": 2, "embed_dim": 8},
      "data": {"source": "synthetic:tiny", "max_len": 20},
      "train": {"batch_size": 16, "eval_batch_size": 64, "steps": 4,
                "eval_every": 2, "patience": 1}}))
  out = tmp_path / "demo"
  run_script(monkeypatch, "demo", out, "--config", str(cfg),
             "--shallow-steps", "2")
  printed = capsys.readouterr().out
  for row in ("popularity", "shallow (1 blocks)", "grown (2 blocks)",
              "scratch (2 blocks)"):
    assert row in printed, row
  for stage in ("shallow", "finetuned", "scratch"):
    with open(out / stage / "metrics.json") as f:
      assert np.isfinite(json.load(f)["test"]["mrr@5"])
  _, meta = checkpoints.read_meta(str(out / "finetuned"))
  assert [e["op"] for e in meta["lineage"]] == ["grow", "init_from"]
  assert meta["lineage"][0]["preset"] == "preserve"


@pytest.mark.slow
def test_stackrec_cl_grows_the_deployed_model_to_scratchs_architecture(
    tmp_path, monkeypatch):
  run_script(monkeypatch, "stackrec_cl", tmp_path, "--data",
             "synthetic:tiny", "--seeds", "0", "--blocks", "1",
             "--increment-steps", "2", "--steps", "4", "--eval-every", "2",
             "--batch-size", "16", "--embed-dim", "8", "--arms",
             "cross/preserve")
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  arms = results["arms"]
  assert set(arms) == {"scratch", "shallow", "cross/preserve"}
  assert {arm["steps"] for arm in arms.values()} == {4}
  configs = {name: checkpoints.read_meta(arm["run_dirs"][0])[1]
             for name, arm in arms.items()}
  assert (configs["cross/preserve"]["config"]["model"]
          == configs["scratch"]["config"]["model"])  # 2 blocks, same dilations.
  assert configs["shallow"]["config"]["model"]["num_blocks"] == 1
  # Grown from the deployed model, which saw the four subsets in turn.
  lineage = configs["cross/preserve"]["lineage"]
  assert [e["op"] for e in lineage].count("init_from") == 4
  assert lineage[-2]["op"] == "grow"
  deployed = tmp_path / "runs" / "deployed" / "seed0"
  fractions = sorted(p.name for p in deployed.iterdir() if p.is_dir())
  assert fractions == ["subset0.2", "subset0.4", "subset0.6", "subset0.8"]
  assert "| nextitnet | cross/preserve |" in (
      tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_stackrec_tf_transfers_to_a_user_split_at_equal_budgets(
    tmp_path, monkeypatch):
  run_script(monkeypatch, "stackrec_tf", tmp_path, "--data",
             "synthetic:tiny", "--seeds", "0", "--depths", "1,2",
             "--shares", "0.5,0.5", "--pretrain-steps", "4",
             "--finetune-steps", "2", "--eval-every", "2", "--batch-size",
             "16", "--embed-dim", "8", "--methods", "cross", "--presets",
             "paper")
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  arms = results["arms"]
  assert set(arms) == {"scratch", "cross/paper", "no_pretrain"}
  assert {arm["steps"] for arm in arms.values()} == {6}
  # The domains: every user in exactly one, 30% of them in the target.
  users = {}
  for name in ("source", "target"):
    with open(tmp_path / "domains" / f"{name}.csv") as f:
      users[name] = {line.split(",")[0] for line in list(f)[1:]}
  assert not users["source"] & users["target"]
  share = len(users["target"]) / len(users["source"] | users["target"])
  assert share == pytest.approx(0.3, abs=0.01)
  # One catalogue: every arm's target run numbers items the source's way.
  from jaxrec.data import vocabulary as vocab_lib
  items = {name: vocab_lib.of_run(arm["run_dirs"][0]).items.tolist()
           for name, arm in arms.items()}
  assert items["scratch"] == items["cross/paper"] == items["no_pretrain"]
  # The grown arm was grown on the source, then given a fresh head.
  _, meta = checkpoints.read_meta(arms["cross/paper"]["run_dirs"][0])
  ops = [entry["op"] for entry in meta["lineage"]]
  assert ops.index("grow") < ops.index("new_output_head")
  assert meta["config"]["model"]["num_blocks"] == 2
  assert "time_to_scratch_best_s" in arms["cross/paper"]
  assert "| nextitnet | cross/paper |" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_cprec_chooses_width_and_bands_on_validation_then_tests_once(
    tmp_path, monkeypatch):
  tiny = dict(data="synthetic:tiny", num_blocks=4, max_len=10,
              batch_size=16, steps=2, eval_every=2, lr=1e-3,
              timing_batches=1)
  run_script(monkeypatch, "cprec", tmp_path, "--seeds", "0", "--widths",
             "8,12", "--band-share-grid", "0.6,0.8", "--arms",
             "nextitnet,cprec,small_nextitnet", "--band-dims", "8,4,2",
             "--tail-dims", "2,1", CPU=tiny)
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  arms, choices = results["arms"], results["choices"]
  assert set(arms) == {"nextitnet", "cprec", "small_nextitnet"}
  assert {arm["steps"] for arm in arms.values()} == {2}
  # Each knob is the variant with the best validation; every arm runs it.
  for group, knob, value in (("nextitnet", "embed_dim", "embed_dim"),
                             ("cprec", "band_shares", "band_shares")):
    valid = {v["knobs"][knob]: v["ndcg@10"]["mean"]
             for v in arms[group]["variants"].values()}
    assert choices[value] == max(valid, key=valid.get)
  cprec = arms["cprec"]["config"]["model"]
  assert cprec["embed_dim"] == choices["embed_dim"]
  assert cprec["band_shares"] == [choices["band_shares"]]
  assert cprec["band_dims"] == [8, 4, 2]  # Band flags reach band arms only.
  assert arms["cprec"]["config"]["head"]["tail_dims"] == [2, 1]
  assert arms["nextitnet"]["config"]["model"]["band_dims"] == []
  assert (arms["small_nextitnet"]["config"]["model"]["embed_dim"]
          == choices["small_nextitnet_width"])
  for arm in arms.values():
    assert arm["params"] == sum(arm["params_by_subtree"].values())
    assert arm["tokens_per_s"] > 0 and arm["topn_ms"]["full_ms"] > 0
  topn = arms["cprec"]["topn_ms"]
  assert topn["exact"] is True and topn["batch_1"]["exact"] is True
  assert len(topn["skipped_share_by_band"]) == 2  # One per tail band.
  assert set(results["top20_compared"]["batch_1"]) == {
      "nextitnet_full", "cprec_full", "cprec_early_exit"}
  assert set(results["targets"]) >= {"cprec_4x_fewer_params",
                                     "early_exit_exact"}
  assert (tmp_path / "accuracy_vs_params.png").exists()
  assert "| cprec (band_shares=" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow  # Five short stages on the tiny world: about 2 minutes.
def test_lineage_runs_every_method_on_one_chain_of_checkpoints(
    tmp_path, monkeypatch, capsys):
  tiny = dict(world="tiny", embed_dim=8, shallow_blocks=2, max_len=12,
              steps=4, eval_every=2, batch_size=16, lr=1e-3, period=2,
              num_bands=3, band_shares=(0.6,), skip_lambda=0.5,
              timing_batches=1)
  run_script(monkeypatch, "lineage", tmp_path, "--seeds", "0", CPU=tiny)
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  stages = results["stages"]
  assert results["selection"] == "valid"
  # Each stage's checkpoint names the run it was made from.
  assert {name: s["recorded_parents"] for name, s in stages.items()} == {
      "shallow": ["None"], "grown": ["shallow"], "compressed": ["grown"],
      "skipping": ["compressed"], "patched": ["compressed"]}
  assert [op.split(":")[0] for op in stages["compressed"]["lineage"]] == [
      "grow", "init_from", "compress", "init_from"]
  assert stages["compressed"]["params"] < stages["grown"]["params"]
  assert stages["grown"]["params"] > stages["shallow"]["params"]
  assert 0 <= stages["skipping"]["block_usage"]["mean"] <= 1
  assert stages["patched"]["metric"] == "accuracy"
  assert stages["patched"]["trainable_params"] < stages["compressed"][
      "params"]
  for name in ("shallow", "grown", "compressed", "skipping"):
    assert stages[name]["infer_ms"]["mean"] > 0
  assert "| compressed | grown |" in capsys.readouterr().out
  assert (tmp_path / "lineage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_stackrec_zoo_grows_to_scratchs_architecture_at_its_budget(
    tmp_path, monkeypatch):
  run_script(monkeypatch, "stackrec_zoo", tmp_path, "--data",
             "synthetic:tiny", "--models", "sasrec", "--seeds", "0",
             "--depths", "1,2", "--shares", "0.5,0.5", "--steps", "6",
             "--eval-every", "3", "--batch-size", "16", "--embed-dim", "8",
             "--methods", "cross", "--presets", "paper")
  with open(tmp_path / "sasrec" / "results.json") as f:
    results = json.load(f)
  assert results["selection"] == "valid"
  assert set(results["arms"]) == {"scratch", "cross/paper"}
  scratch, grown = results["arms"]["scratch"], results["arms"]["cross/paper"]
  assert scratch["steps"] == grown["steps"] == 6
  # One validation per stage, on one clock that spans both stages.
  (t1, _), (t2, _) = grown["curves"][0]
  assert t2 > t1 > 0
  _, meta = checkpoints.read_meta(scratch["run_dirs"][0])
  _, grown_meta = checkpoints.read_meta(grown["run_dirs"][0])  # 2 blocks.
  assert grown_meta["config"]["model"] == meta["config"]["model"]
  assert grown_meta["lineage"][0]["op"] == "grow"
  assert len(grown["time_to_scratch_best_s"]["values"]) == 1
  assert "| sasrec | cross/paper |" in (tmp_path / "summary.md").read_text()


@pytest.mark.slow
def test_train_defaults_tests_only_the_variant_validation_chose(
    tmp_path, monkeypatch):
  variants = {"short": dict(steps=2, eval_every=2, batch_size=16, patience=1),
              "long": dict(steps=8, eval_every=2, batch_size=16, patience=0)}
  run_script(monkeypatch, "train_defaults", tmp_path, "--data",
             "synthetic:tiny", "--models", "gru4rec", "--seeds", "0",
             VARIANTS=variants)
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert list(results["arms"]) == ["gru4rec"]
  arm = results["arms"]["gru4rec"]
  valid = {name.split("/")[1]: record["ndcg@10"]["mean"]
           for name, record in arm["variants"].items()}
  chosen = max(valid, key=valid.get)
  assert arm["selected"] == variants[chosen]
  assert arm["valid"]["ndcg@10"]["mean"] == valid[chosen]
  assert arm["steps"] == variants[chosen]["steps"]
  assert arm["budget"] == "own" and arm["test"]["ndcg@10"]["values"]
