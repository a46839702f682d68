"""Users' workflows: the vocabulary of a run, predictions in raw ids,
exported scoring functions, catalogues that grow, the notebook API."""
import json
import os

import numpy as np
import pytest

from jaxrec import cli
from jaxrec.config import DataConfig
from jaxrec.data import pipeline, synthetic
from jaxrec.data import vocabulary as vocab_lib
from jaxrec.data.sequences import Interactions
from jaxrec.errors import JaxrecError
from jaxrec.training import checkpoints

TINY_MODEL = ["--num-blocks", "2", "--embed-dim", "8", "--batch-size", "16",
              "--max-len", "20", "--quiet"]
TINY = ["--data", "synthetic:tiny", "--steps", "6", "--eval-every", "3",
        *TINY_MODEL]


def run_error(capsys, argv):
  """Runs the CLI expecting a user error: exit 2 and exactly one line."""
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert err[0].startswith("jaxrec: error: ")
  return err[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("run"))
  assert cli.main(["train", "--out", out] + TINY) == 0
  return out


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


def test_surgery_copies_the_vocabulary_of_its_source(trained_run, tmp_path):
  grown = str(tmp_path / "grown")
  assert cli.main(["grow", "--from", trained_run, "--out", grown,
                   "--method", "cross"]) == 0
  assert (vocab_lib.of_run(grown).fingerprint() ==
          vocab_lib.of_run(trained_run).fingerprint())
