"""Users' workflows: the vocabulary of a run, predictions in raw ids,
exported scoring functions, catalogues that grow, the notebook API."""
import json
import os

import numpy as np
import pytest

from jaxrec import cli, config
from jaxrec.config import DataConfig
from jaxrec.data import pipeline, synthetic
from jaxrec.data import vocabulary as vocab_lib
from jaxrec.data.sequences import Interactions
from jaxrec.errors import JaxrecError
from jaxrec.training import checkpoints, loop

from cli_helpers import TINY_MODEL, run_error


def named_items(inter: Interactions, prefix: str = "item") -> Interactions:
  """The same events with string item ids, as a catalogue would have."""
  items = np.array([f"{prefix}{i}" for i in inter.items])
  return Interactions(inter.users, items, inter.timestamps, inter.name)


def tiny_events() -> Interactions:
  return named_items(synthetic.generate("tiny"))


# ------------------------------------------------------------- vocabulary


def test_vocabulary_maps_each_id_to_the_raw_item_it_numbers():
  inter = tiny_events()
  data = pipeline.build_sequences(inter, DataConfig(source="synthetic:tiny",
                                                    max_len=20))
  # Id 1 is the most frequent item of the training rows; its raw id is the
  # raw item with the most training events.
  raw_train = data.vocab.decode_items(data.train[data.train > 0])
  values, counts = np.unique(raw_train, return_counts=True)
  assert data.vocab.items[1] == values[np.argmax(counts)]
  assert data.vocab.items[0] == ""
  assert len(data.vocab.items) == data.num_items


def test_vocabulary_users_follow_the_rows_of_the_loo_splits():
  inter = tiny_events()
  data = pipeline.build_sequences(inter, DataConfig(source="synthetic:tiny",
                                                    max_len=20))
  user = data.vocab.users[7]
  mine = np.asarray(inter.users).astype(str) == user
  last = np.asarray(inter.items)[mine][np.argmax(inter.timestamps[mine])]
  assert data.vocab.decode_items([data.test_targets[7]])[0] == last


def test_encode_items_counts_unknown_ids_and_maps_them_to_padding():
  vocab = vocab_lib.Vocabulary(np.array(["", "a", "b"]), np.array(["u"]))
  ids, unknown = vocab.encode_items(["b", "zzz", "a", "b"])
  assert ids.tolist() == [2, 0, 1, 2] and ids.dtype == np.int32
  assert unknown == 1


def test_vocabulary_file_round_trips_with_its_fingerprint(tmp_path):
  vocab = vocab_lib.Vocabulary(np.array(["", "x", "7"]), np.array(["3", "1"]))
  vocab.save(str(tmp_path))
  back = vocab_lib.Vocabulary.load(str(tmp_path))
  assert back.items.tolist() == ["", "x", "7"]
  assert back.users.tolist() == ["3", "1"]
  assert back.fingerprint() == vocab.fingerprint()


def test_a_damaged_vocabulary_file_is_one_line_naming_it(tmp_path):
  vocab = vocab_lib.Vocabulary(np.array(["", "x"]), np.array(["u"]))
  path = vocab.save(str(tmp_path))
  with open(path, encoding="utf-8") as f:
    raw = json.load(f)
  raw["items"][1] = "y"
  with open(path, "w", encoding="utf-8") as f:
    json.dump(raw, f)
  with pytest.raises(JaxrecError, match="vocabulary.json: damaged"):
    vocab_lib.Vocabulary.load(str(tmp_path))


def test_of_run_without_a_vocabulary_names_the_directory(tmp_path):
  with pytest.raises(JaxrecError) as e:
    vocab_lib.of_run(str(tmp_path))
  assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_cached_data_carries_its_vocabulary(tmp_path):
  cfg = DataConfig(source="synthetic:tiny", max_len=20,
                   cache_dir=str(tmp_path))
  built = pipeline.load_data(cfg)
  cached = pipeline.load_data(cfg)  # Read back from the .npz.
  assert cached.vocab.fingerprint() == built.vocab.fingerprint()


def test_a_run_saves_its_vocabulary_and_its_checkpoints_record_it(
    trained_run):
  vocab = vocab_lib.of_run(trained_run)
  _, meta = checkpoints.read_meta(trained_run)
  assert meta["vocabulary"]["fingerprint"] == vocab.fingerprint()
  assert meta["vocabulary"]["num_items"] == meta["config"]["model"][
      "num_items"]


def test_of_run_reads_the_vocabulary_from_a_checkpoint_directory(
    trained_run):
  step = checkpoints.read_meta(trained_run)[0]
  inside = os.path.join(trained_run, "checkpoints", "best", str(step))
  assert (vocab_lib.of_run(inside).fingerprint() ==
          vocab_lib.of_run(trained_run).fingerprint())


def test_a_vocabulary_keeps_known_ids_on_a_new_data_version():
  cfg = DataConfig(source="synthetic:tiny", max_len=20)
  old = pipeline.build_sequences(tiny_events(), cfg)
  # The new version: the last 40% of events only, so frequencies (and a
  # fresh numbering) differ.
  inter = tiny_events()
  late = inter.timestamps >= np.quantile(inter.timestamps, 0.6)
  newer = Interactions(inter.users[late], inter.items[late],
                       inter.timestamps[late], "late")
  new = pipeline.build_sequences(newer, cfg, vocab=old.vocab)
  shared = np.intersect1d(old.vocab.items[1:], new.vocab.items[1:])
  old_ids, _ = old.vocab.encode_items(shared)
  new_ids, _ = new.vocab.encode_items(shared)
  assert np.array_equal(old_ids, new_ids)


def test_eval_on_other_data_numbers_it_by_the_runs_vocabulary(
    trained_run, monkeypatch, capsys):
  seen = []
  load = pipeline.load_data

  def spy(cfg, *args, **kwargs):
    seen.append(kwargs.get("vocab"))
    return load(cfg, *args, **kwargs)

  monkeypatch.setattr(pipeline, "load_data", spy)
  assert cli.main(["eval", "--ckpt", trained_run, "--data", "synthetic:tiny",
                   "--split", "test"]) == 0
  capsys.readouterr()
  assert seen[-1].fingerprint() == vocab_lib.of_run(trained_run).fingerprint()


def test_surgery_copies_the_vocabulary_of_its_source(trained_run, tmp_path):
  grown = str(tmp_path / "grown")
  assert cli.main(["grow", "--from", trained_run, "--out", grown,
                   "--method", "cross"]) == 0
  assert (vocab_lib.of_run(grown).fingerprint() ==
          vocab_lib.of_run(trained_run).fingerprint())


# ---------------------------------------------------------------- predict


def predict_jsonl(capsys, argv):
  assert cli.main(["predict"] + argv) == 0
  out = capsys.readouterr()
  return [json.loads(line) for line in out.out.splitlines()], out.err


def known_history(run_dir, n=6):
  """Raw ids the run knows: a test user's input, oldest first."""
  from jaxrec.data import pipeline as pl  # pylint: disable=import-outside-toplevel
  from jaxrec.training.state import load_params
  _, cfg, _ = load_params(run_dir)
  data = pl.load_data(cfg.data)
  row = data.test_inputs[0]
  return data.vocab.decode_items(row[row > 0][-n:]).tolist()


def test_predict_returns_k_raw_ids_with_scores_best_first(trained_run,
                                                          capsys):
  history = known_history(trained_run)
  rows, _ = predict_jsonl(capsys, ["--ckpt", trained_run, "--history",
                                   " ".join(history), "--topk", "5"])
  (row,) = rows
  vocab = vocab_lib.of_run(trained_run)
  assert len(row["items"]) == 5 and set(row["items"]) <= set(vocab.items[1:])
  assert row["scores"] == sorted(row["scores"], reverse=True)
  assert row["fallback"] is None and row["unknown"] == 0


def test_topk_equals_sorting_every_items_score(trained_run):
  from jaxrec import heads, serving
  from jaxrec.tasks import next_item
  predictor = serving.Predictor(trained_run)
  inputs, _, _ = serving.encode_histories(
      predictor.vocab, [known_history(trained_run)], predictor.max_len)
  cfg, params = predictor.cfg, predictor.params
  head = heads.get(cfg.head.name)
  h = next_item.last_hidden(params, cfg, inputs)
  every = np.array(head.tile_scores(params, cfg, head.prepare(params, cfg, h),
                                      0, cfg.model.num_items))[0]
  every[0] = -np.inf  # Padding is never recommended.
  ids, scores = serving.topk_fn(cfg, 7)(params, inputs)
  assert np.asarray(ids)[0].tolist() == np.argsort(-every,
                                                   kind="stable")[:7].tolist()
  np.testing.assert_allclose(np.asarray(scores)[0], np.sort(every)[::-1][:7],
                             rtol=1e-6)


def test_predict_exclude_seen_never_returns_an_item_of_the_history(
    trained_run, capsys):
  history = known_history(trained_run, n=10)
  rows, _ = predict_jsonl(capsys, ["--ckpt", trained_run, "--history",
                                   " ".join(history), "--topk", "20",
                                   "--exclude-seen"])
  assert not set(rows[0]["items"]) & set(history)
  assert len(rows[0]["items"]) == 20


def history_past_the_window(run_dir):
  """(a history longer than the model's window, the items it saw before
  the window): those items top the window's own ranking, so only an
  exclusion over the whole history keeps them out."""
  from jaxrec import serving
  predictor = serving.Predictor(run_dir)
  window = predictor.vocab.items[-predictor.max_len:].tolist()
  (best,) = predictor.topk([window], 5, exclude_seen=True)
  return best.items + window, best.items


def test_exclude_seen_excludes_items_seen_before_the_models_window(
    trained_run, capsys):
  history, early = history_past_the_window(trained_run)
  rows, _ = predict_jsonl(capsys, ["--ckpt", trained_run, "--history",
                                   " ".join(history), "--topk", "5",
                                   "--exclude-seen"])
  assert not set(rows[0]["items"]) & set(history), early
  assert len(rows[0]["items"]) == 5


def test_predict_drops_unknown_ids_and_warns_in_one_line(trained_run,
                                                        capsys):
  history = known_history(trained_run)
  rows, err = predict_jsonl(capsys, ["--ckpt", trained_run, "--history",
                                     " ".join(history + ["nope", "zz"])])
  clean, _ = predict_jsonl(capsys, ["--ckpt", trained_run, "--history",
                                    " ".join(history)])
  assert rows[0]["unknown"] == 2 and rows[0]["items"] == clean[0]["items"]
  assert err.count("\n") == 1 and "dropped 2 unknown item ids" in err


def test_a_history_with_no_known_id_falls_back_to_popularity(trained_run,
                                                             capsys):
  rows, err = predict_jsonl(capsys, ["--ckpt", trained_run, "--history",
                                     "nope", "--topk", "3"])
  vocab = vocab_lib.of_run(trained_run)
  assert rows[0]["fallback"] == "popularity" and rows[0]["scores"] is None
  assert rows[0]["items"] == vocab.items[1:4].tolist()
  assert "popularity" in err


def test_predict_reads_an_input_file_and_writes_csv(trained_run, tmp_path,
                                                    capsys):
  history = known_history(trained_run)
  path = tmp_path / "h.txt"
  path.write_text(" ".join(history) + "\n"
                  + json.dumps({"id": "u9", "history": history[:2]}) + "\n")
  assert cli.main(["predict", "--ckpt", trained_run, "--input", str(path),
                   "--topk", "4", "--format", "csv"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == "id,rank,item,score,fallback"
  assert len(lines) == 1 + 2 * 4
  assert lines[5].startswith("u9,1,")


def test_a_malformed_input_line_names_file_and_line(trained_run, tmp_path,
                                                    capsys):
  path = tmp_path / "h.txt"
  path.write_text("1 2 3\n{\"history\": oops}\n")
  line = run_error(capsys, ["predict", "--ckpt", trained_run, "--input",
                            str(path)])
  assert f"{path}:2:" in line


# ----------------------------------------------------------------- export


def readme_loader() -> str:
  """The loader of README's Serving section, verbatim."""
  readme = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")
  with open(readme, encoding="utf-8") as f:
    text = f.read()
  start = text.index("# loader: jax, numpy and the file, no jaxrec")
  return text[start:text.index("```", start)]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
  path = str(tmp_path_factory.mktemp("export") / "model.zip")
  assert cli.main(["export", "--ckpt", trained_run, "--out", path,
                   "--topk", "5"]) == 0
  return path


def test_the_readme_loader_returns_the_top_k_of_predict(trained_run, exported,
                                                        capsys):
  import subprocess
  import sys
  histories = [known_history(trained_run), known_history(trained_run, 2),
               ["nope"] + known_history(trained_run, 3)]
  # jaxrec made unimportable: the loader runs on jax alone.
  script = ("import sys, json\nsys.modules['jaxrec'] = None\n"
            + readme_loader()
            + f"\nprint(json.dumps(recommend({histories!r}, {exported!r})))")
  done = subprocess.run([sys.executable, "-c", script], capture_output=True,
                        text=True, check=False, timeout=120)
  assert done.returncode == 0, done.stderr
  items, scores = json.loads(done.stdout.splitlines()[-1])
  from jaxrec import serving
  preds = serving.Predictor(trained_run).topk(histories, 5)
  assert items == [p.items for p in preds]
  np.testing.assert_allclose(scores, [p.scores for p in preds], rtol=1e-5)


def test_the_export_takes_any_batch_size(exported):
  from jaxrec import serving
  fn, vocab, spec = serving.load_exported(exported)
  for batch in (1, 3):
    ids, scores = fn.call(np.ones((batch, spec["max_len"]), np.int32))
    assert ids.shape == scores.shape == (batch, spec["k"])
  assert vocab.num_items == spec["num_items"]


def test_an_exclude_seen_export_takes_the_whole_history_and_answers_as_predict(
    trained_run, tmp_path):
  from jaxrec import serving
  path = str(tmp_path / "seen.zip")
  assert cli.main(["export", "--ckpt", trained_run, "--out", path,
                   "--topk", "5", "--exclude-seen"]) == 0
  fn, vocab, spec = serving.load_exported(path)
  history, _ = history_past_the_window(trained_run)
  inputs, _, _ = serving.encode_histories(vocab, [history], spec["max_len"])
  ids, scores = fn.call(inputs, serving.seen_ids(vocab, [history]))
  (want,) = serving.Predictor(trained_run).topk([history], 5,
                                                exclude_seen=True)
  assert vocab.items[np.asarray(ids)[0]].tolist() == want.items
  np.testing.assert_allclose(np.asarray(scores)[0], want.scores, rtol=1e-5)
  assert spec["exclude_seen"] and "seen_len" in spec["inputs"]


@pytest.mark.parametrize("argv, named", [
    (["--platforms", "gpu"], "--platforms=gpu"),
    (["--platforms", "cpu,"], "--platforms=cpu,"),
    (["--topk", "0"], "--topk=0"),
    (["--out", "{tmp}/missing/model.zip"], "does not exist"),
    (["--out", "{tmp}"], "is a folder"),
], ids=["unknown-platform", "empty-platform", "k", "no-folder", "a-folder"])
def test_export_options_are_refused_before_the_checkpoint_is_read(
    tmp_path, capsys, argv, named):
  # The run directory does not exist: the option's error must come first.
  argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
  if "--out" not in argv:
    argv += ["--out", str(tmp_path / "model.zip")]
  line = run_error(capsys, ["export", "--ckpt", tmp_path / "no_run"] + argv)
  assert named in line and "no_run" not in line
  assert os.listdir(tmp_path) == []


def test_predict_k_is_refused_before_the_checkpoint_is_read(tmp_path, capsys):
  line = run_error(capsys, ["predict", "--ckpt", tmp_path / "no_run",
                            "--history", "1", "--topk", "0"])
  assert "--topk=0" in line


def test_a_failed_export_write_leaves_the_old_file_and_no_temporary(
    trained_run, tmp_path, monkeypatch, capsys):
  import errno
  import zipfile
  path = tmp_path / "model.zip"
  path.write_bytes(b"the previous export")

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(zipfile.ZipFile, "writestr", full_disk)
  line = run_error(capsys, ["export", "--ckpt", trained_run, "--out", path])
  assert "model.zip" in line and "No space left" in line
  assert os.listdir(tmp_path) == ["model.zip"]
  assert path.read_bytes() == b"the previous export"


# ------------------------------------------------------ growing catalogues


def write_csv(path, inter: Interactions, keep: np.ndarray) -> str:
  with open(path, "w", encoding="utf-8") as f:
    f.write("user_id,item_id,timestamp\n")
    for u, i, t in zip(inter.users[keep], inter.items[keep],
                       inter.timestamps[keep]):
      f.write(f"{u},{i},{t}\n")
  return f"csv:{path}"


@pytest.fixture(scope="module")
def new_version(tmp_path_factory):
  """A later version of synthetic:tiny (what trained_run saw, items 1..50):
  items 1..5 gone, 41..50 replaced by ten items never seen ("n41"..)."""
  base = synthetic.generate("tiny")
  raw = np.asarray(base.items)
  items = np.array([f"n{i}" if i > 40 else str(i) for i in raw])
  inter = Interactions(base.users, items, base.timestamps, "v2")
  root = tmp_path_factory.mktemp("catalogue")
  return write_csv(root / "v2.csv", inter, raw > 5), root


def test_remapped_params_keep_known_rows_and_take_fresh_rows_for_new_items(
    trained_run, new_version):
  import jax
  from jaxrec import models
  from jaxrec.surgery import catalogue
  from jaxrec.training.state import load_params
  params, cfg, _ = load_params(trained_run)
  old = vocab_lib.of_run(trained_run)
  new = pipeline.load_data(DataConfig(source=new_version[0], max_len=20),
                           vocab=old).vocab
  moved, new_cfg, counts = catalogue.remap_items(params, cfg, old, new,
                                                 jax.random.key(0))
  fresh = models.init_params(new_cfg, jax.random.key(0))
  source = catalogue.old_ids_of(old, new)
  known = np.flatnonzero(source > 0)
  new_rows = np.flatnonzero(source == 0)[1:]  # Row 0 is padding.
  assert len(new_rows) == counts["rows_fresh"] == 10
  for name in ("item_embedding", "head"):
    for a, b, f in zip(jax.tree.leaves(params[name]),
                       jax.tree.leaves(moved[name]),
                       jax.tree.leaves(fresh[name])):
      a, b, f = np.asarray(a), np.asarray(b), np.asarray(f)
      np.testing.assert_array_equal(b[known], a[source[known]])
      np.testing.assert_array_equal(b[new_rows], f[new_rows])


def test_init_from_on_a_grown_catalogue_trains_and_records_the_counts(
    trained_run, new_version, capsys):
  v2, root = new_version
  out = str(root / "run2")
  assert cli.main(["train", "--out", out, "--init-from", trained_run,
                   "--data", v2, "--steps", "2", "--eval-every", "2",
                   *TINY_MODEL]) == 0
  printed = capsys.readouterr().out
  old, vocab = vocab_lib.of_run(trained_run), vocab_lib.of_run(out)
  _, meta = checkpoints.read_meta(out)
  entry = meta["lineage"][-1]["catalogue"]
  assert entry["new"] == len(set(vocab.items) - set(old.items)) == 10
  assert entry["known"] + entry["vanished"] == old.num_items - 1
  assert (f"{entry['new']} new (fresh rows), {entry['vanished']} vanished "
          "(kept)") in printed
  assert vocab.items[:old.num_items].tolist() == old.items.tolist()
  assert meta["config"]["model"]["num_items"] == old.num_items + 10


def test_eval_of_a_run_trained_on_new_data_reads_it_by_the_runs_vocabulary(
    trained_run, new_version):
  """The run numbered v2 by trained_run's vocabulary; numbered afresh (by
  v2's own frequencies) the ids were not the model's: a refusal here, and
  silently wrong metrics where the catalogue's size happened to match."""
  from jaxrec import evaluation
  v2, root = new_version
  out = str(root / "run_v2_eval")
  loop.train(config.from_dict({
      "model": {"name": "nextitnet", "num_blocks": 2, "embed_dim": 8},
      "data": {"source": v2, "max_len": 20},
      "train": {"steps": 4, "eval_every": 2, "batch_size": 16}}).validate(),
             out, progress_bar=False, init_from=trained_run)
  with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
    trained = json.load(f)["test"]
  evaluated = evaluation.evaluate_checkpoint(out, split="test")["test"]
  for metric in ("ndcg@10", "hr@10", "mrr@5"):
    assert evaluated[metric] == pytest.approx(trained[metric], abs=1e-6)


def test_dropping_vanished_items_closes_up_the_ids_in_their_old_order(
    trained_run, new_version):
  old = vocab_lib.of_run(trained_run)
  data = pipeline.load_data(DataConfig(source=new_version[0], max_len=20),
                            vocab=old, drop_vanished=True)
  growth = data.meta["vocab_growth"]
  assert growth["vanished"] >= 15 and growth["vanished_policy"] == "dropped"
  kept = data.vocab.items[1:1 + growth["known"]].tolist()
  assert kept == [i for i in old.items.tolist() if i in set(kept)]
  assert data.num_items == 1 + growth["known"] + growth["new"]


def test_a_banded_model_refuses_a_changed_catalogue_in_one_line():
  from jaxrec import config as config_lib
  from jaxrec.surgery import catalogue
  cfg = config_lib.from_dict({"head": {"name": "tree_softmax"}},
                             origin="test")
  with pytest.raises(JaxrecError, match="frequency bands") as e:
    catalogue.check_growable(cfg, "runs/cp")
  assert "\n" not in str(e.value)


# ----------------------------------------------------------- notebook API


def test_load_params_alone_equals_the_params_of_the_whole_state(trained_run):
  import jax
  from jaxrec import evaluation
  params, _, _ = evaluation.load_params(trained_run, "latest")
  state, _, _ = evaluation.load_params(trained_run, "latest",
                                       params_only=False)
  assert "opt_state" in state and "opt_state" not in params
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_param_shapes_are_read_from_metadata_and_match_the_params(
    trained_run):
  import jax
  from jaxrec import evaluation
  shapes, _, _ = evaluation.param_shapes(trained_run)
  params, _, _ = evaluation.load_params(trained_run)
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(shapes))
  assert (jax.tree.map(lambda x: (x.shape, x.dtype), shapes) ==
          jax.tree.map(lambda x: (x.shape, x.dtype), params))


def perturbed_tiny_params():
  """A 2-block model whose every leaf is non-constant (as after training),
  so a reset leaf is told from a copied one."""
  import jax
  from jaxrec import config as config_lib
  from jaxrec import models
  cfg = config_lib.from_dict({"model": {"num_items": 20, "embed_dim": 8,
                                        "num_blocks": 2}}, origin="test")
  params = models.init_params(cfg, jax.random.key(0))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [
      x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)
  ]), cfg


def test_diff_tells_copied_reset_fresh_and_reused_leaves_apart():
  import jax
  from jaxrec.methods.stackrec import growth
  params, cfg = perturbed_tiny_params()
  deep, _ = growth.stack(params, cfg, "adjacent", "paper",
                         rng=jax.random.key(0))
  kinds = {r.path: (r.kind, r.detail) for r in growth.diff(params, deep, cfg)}
  assert kinds["blocks/conv1/kernel"] == ("copied", "rows <- 0,0,1,1")
  assert kinds["blocks/ln1/scale"][0] == "reset"
  assert kinds["head/kernel"][0] == "fresh"
  assert kinds["item_embedding/embedding"][0] == "re-used"


def test_diff_of_preserve_shows_the_duplicates_alpha_reset():
  import jax
  from jaxrec.methods.stackrec import growth
  params, cfg = perturbed_tiny_params()
  deep, _ = growth.stack(params, cfg, "cross", "preserve",
                         rng=jax.random.key(0))
  rows = {r.path: r for r in growth.diff(params, deep, cfg)}
  assert rows["blocks/alpha"].kind == "mixed"
  assert rows["blocks/alpha"].detail.startswith("rows <- 0,1,r,r")
  assert rows["head/kernel"].kind == "re-used"


# ---------------------------------------------------------------- parquet


def write_parquet(path, **columns):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pa.table(columns), str(path))
  return str(path)


def test_a_parquet_source_gives_the_same_sequences_as_its_csv(tmp_path):
  inter = tiny_events()
  keep = np.ones(len(inter.items), bool)
  csv_source = write_csv(tmp_path / "e.csv", inter, keep)
  pq_path = write_parquet(tmp_path / "e.parquet", user=inter.users,
                          item=inter.items.astype(object),
                          ts=inter.timestamps)
  columns = dict(user_col="user", item_col="item", time_col="ts")
  from_csv = pipeline.load_data(DataConfig(source=csv_source, max_len=20))
  from_pq = pipeline.load_data(DataConfig(source=f"parquet:{pq_path}",
                                          max_len=20, **columns))
  np.testing.assert_array_equal(from_csv.train, from_pq.train)
  assert from_csv.vocab.items.tolist() == from_pq.vocab.items.tolist()


def test_a_missing_parquet_column_names_the_option(tmp_path, capsys):
  path = write_parquet(tmp_path / "e.parquet", user_id=[1, 2], item=[3, 4],
                       timestamp=[5, 6])
  line = run_error(capsys, ["train", "--out", str(tmp_path / "o"), "--data",
                            f"parquet:{path}"])
  assert path in line and "'item_id' (data.item_col)" in line


def test_null_ids_in_a_parquet_file_are_one_line_naming_the_column(tmp_path,
                                                                   capsys):
  path = write_parquet(tmp_path / "e.parquet", user_id=[1, None, 2],
                       item_id=["a", "b", "c"], timestamp=[1, 2, 3])
  line = run_error(capsys, ["train", "--out", str(tmp_path / "o"), "--data",
                            f"parquet:{path}"])
  assert "'user_id'" in line and "null" in line and "row 1" in line


def test_a_damaged_parquet_file_is_one_line_naming_it(tmp_path, capsys):
  path = tmp_path / "e.parquet"
  path.write_bytes(b"PAR1 not really")
  line = run_error(capsys, ["train", "--out", str(tmp_path / "o"), "--data",
                            f"parquet:{path}"])
  assert str(path) in line


# ------------------------------------------------------------ defaults


def test_a_run_with_default_stopping_ends_once_validation_stalls(tmp_path):
  """No --steps, --eval-every or --patience: validation once per epoch,
  and the run ends 30 validations after the last gain, not after 100
  epochs (a learning rate this small never changes a rank)."""
  out = str(tmp_path / "run")
  assert cli.main(["train", "--out", out, "--data", "synthetic:tiny",
                   "--learning-rate", "1e-12", *TINY_MODEL]) == 0
  with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
    metrics = json.load(f)
  assert metrics["epochs"] == 31  # The first validation, then 30 stalled.
  assert metrics["best_step"] == metrics["steps_per_epoch"]
