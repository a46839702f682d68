"""Serving a fine-tuning (`jaxrec finetune`): `Predictor`, `export_topk`,
`load_exported` and `jaxrec predict` answer a user's source-domain
history in the names of the fine-tuning's outputs (labels, target items),
encoded as it trained (unknown ids as UNK, then CLS)."""
import json
import os
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import cli, config, serving
from jaxrec.data import transfer
from jaxrec.data.vocabulary import Vocabulary
from jaxrec.errors import JaxrecError
from jaxrec.methods.peterrec import finetune as peterrec
from jaxrec.tasks import transfer as transfer_task
from jaxrec.training import state as state_lib

from cli_helpers import run_error
from transfer_helpers import pretrained_tiny_world

OLD_FINETUNING = os.path.join(os.path.dirname(__file__), "fixtures",
                              "v2_runs", "peterrec")


def tiny_train(steps):
  return config.TrainConfig(steps=steps, eval_every=steps, batch_size=16)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A tiny two-domain world, a causal NextItNet pretrained on its source,
  and a profile and a cold-start fine-tuning of it."""
  root = tmp_path_factory.mktemp("serving_finetune")
  paths = pretrained_tiny_world(root, "nextitnet")
  runs = {}
  for task, steps in (("profile", 6), ("cold_start", 2)):
    runs[task] = str(root / task)
    peterrec.finetune(str(root / "pre"), task, paths[task], runs[task],
                      train=tiny_train(steps), progress_bar=False)
  return root, paths, runs


def source_histories(paths, n=4):
  """The source ids of the first n users of the profile file."""
  lines = transfer.read_lines(paths["profile"], "profile")
  return [src[-8:] for src in lines.sources[:n]]


def by_hand(vocab, history, cfg, unk_as=None):
  """A causal fine-tuning's input row built here, not by jaxrec: the last
  max_len - 1 source ids, then CLS, left-padded (`unk_as`: raw ids to put
  UNK for)."""
  index = vocab.index()
  ids = [cfg.model.token_id("unk") if r == unk_as else index[r]
         for r in history][-(cfg.data.max_len - 1):]
  row = [0] * (cfg.data.max_len - len(ids) - 1) + ids + [
      cfg.model.token_id("cls")]
  return np.array(row, np.int32)


def logits_by_hand(run_dir, rows):
  """The fine-tuning's own logits: its user representation times its
  head, computed here (output 0 never a target)."""
  params, cfg, _ = state_lib.load_params(run_dir)
  rep = transfer_task.user_representation(params, cfg, jnp.asarray(rows))
  logits = np.array(rep @ params["head"]["kernel"].T
                      + params["head"]["bias"], np.float32)
  logits[:, 0] = -np.inf
  return logits, cfg


def test_a_profile_finetuning_answers_the_argmax_of_its_own_logits(world):
  _, paths, runs = world
  predictor = serving.Predictor(runs["profile"])
  assert predictor.finetuning
  histories = source_histories(paths)
  vocab = Vocabulary.load(runs["profile"])
  rows = np.stack([by_hand(vocab, h, predictor.cfg) for h in histories])
  logits, cfg = logits_by_hand(runs["profile"], rows)
  names = transfer.Outputs.load(runs["profile"]).names
  assert names == ("", "c0", "c1", "c2")
  preds = predictor.topk(histories, 10)  # Capped at the 3 labels.
  for pred, row in zip(preds, logits):
    order = np.argsort(-row, kind="stable")[:3]
    assert pred.items == [names[i] for i in order]
    assert pred.items[0] == names[int(np.argmax(row))]
    np.testing.assert_allclose(pred.scores, row[order], rtol=1e-5,
                               atol=1e-6)
    assert pred.unknown == 0 and pred.fallback is None
  assert serving.head_outputs(cfg) == cfg.head.num_classes == 4


def test_an_unknown_source_id_reads_as_unk_and_is_counted(world):
  _, paths, runs = world
  predictor = serving.Predictor(runs["profile"])
  history = source_histories(paths, 1)[0]
  odd = history[:3] + ["never-seen"] + history[3:]
  (pred,) = predictor.topk([odd], 3)
  assert pred.unknown == 1
  vocab = Vocabulary.load(runs["profile"])
  row = by_hand(vocab, odd, predictor.cfg, unk_as="never-seen")
  assert predictor.cfg.model.token_id("unk") in row
  logits, _ = logits_by_hand(runs["profile"], row[None])
  order = np.argsort(-logits[0], kind="stable")[:3]
  assert pred.items == [predictor.names[i] for i in order]
  np.testing.assert_allclose(pred.scores, logits[0][order], rtol=1e-5,
                             atol=1e-6)
  # Kept, not dropped: the model saw one more position than without it.
  (dropped,) = predictor.topk([history], 3)
  assert dropped.unknown == 0 and dropped.scores != pred.scores


def test_a_bidirectional_finetuning_encodes_cls_source_cls():
  model = config.model_config_class("nextitnet")(
      num_items=5, causal=False, special_tokens=("mask", "cls", "unk"))
  cfg = config.Config(model=model, data=config.DataConfig(max_len=6),
                      train=config.TrainConfig(task="profile"))
  vocab = Vocabulary(np.array(["", "a", "b", "c", "d"]), np.array(["u"]))
  inputs, unknown = serving.encode_sources(
      vocab, [["a", "zz", "b"], ["a", "b", "c", "d", "a"]], cfg)
  cls, unk = model.token_id("cls"), model.token_id("unk")
  assert inputs.tolist() == [[0, cls, 1, unk, 2, cls],
                             [cls, 2, 3, 4, 1, cls]]
  assert unknown.tolist() == [1, 0]


def test_the_export_of_a_finetuning_answers_as_the_predictor(world,
                                                             tmp_path):
  _, paths, runs = world
  path = str(tmp_path / "profile.zip")
  spec = serving.export_topk(runs["profile"], path, k=2)
  with zipfile.ZipFile(path) as z:
    assert sorted(z.namelist()) == sorted([
        serving.EXPORTED_FN, serving.EXPORTED_VOCAB, serving.EXPORTED_SPEC,
        serving.EXPORTED_OUTPUTS])
  fn, vocab, spec = serving.load_exported(path)
  assert spec["format"] == serving.FINETUNING_EXPORT_FORMAT
  assert spec["task"] == "profile" and "not catalogue items" in (
      spec["outputs"])
  assert spec["output_names"] == ["", "c0", "c1", "c2"]
  histories = source_histories(paths) + [["never-seen"]]
  # Encoded from the zip alone: its vocabulary and the spec's tokens.
  index = vocab.index()
  x = np.zeros((len(histories), spec["max_len"]), np.int32)
  assert spec["causal"]
  for row, history in enumerate(histories):
    ids = [index.get(r, spec["unk_id"]) for r in history]
    ids = ids[-(spec["max_len"] - 1):] + [spec["cls_id"]]
    x[row, spec["max_len"] - len(ids):] = ids
  ids, scores = fn.call(x)
  preds = serving.Predictor(runs["profile"]).topk(histories, 2)
  assert [[spec["output_names"][i] for i in r]
          for r in np.asarray(ids).tolist()] == [p.items for p in preds]
  np.testing.assert_allclose(np.asarray(scores), [p.scores for p in preds],
                             rtol=1e-5, atol=1e-6)


def test_a_cold_start_finetuning_answers_in_target_items(world):
  _, paths, runs = world
  outputs = transfer.Outputs.load(runs["cold_start"])
  # The names it recorded are the ones its data numbers its outputs by.
  cfg = state_lib.load_params(runs["cold_start"])[1]
  data = transfer_task.load_task_data(cfg, runs["cold_start"])
  assert outputs == data.outputs and outputs.task == "cold_start"
  assert len(outputs.names) == cfg.head.num_classes
  preds = serving.Predictor(runs["cold_start"]).topk(
      source_histories(paths), 5)
  for pred in preds:
    assert len(pred.items) == 5 and len(set(pred.items)) == 5
    assert all(name.startswith("t") for name in pred.items), pred.items
    assert pred.scores == sorted(pred.scores, reverse=True)


def test_exclude_seen_on_a_finetuning_is_one_line(world, tmp_path, capsys):
  _, _, runs = world
  with pytest.raises(JaxrecError, match="--exclude-seen: .* is a "
                     "fine-tuning \\(profile\\)"):
    serving.Predictor(runs["profile"]).topk([["1"]], 2, exclude_seen=True)
  line = run_error(capsys, ["predict", "--ckpt", runs["profile"],
                            "--history", "1 2", "--exclude-seen"])
  assert "--exclude-seen" in line and "fine-tuning" in line
  line = run_error(capsys, ["export", "--ckpt", runs["profile"], "--out",
                            tmp_path / "x.zip", "--exclude-seen"])
  assert "--exclude-seen" in line
  assert not (tmp_path / "x.zip").exists()


def test_jaxrec_predict_serves_a_finetuning(world, tmp_path, capsys):
  _, paths, runs = world
  histories = source_histories(paths, 2)
  path = tmp_path / "h.txt"
  path.write_text(" ".join(histories[0]) + "\n" + json.dumps(
      {"id": "u7", "history": histories[1] + ["never-seen"]}) + "\n")
  assert cli.main(["predict", "--ckpt", runs["profile"], "--input",
                   str(path), "--topk", "2"]) == 0
  out = capsys.readouterr()
  rows = [json.loads(line) for line in out.out.splitlines()]
  want = serving.Predictor(runs["profile"]).topk(
      [histories[0], histories[1] + ["never-seen"]], 2)
  assert [r["items"] for r in rows] == [p.items for p in want]
  assert [r["id"] for r in rows] == [0, "u7"]
  assert [r["unknown"] for r in rows] == [0, 1]
  assert all(r["fallback"] is None for r in rows)
  assert out.err.count("\n") == 1 and "read as the UNK token" in out.err
  assert cli.main(["export", "--ckpt", runs["profile"], "--out",
                   str(tmp_path / "m.zip"), "--topk", "2"]) == 0
  assert "over 3 profile outputs" in capsys.readouterr().out


def test_a_finetuning_made_before_outputs_were_recorded_is_one_line(capsys):
  # The committed config-version-2 fine-tuning has no outputs.json.
  assert not os.path.exists(os.path.join(OLD_FINETUNING, "outputs.json"))
  line = run_error(capsys, ["predict", "--ckpt", OLD_FINETUNING,
                            "--history", "1 2"])
  assert f"{OLD_FINETUNING}: a fine-tuning without outputs.json" in line


def test_outputs_of_another_finetuning_or_damaged_ones_are_refused(
    world, tmp_path):
  _, _, runs = world
  mine = transfer.Outputs.load(runs["profile"])
  other = transfer.Outputs.load(runs["cold_start"])
  _, _, meta = state_lib.load_params(runs["profile"])
  mine.check_matches(meta, 4, "profile", "run")
  with pytest.raises(JaxrecError, match="run: its outputs.json is not the "
                     "one its checkpoint was trained with"):
    other.check_matches(meta, 4, "profile", "run")
  with pytest.raises(JaxrecError, match="names 3 profile outputs; the "
                     "checkpoint's head has 4"):
    mine.check_matches(meta, 5, "profile", "run")
  raw = mine.to_json()
  raw["names"] = ["", "c1", "c0", "c2"]
  (tmp_path / "outputs.json").write_text(json.dumps(raw))
  with pytest.raises(JaxrecError, match="outputs.json: damaged"):
    transfer.Outputs.load(str(tmp_path))


def test_a_next_item_export_is_the_zip_it_always_was(trained_run,
                                                      tmp_path):
  path = str(tmp_path / "m.zip")
  spec = serving.export_topk(trained_run, path, k=3)
  with zipfile.ZipFile(path) as z:
    assert z.namelist() == [serving.EXPORTED_FN, serving.EXPORTED_VOCAB,
                            serving.EXPORTED_SPEC]
    stored = json.loads(z.read(serving.EXPORTED_SPEC))
  assert stored == spec and spec["format"] == serving.EXPORT_FORMAT
  assert sorted(spec) == sorted([
      "format", "k", "exclude_seen", "max_len", "num_items", "platforms",
      "vocabulary", "checkpoint", "inputs", "outputs"])
  _, vocab, loaded = serving.load_exported(path)
  assert loaded == spec and vocab.num_items == spec["num_items"]
  predictor = serving.Predictor(trained_run)
  assert not predictor.finetuning
  assert serving.head_outputs(predictor.cfg) == predictor.cfg.model.num_items
