"""PeterRec: bidirectional convs, masked pretraining, model patches, the
downstream data and tasks, presets, fine-tuning checkpoints and the CLI."""
import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import cli, config, models
from jaxrec.data import transfer
from jaxrec.data.vocabulary import Vocabulary
from jaxrec.errors import JaxrecError
from jaxrec.evaluation import evaluate_checkpoint
from jaxrec.nn import conv
from jaxrec.methods.stackrec import growth
from jaxrec.tasks import masked_item
from jaxrec.tasks import transfer as transfer_task
from jaxrec.training import checkpoints, loop, optim
from jaxrec.training import checkpoint_meta
from jaxrec.training import orbax_io
from jaxrec.training import state as state_lib
from jaxrec.methods.peterrec import finetune as peterrec
from jaxrec.methods.peterrec.config import PLACEMENTS, PeterRecConfig

def model_cfg(**kw):
  base = dict(num_items=30, embed_dim=8, num_blocks=2, dropout=0.0)
  return config.model_config_class("nextitnet")(**{**base, **kw})


def full_cfg(patch="none", **kw):
  methods = () if patch == "none" else (PeterRecConfig(placement=patch),)
  return config.Config(model=model_cfg(**kw), methods=methods)


def active(params, value=0.7):
  """Blocks that do something: alpha is 0 at init (each block the identity)."""
  params = dict(params)
  params["blocks"] = {**params["blocks"],
                      "alpha": jnp.full_like(params["blocks"]["alpha"], value)}
  return params


# ------------------------------------------------------------ the backbone


def test_noncausal_conv_is_centred_and_matches_the_lax_reference():
  x = jax.random.normal(jax.random.key(0), (2, 9, 4))
  kernel = jax.random.normal(jax.random.key(1), (3, 4, 5))
  bias = jnp.arange(5.0)
  out = conv.causal_conv(x, kernel, bias, 2, causal=False)
  ref = conv.causal_conv_reference(x, kernel, bias, 2, causal=False)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # Position 4 sees 2, 4, 6: a change at 6 moves it, one at 7 does not.
  moved = conv.causal_conv(x.at[:, 6].add(1.0), kernel, bias, 2, causal=False)
  assert not np.allclose(moved[:, 4], out[:, 4])
  still = conv.causal_conv(x.at[:, 7].add(1.0), kernel, bias, 2, causal=False)
  np.testing.assert_allclose(still[:, 4], out[:, 4])


def test_a_causal_model_never_sees_later_items_a_bidirectional_one_does():
  ids = jnp.array([[0, 3, 4, 5, 6, 7]])
  later = ids.at[0, 5].set(9)
  for causal in (True, False):
    cfg = full_cfg(causal=causal)
    params = active(models.init_params(cfg, jax.random.key(0)))
    run = jax.jit(lambda p, x, cfg=cfg: models.hidden_states(p, cfg, x))
    h, h2 = run(params, ids), run(params, later)
    assert np.array_equal(h[:, :5], h2[:, :5]) == causal


def test_a_bidirectional_model_reads_a_left_padded_row_as_the_row_alone():
  """A centred conv carries values into the padding and back out into the
  row's first items unless padding is zeroed after every block."""
  cfg = full_cfg(causal=False)
  params = active(models.init_params(cfg, jax.random.key(0)))
  run = jax.jit(lambda p, x: models.hidden_states(p, cfg, x))
  row = jnp.array([[3, 4, 5, 6, 7]])
  padded = jnp.array([[0, 0, 0, 3, 4, 5, 6, 7]])
  np.testing.assert_allclose(run(params, padded)[:, 3:], run(params, row),
                             rtol=1e-5, atol=1e-6)


def test_a_bidirectional_model_gets_the_mask_token_and_needs_an_odd_kernel():
  assert model_cfg(causal=False).special_tokens == ("mask",)
  with pytest.raises(JaxrecError, match="model.kernel_size"):
    model_cfg(causal=False, kernel_size=2).validate()


def test_special_tokens_are_learned_vectors_at_ids_v_and_beyond():
  cfg = full_cfg(special_tokens=("mask", "cls", "unk"))
  params = models.init_params(cfg, jax.random.key(0))
  assert sorted(params["tokens"]) == ["cls", "mask", "unk"]
  from jaxrec.nn import embedding  # pylint: disable=import-outside-toplevel
  x = embedding.lookup(params, cfg.model, jnp.array([30, 31, 32, 5]))
  for row, name in enumerate(("mask", "cls", "unk")):
    np.testing.assert_array_equal(x[row], params["tokens"][name])
  np.testing.assert_array_equal(x[3],
                                params["item_embedding"]["embedding"][5])


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_patched_network_computes_exactly_what_the_pretrained_one_did(
    placement):
  src = full_cfg()
  pretrained = active(models.init_params(src, jax.random.key(0)))
  cfg = full_cfg(patch=placement)
  params = peterrec.transfer_params(pretrained, cfg, jax.random.key(1))
  ids = jnp.array([[0, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6]])
  patched = models.hidden_states(params, cfg, ids)
  plain = models.hidden_states(pretrained, src, ids)
  if placement == "block_parallel":
    # `x + alpha * h + 0` vs `x + alpha * h`: XLA may fuse only the second
    # into a fused multiply-add, a last-bit difference.
    np.testing.assert_allclose(patched, plain, rtol=1e-6, atol=1e-6)
  else:
    np.testing.assert_array_equal(patched, plain)
  # And the patch is live: a non-zero `up` changes the output.
  name = sorted(params["peterrec"])[0]
  moved = jax.tree.map(lambda a: a, params)
  moved["peterrec"][name]["up"]["bias"] = jnp.ones_like(
      params["peterrec"][name]["up"]["bias"])
  assert not np.allclose(models.hidden_states(moved, cfg, ids),
                         models.hidden_states(params, cfg, ids))


def test_patches_are_block_axis_leaves_that_grow_with_the_blocks():
  cfg = full_cfg(patch="serial")
  params = models.init_params(cfg, jax.random.key(0))
  for leaf in jax.tree.leaves(params["peterrec"]["patch1"]):
    assert leaf.shape[0] == 2
  assert params["peterrec"]["patch1"]["down"]["kernel"].shape == (2, 8, 2)
  deep, deep_cfg = growth.stack(params, cfg, "adjacent", "paper",
                                rng=jax.random.key(1))
  assert deep_cfg.model.num_blocks == 4
  np.testing.assert_array_equal(deep["peterrec"]["patch2"]["down"]["kernel"],
                                params["peterrec"]["patch2"]["down"]["kernel"]
                                [np.array([0, 0, 1, 1])])


# ------------------------------------------------------- masked pretraining


def test_masking_chooses_30_percent_of_real_positions_and_never_padding():
  rows = np.zeros((400, 20), np.int32)
  lengths = np.random.default_rng(0).integers(1, 21, 400)
  for i, n in enumerate(lengths):
    rows[i, 20 - n:] = np.arange(1, n + 1)
  inputs, targets = masked_item.mask_rows(rows, np.random.default_rng(1),
                                          num_items=50, mask_id=50)
  chosen = targets != 0
  np.testing.assert_array_equal(chosen.sum(1),
                                np.maximum(1, np.rint(0.3 * lengths)))
  assert not (chosen & (rows == 0)).any()
  np.testing.assert_array_equal(targets[chosen], rows[chosen])
  np.testing.assert_array_equal(inputs[~chosen], rows[~chosen])
  share_mask = np.mean(inputs[chosen] == 50)
  share_kept = np.mean(inputs[chosen] == rows[chosen])
  assert 0.75 < share_mask < 0.85 and 0.05 < share_kept < 0.2


def test_masked_batches_are_a_pure_function_of_seed_and_step():
  data = dataclasses.make_dataclass("D", ["train", "num_items"])(
      np.tile(np.arange(11, dtype=np.int32), (8, 1)), 40)
  a, b = (masked_item.batch(data, 3, 4, seed=0) for _ in range(2))
  chex.assert_trees_all_equal(a, b)
  c = masked_item.batch(data, 4, 4, seed=0)
  assert not np.array_equal(a["targets"] != 0, c["targets"] != 0)


def test_masked_evaluation_predicts_from_a_trailing_mask_token():
  cfg = full_cfg(causal=False)
  out = masked_item.mask_last(cfg, jnp.array([[0, 4, 5, 6]]))
  np.testing.assert_array_equal(out, [[4, 5, 6, 30]])


# ------------------------------------------------------- downstream data


def write(path, text):
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("text,task,msg", [
    ("1,2,3\n", "cold_start", r":1: expected 'source ids,,target items'"),
    ("1,2,,\n", "cold_start", r":1: empty target items"),
    (",,t1\n", "cold_start", r":1: empty source ids"),
    ("1,2,,t1\n1,,a,b\n", "profile", r":2: expected one label"),
    ("", "profile", "no users"),
])
def test_bad_downstream_lines_fail_naming_file_and_line(tmp_path, text, task,
                                                        msg):
  path = write(tmp_path / "f.txt", text)
  with pytest.raises(JaxrecError, match=msg):
    transfer.read_lines(path, task)


def vocab(n=10):
  return Vocabulary(items=np.array([""] + [str(i) for i in range(1, n)]),
                    users=np.array(["u"]))


def test_users_are_split_before_targets_expand_so_none_is_in_two_splits(
    tmp_path):
  lines = "".join(f"{u % 9 + 1},{u % 7 + 1},,t{u % 5},t{u % 3 + 5}\n"
                  for u in range(40))
  path = write(tmp_path / "c.txt", lines)
  cfg = config.DataConfig(valid_fraction=0.2, test_fraction=0.2)
  users = transfer.split_users(40, cfg)
  assert sorted(np.concatenate(list(users.values()))) == list(range(40))
  data = transfer.load(path, "cold_start", vocab(), cfg, 6, True, 11, 12)
  assert data.meta["num_users"] == {"train": 24, "valid": 8, "test": 8}
  # Every user has two targets: examples = 2 x users in each split.
  assert data.meta["num_examples"] == {"train": 48, "valid": 16, "test": 16}
  np.testing.assert_array_equal(data.item_counts[0], 0)
  assert data.item_counts.sum() == 48


def test_unknown_source_ids_become_unk_and_are_counted(tmp_path):
  path = write(tmp_path / "p.txt", "1,x,2,,a\n3,y,,b\n4,,a\n5,,b\n6,,a\n")
  cfg = config.DataConfig(valid_fraction=0.2, test_fraction=0.2)
  data = transfer.load(path, "profile", vocab(), cfg, 5, True, 11, 12)
  assert data.meta["unknown_source_tokens"] == 2
  every = np.concatenate([data.train[:, :-1], data.valid_inputs,
                          data.test_inputs])
  assert (every == 12).sum() == 2
  assert data.meta["num_outputs"] == 2  # Labels a, b: outputs 1 and 2.


def test_inputs_end_in_cls_or_hold_it_at_both_ends():
  ids = [np.array([1, 2, 3, 4, 5])]
  np.testing.assert_array_equal(
      transfer.model_inputs(ids, 4, True, 9), [[3, 4, 5, 9]])
  np.testing.assert_array_equal(
      transfer.model_inputs(ids, 5, False, 9), [[9, 3, 4, 5, 9]])
  np.testing.assert_array_equal(
      transfer.model_inputs([np.array([7])], 4, False, 9), [[0, 9, 7, 9]])


def test_target_items_are_numbered_by_training_frequency():
  lines = transfer.UserLines(sources=[["1"]] * 4,
                             targets=[["b"], ["b", "a"], ["c"], ["z"]])
  assert transfer.output_ids(lines, np.array([0, 1, 2]), "cold_start") == [
      "", "b", "a", "c", "z"]


def test_a_bidirectional_representation_adds_both_cls_states():
  cfg = full_cfg(causal=False, special_tokens=("mask", "cls"))
  h = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  inputs = jnp.array([[0, 31, 4, 5, 31], [31, 3, 4, 5, 31]])
  rep = transfer_task.read_user(h, cfg, inputs)
  np.testing.assert_array_equal(rep[0], h[0, 1] + h[0, 4])
  np.testing.assert_array_equal(rep[1], h[1, 0] + h[1, 4])


# ----------------------------------------------------------- presets


def preset_params(preset):
  arm = peterrec.PRESETS[preset]
  cfg = config.Config(
      model=model_cfg(special_tokens=("cls", "unk")),
      methods=(PeterRecConfig(),) if arm.patches else (),
      head=config.head_config_class("softmax")(num_classes=5))
  cfg = cfg.replace(train=config.TrainConfig(
      freeze=peterrec.frozen_patterns(cfg, preset),
      train_top_blocks=arm.top_blocks))
  return models.init_params(cfg, jax.random.key(0)), cfg


def test_presets_train_what_the_paper_names():
  head_and_tokens = 5 * 8 + 5 + 2 * 8
  counts = {p: transfer_task.param_counts(*preset_params(p))["trainable_params"]
            for p in peterrec.PRESETS}
  conv = 3 * 8 * 8 + 8  # One conv layer of one block.
  assert counts["fine_cls"] == head_and_tokens
  assert counts["fine_last1"] == head_and_tokens + conv
  assert counts["fine_last2"] == head_and_tokens + 2 * conv
  patch = 8 * 2 + 2 + 2 * 8 + 8
  assert counts["peter"] == head_and_tokens + 2 * 2 * patch + 2 * 16
  params, cfg = preset_params("fine_all")
  assert counts["fine_all"] == models.count_params(params)
  params, cfg = preset_params("peter_zero")
  assert counts["peter_zero"] == models.count_params(params)
  backbone = transfer_task.param_counts(params, cfg)["backbone_params"]
  assert backbone == 30 * 8 + 2 * (2 * conv + 4 * 8 + 1)


# --------------------------------------------- fine-tuning, end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny two-domain world and a causal run pretrained on its source."""
  root = tmp_path_factory.mktemp("peterrec")
  paths = transfer.synthetic_world(str(root / "world"),
                                   transfer.WORLD_SIZES["tiny"])
  cfg = config.Config(
      model=model_cfg(num_items=0, num_blocks=2),
      data=config.DataConfig(source="csv:" + paths["source"], max_len=12,
                             min_item_count=2),
      train=config.TrainConfig(steps=20, eval_every=10, batch_size=16))
  loop.train(cfg, str(root / "pre"), progress_bar=False)
  return root, paths


def short_train(**kw):
  return config.TrainConfig(**{**dict(steps=16, eval_every=8,
                                      batch_size=16), **kw})


@pytest.fixture(scope="module")
def peter_run(world):
  root, paths = world
  out = str(root / "peter")
  assert cli.main(["finetune", "--from", str(root / "pre"), "--task",
                   "cold_start", "--data", paths["cold_start"], "--out", out,
                   "--steps", "16", "--eval-every", "8", "--batch-size",
                   "16", "--quiet"]) == 0
  return out


def test_finetune_writes_metrics_with_parameter_counts(peter_run):
  with open(os.path.join(peter_run, "metrics.json")) as f:
    metrics = json.load(f)
  assert 0 < metrics["trainable_params"] < metrics["backbone_params"]
  assert metrics["task"] == "cold_start"
  assert metrics["unknown_source_tokens"] >= 0
  assert set(config.METRIC_NAMES) <= set(metrics["test"])


def test_frozen_leaves_stay_bit_for_bit_and_are_not_stored(world, peter_run):
  root, _ = world
  pretrained, _, _ = state_lib.load_params(str(root / "pre"))
  tuned, cfg, _ = state_lib.load_params(peter_run)
  for name in ("conv1", "conv2", "ln1", "alpha"):
    chex.assert_trees_all_equal(tuned["blocks"][name],
                 pretrained["blocks"][name])
  np.testing.assert_array_equal(tuned["item_embedding"]["embedding"],
                                pretrained["item_embedding"]["embedding"])
  assert not np.array_equal(tuned["blocks"]["ln2"]["scale"],
                            pretrained["blocks"]["ln2"]["scale"])
  # The checkpoint holds the trainable leaves only.
  opened = checkpoints.open_checkpoint(peter_run, "latest")
  raw, _ = orbax_io.restore(opened.mngr, opened.step)
  stored = {optim.path_name(p) for p, _ in
            jax.tree_util.tree_leaves_with_path(raw["params"])}
  assert stored and all(s.startswith(("peterrec/", "blocks/ln2", "head",
                                      "tokens/")) for s in stored), stored
  # ... and the optimizer holds no moments for the frozen ones.
  sizes = sum(np.size(x) for x in jax.tree.leaves(raw["opt_state"]))
  assert sizes < 3 * models.count_params(raw["params"]) + 10
  assert cfg.train.frozen_from == os.path.abspath(root / "pre")


def test_eval_and_inspect_load_a_finetuning_with_its_backbone(peter_run,
                                                             capsys):
  with open(os.path.join(peter_run, "metrics.json")) as f:
    metrics = json.load(f)
  out = evaluate_checkpoint(peter_run, split="test")
  assert out["test"] == pytest.approx(metrics["test"])
  sampled = evaluate_checkpoint(peter_run, split="test", sampled=5)
  assert sampled["ranking"] == "sampled:5"
  assert sampled["test"]["hr@5"] >= out["test"]["hr@5"]
  assert cli.main(["inspect", peter_run]) == 0
  text = capsys.readouterr().out
  assert "blocks/conv1/kernel" in text and "op=finetune" in text
  assert "stored: the trainable leaves only" in text


def test_a_changed_backbone_is_refused(peter_run):
  opened = checkpoints.open_checkpoint(peter_run)
  cfg = checkpoint_meta.config_from_meta(opened.meta, peter_run)
  meta = json.loads(json.dumps(opened.meta))
  meta["lineage"][-1]["frozen_fingerprint"] = "0" * 16
  with pytest.raises(JaxrecError, match="changed since the fine-tuning"):
    state_lib.load_frozen(cfg, meta, peter_run)


def test_a_killed_finetuning_resumes_exactly(world, peter_run, tmp_path):
  root, paths = world
  out = str(tmp_path / "killed")

  def crash(step):
    if step == 11:
      raise KeyboardInterrupt

  def run(**kw):
    return peterrec.finetune(str(root / "pre"), "cold_start",
                             paths["cold_start"], out, train=short_train(),
                             progress_bar=False, **kw)

  with pytest.raises(KeyboardInterrupt):
    run(step_callback=crash)
  resumed = run(resume=True)
  with open(os.path.join(peter_run, "metrics.json")) as f:
    assert resumed["test"] == json.load(f)["test"]
  a, _, _ = state_lib.load_params(peter_run, "latest")
  b, _, _ = state_lib.load_params(out, "latest")
  chex.assert_trees_all_equal(a, b)


def test_peter_zero_starts_fresh_and_stores_everything(world, tmp_path):
  root, paths = world
  out = str(tmp_path / "zero")
  peterrec.finetune(str(root / "pre"), "profile", paths["profile"], out,
                    "peter_zero", train=short_train(steps=1, eval_every=1),
                    progress_bar=False)
  tuned, cfg, _ = state_lib.load_params(out)
  assert cfg.train.frozen_from == "" and cfg.train.freeze == ()
  pretrained, _, _ = state_lib.load_params(str(root / "pre"))
  assert not np.allclose(tuned["item_embedding"]["embedding"],
                         pretrained["item_embedding"]["embedding"], atol=0.01)


def test_a_conv_backbone_fine_tunes_on_a_longer_window_than_it_pretrained_on(
    world, tmp_path):
  """Profile labels live in old items too: NextItNet has no position
  table, so `--max-len` may exceed the pretraining's 12."""
  root, paths = world
  out = tmp_path / "long"
  assert cli.main(["finetune", "--from", str(root / "pre"), "--task",
                   "profile", "--data", paths["profile"], "--out", str(out),
                   "--max-len", "20", "--steps", "2", "--eval-every", "2",
                   "--batch-size", "16", "--quiet"]) == 0
  with open(out / "config.json") as f:
    assert json.load(f)["data"]["max_len"] == 20
  _, cfg, _ = state_lib.load_params(str(out))
  data = transfer_task.load_task_data(cfg, str(out))
  assert data.valid_inputs.shape[1] == 20
  longest = max(len(line.split(",,")[0].split(","))
                for line in open(paths["profile"]))
  read = int((data.valid_inputs != 0).sum(axis=1).max())
  assert read == min(longest, 19) + 1 > 12  # 19 source slots and CLS.


def test_finetune_refuses_bad_options_in_one_line(world, tmp_path, capsys):
  root, paths = world
  base = ["finetune", "--from", str(root / "pre"), "--task", "profile",
          "--data", paths["profile"], "--out", str(tmp_path / "x")]
  assert cli.main(base + ["--freeze", "head/.*"]) == 2
  assert "unrecognized arguments: --freeze" in capsys.readouterr().err
  assert cli.main(base[:6] + [str(tmp_path / "missing.txt"), "--out",
                              str(tmp_path / "y")]) == 2
  assert "missing.txt: file not found" in capsys.readouterr().err
  assert cli.main(["finetune", "--from", str(tmp_path), "--task", "profile",
                   "--data", paths["profile"], "--out",
                   str(tmp_path / "z")]) == 2
  assert capsys.readouterr().err.startswith("jaxrec: error: ")


def test_a_finetuning_is_not_a_start_for_surgery_or_init_from(peter_run,
                                                             tmp_path,
                                                             capsys):
  assert cli.main(["grow", "--from", peter_run, "--out",
                   str(tmp_path / "g"), "--method", "adjacent"]) == 2
  assert "a fine-tuning (cold_start); a surgery" in capsys.readouterr().err
  assert cli.main(["train", "--init-from", peter_run, "--data",
                   "synthetic:tiny", "--out", str(tmp_path / "t")]) == 2
  assert "a fine-tuning (cold_start); --init-from" in capsys.readouterr().err


def peterrec_module(monkeypatch):
  import importlib  # pylint: disable=import-outside-toplevel
  monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..",
                                           "experiments"))
  return importlib.import_module("peterrec")


@pytest.mark.slow
def test_peterrec_experiment_fine_tunes_each_pretraining_at_equal_budgets(
    tmp_path, monkeypatch):
  import sys  # pylint: disable=import-outside-toplevel
  module = peterrec_module(monkeypatch)
  monkeypatch.setattr(module, "CPU", dict(
      module.CPU, world="tiny", embed_dim=8, num_blocks=2, max_len=12,
      pretrain_steps=2, steps=2, eval_every=2, batch_size=16))
  monkeypatch.setattr(sys, "argv", [
      "peterrec.py", "--out", str(tmp_path), "--seeds", "0",
      "--pretrainings", "grec", "--arms", "peter_serial,peter_zero"])
  module.main()  # The causal and masked pretrainings run the same code.
  for task, metric in (("cold_start", "ndcg@10"), ("profile", "accuracy")):
    with open(tmp_path / task / "results.json", encoding="utf-8") as f:
      results = json.load(f)
    assert results["select_metric"] == metric
    arms = results["arms"]
    assert set(arms) == {"grec_peter_serial", "grec_peter_zero"}
    # Pretraining counts in a pretrained arm's budget; PeterZero has none.
    assert arms["grec_peter_serial"]["steps"] == 4
    assert arms["grec_peter_zero"]["steps"] == 2
    assert arms["grec_peter_zero"]["budget"] == "own"
    serial = arms["grec_peter_serial"]
    assert 0 < serial["params"] < serial["backbone_params"]
    assert 0 <= serial["test"][metric]["mean"] <= 1
  # GRec's pretraining reaches PeterRec as its extracted encoder.
  _, meta = checkpoints.read_meta(arms["grec_peter_serial"]["run_dirs"][0])
  assert "extract" in [entry["op"] for entry in meta["lineage"]]
  assert "| grec_peter_serial |" in (tmp_path / "summary.md").read_text()


def test_peterrec_claims_hold_only_when_they_hold_on_every_seed(monkeypatch):
  module = peterrec_module(monkeypatch)
  good = {"peter_serial": [0.96, 0.97], "fine_all": [1.0, 1.0],
          "peter_zero": [0.5, 0.5], "fine_last2": [0.9, 0.9],
          "fine_last1": [0.8, 0.8], "fine_cls": [0.7, 0.7]}

  def results(values):
    arms = {a: {"test": {m: {"values": values.get(a, [0.6, 0.6])}
                         for m in ("ndcg@10", "accuracy")}}
            for a in module.ARMS}
    return {task: {"arms": arms} for task in module.TASKS}

  assert all(c["met"] for c in module.claims(results(good), ""))
  bad = dict(good, peter_serial=[0.96, 0.9], fine_cls=[0.7, 0.85])
  met = {c["claim"]: c["met"] for c in module.claims(results(bad), "")}
  assert met == {"PeterRec about equal to FineAll": False,
                 "PeterRec far above PeterZero": True,
                 "FineLast2 > FineLast1 > FineCLS": False}


def profiles_module(monkeypatch):
  import importlib  # pylint: disable=import-outside-toplevel
  monkeypatch.syspath_prepend(os.path.join(os.path.dirname(__file__), "..",
                                           "experiments"))
  return importlib.import_module("peterrec_profiles")


def test_the_linear_profile_reference_reads_a_label_the_items_decide(
    tmp_path, monkeypatch):
  module = profiles_module(monkeypatch)
  path = tmp_path / "profile.txt"
  # Item 1 or 2 decides the label; the other items are noise. The window
  # keeps only the last item, which never decides.
  rng = np.random.default_rng(0)
  with open(path, "w", encoding="utf-8") as f:
    for u in range(200):
      label = "F" if u % 2 else "M"
      noise = ",".join(str(i) for i in rng.integers(3, 40, size=5))
      f.write(f"{1 if label == 'F' else 2},{noise},,{label}\n")
  data = config.DataConfig()
  reference = module.items_logreg(str(path), data, steps=100)
  assert reference["test"] == 1.0 and reference["l2"] in module.L2_GRID
  assert module.items_logreg(str(path), data, window=1, steps=100)[
      "test"] < 0.8


def test_profile_claims_count_less_than_one_test_user_as_a_tie(monkeypatch):
  module = profiles_module(monkeypatch)

  def entry(**acc):
    return {"majority": 0.70, "users": {"test": 100}, "arms": {
        arm: {"test": {"mean": acc.get(arm, 0.70)}, "trainable_params": 5,
              "backbone_params": 100} for arm in module.ARMS}}

  tie = module.claims(entry(peter=0.705))  # Half a user above the rest.
  assert not tie["peter_above_peter_zero"] and not tie["above_majority"]
  assert tie["peter_near_fine_all"] and tie["peter_under_a_tenth"]
  clear = module.claims(entry(peter=0.75, fine_last2=0.74, fine_last1=0.73,
                              fine_cls=0.72))
  assert clear["peter_above_peter_zero"] and clear["above_majority"]
  assert clear["last2_last1_cls_order"]
  assert not module.claims(entry(fine_cls=0.73))["last2_last1_cls_order"]


@pytest.mark.slow
def test_profile_experiment_fine_tunes_each_arm_beside_the_references(
    tmp_path, monkeypatch):
  import sys  # pylint: disable=import-outside-toplevel
  import test_datasets as ds  # pylint: disable=import-outside-toplevel
  module = profiles_module(monkeypatch)
  blob = ds.grouplens_zip()
  dataset = ds.register(monkeypatch, "http://unused/ml-100k.zip", blob)
  home = tmp_path / "home"
  os.makedirs(home / ds.NAME)
  (home / ds.NAME / dataset.archive.filename).write_bytes(blob)
  monkeypatch.setenv("JAXREC_DATA", str(home))
  pre_cfg = config.from_dict({
      "model": {"name": "nextitnet", "embed_dim": 8, "num_blocks": 2},
      "data": {"source": ds.NAME, "min_user_count": 1, "min_item_count": 1,
               "max_len": 10, "cache_dir": str(tmp_path / "cache")},
      "train": {"steps": 2, "eval_every": 2, "batch_size": 8}}).validate()
  pre = tmp_path / "pre0"
  loop.train(pre_cfg, str(pre), progress_bar=False)
  monkeypatch.setattr(sys, "argv", [
      "peterrec_profiles.py", "--out", str(tmp_path / "out"), "--data",
      ds.NAME, "--pretrained", str(tmp_path / "pre{seed}"), "--seeds", "0",
      "--labels", "gender", "--arms", "peter,fine_cls,fine_all",
      "--epochs", "2", "--eval-every", "2", "--batch-size", "8"])
  module.main()
  with open(tmp_path / "out" / "results.json", encoding="utf-8") as f:
    gender = json.load(f)["labels"]["gender"]
  arms = gender["arms"]
  assert set(arms) == {"peter", "fine_cls", "fine_all"}
  trainable = {a: arms[a]["trainable_params"] for a in arms}
  assert trainable["fine_cls"] < trainable["peter"] < trainable["fine_all"]
  assert all(len(a["test"]["values"]) == 1 for a in arms.values())
  assert gender["items_logreg"]["window_items"] == 9  # max_len 10 - CLS.
  assert 0 <= gender["items_logreg"]["all"]["test"] <= 1
  with open(tmp_path / "out" / "runs" / "gender" / "peter" / "seed0" /
            "metrics.json", encoding="utf-8") as f:
    assert json.load(f)["steps"] >= 2
  # Run again: every fine-tuning is read back, the same table; at another
  # window the runs are not mistaken for that study's.
  module.main()
  with open(tmp_path / "out" / "results.json", encoding="utf-8") as f:
    assert json.load(f)["labels"]["gender"]["arms"] == arms
  monkeypatch.setattr(sys, "argv", sys.argv + ["--max-len", "14"])
  with pytest.raises(SystemExit, match="fine-tuned at max_len 10, not 14"):
    module.main()
  assert (tmp_path / "out" / "peterrec_profiles.png").stat().st_size > 0


def test_a_masked_model_serves_the_next_item_from_a_trailing_mask():
  from jaxrec import serving  # pylint: disable=import-outside-toplevel
  cfg = full_cfg(causal=False)
  params = active(models.init_params(cfg, jax.random.key(0)))
  inputs = jnp.array([[0, 3, 4, 5], [6, 7, 8, 9]], jnp.int32)
  ids, scores = serving.topk_fn(cfg, 3)(params, inputs)
  expected = masked_item.masked_hidden(params, cfg, inputs) @ (
      params["head"]["kernel"].T) + params["head"]["bias"]
  expected = expected.at[:, 0].set(-jnp.inf)
  np.testing.assert_allclose(scores, jax.lax.top_k(expected, 3)[0],
                             rtol=1e-5)


def test_predict_answers_a_cold_start_finetuning_in_target_items(
    peter_run, capsys):
  known = Vocabulary.load(peter_run).items[1:3].tolist()
  assert cli.main(["predict", "--ckpt", peter_run, "--history",
                   " ".join(known + ["nope"]), "--topk", "3", "--format",
                   "csv"]) == 0
  out = capsys.readouterr()
  rows = out.out.splitlines()[1:]
  assert len(rows) == 3
  assert all(r.split(",")[2].startswith("t") for r in rows), rows
  assert "1 unknown source ids in 1 of 1 histories read as the UNK" in (
      out.err)
