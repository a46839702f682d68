"""Tests for jaxrec.data.pipeline: formats, processing, protocols, cache."""
import sys
import zipfile

import numpy as np
import pytest

from jaxrec.data import pipeline as ip
from jaxrec.data import text_table
from jaxrec.config import DataConfig
from jaxrec.errors import JaxrecError
from jaxrec.data.sequences import Interactions

# (user, item, rating, timestamp): 3 users, every one with >= 3 events.
EVENTS = [(1, 10, 4, 100), (1, 20, 3, 101), (1, 30, 5, 102),
          (2, 20, 2, 200), (2, 30, 4, 201), (2, 40, 1, 202), (2, 10, 5, 203),
          (3, 30, 3, 300), (3, 10, 4, 301), (3, 50, 2, 302)]
USERS = [e[0] for e in EVENTS]
ITEMS = [e[1] for e in EVENTS]
TIMES = [e[3] for e in EVENTS]


def make_cfg(tmp_path, source="synthetic", **kw):
  options = dict(min_user_count=1, min_item_count=1, max_len=5,
                 cache_dir=str(tmp_path / "cache"))
  options.update(kw)
  return DataConfig(source=source, **options)


def inter(rows, name="hand"):
  users, items, times = zip(*rows)
  return Interactions(np.array(users), np.array(items), np.array(times), name)


def read(tmp_path, source, **kw):
  cfg = make_cfg(tmp_path, source, **kw)
  return ip.resolve_source(cfg.source, cfg).read()


def assert_events(parsed, users=USERS, items=ITEMS, times=TIMES):
  np.testing.assert_array_equal(parsed.users, users)
  np.testing.assert_array_equal(parsed.items, items)
  np.testing.assert_array_equal(parsed.timestamps, times)


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  return path


def u_data():
  return "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in EVENTS)


def ratings_dat():
  return "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in EVENTS)


def ratings_csv():
  rows = "".join(f"{u},{i},{r}.5,{t}\n" for u, i, r, t in EVENTS)
  return "userId,movieId,rating,timestamp\n" + rows


def error(tmp_path, source, **kw):
  with pytest.raises(JaxrecError) as info:
    ip.load_data(make_cfg(tmp_path, source, **kw))
  message = str(info.value)
  assert "\n" not in message
  return message


# ----------------------------------------------------------------- formats


def test_movielens_100k_u_data_parses(tmp_path):
  write(tmp_path / "ml-100k" / "u.data", u_data())
  assert_events(read(tmp_path, f"movielens:{tmp_path / 'ml-100k'}"))


def test_movielens_1m_ratings_dat_in_directory_subfolder(tmp_path):
  write(tmp_path / "data" / "ml-1m" / "ratings.dat", ratings_dat())
  assert_events(read(tmp_path, f"movielens:{tmp_path / 'data'}"))


def test_movielens_1m_ratings_dat_inside_zip(tmp_path):
  with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w") as zf:
    zf.writestr("ml-1m/movies.dat", "1::Toy Story (1995)::Animation\n")
    zf.writestr("ml-1m/ratings.dat", ratings_dat())
  parsed = read(tmp_path, f"movielens:{tmp_path / 'ml-1m.zip'}")
  assert_events(parsed)
  assert parsed.name.endswith("ml-1m.zip:ml-1m/ratings.dat")


def test_movielens_20m_ratings_csv_parses(tmp_path):
  write(tmp_path / "ml-20m" / "ratings.csv", ratings_csv())
  assert_events(read(tmp_path, f"movielens:{tmp_path / 'ml-20m'}"))


TRICKY_CSVS = {
    "spaces around ids": "u,i,t\n 1, 10 ,5\n2 ,20, 6\n",
    "string ids": "u,i,t\nalice,x1,5\nbob,x2,6\n",
    "mixed ids": "u,i,t\n1,10,5\nbob,x2,6\n",
    "float times": "u,i,t\n1,10,5.5\n2,20,6\n",
    "times past 2**53": f"u,i,t\n1,10,{2**60 + 1}\n2,20,{2**60}\n",
    "quotes kept": 'u,i,t\n"1",10,5\n2,"x",6\n',
    "NA is an id": "u,i,t\nNA,10,5\nnull,20,6\n",
    "blank lines": "u,i,t\n1,10,5\n\n2,20,6\n\n",
    "crlf": "u,i,t\r\n1,10,5\r\n2,20,6\r\n",
}


@pytest.mark.parametrize("case", sorted(TRICKY_CSVS))
def test_pyarrow_reads_as_the_line_by_line_pass(tmp_path, case):
  path = write(tmp_path / "x.csv", TRICKY_CSVS[case])
  fmt = text_table.TextFormat(",", ("u", "i", "t"), ("", "", ""))
  opener = lambda: open(path, "rb")  # pylint: disable=unnecessary-lambda-assignment
  cols, num_fields = text_table._header_columns(opener, str(path), fmt)  # pylint: disable=protected-access
  fast = text_table._arrow_table(opener, fmt, cols, num_fields)  # pylint: disable=protected-access
  slow = text_table._slow_table(opener, str(path), fmt, cols, num_fields)  # pylint: disable=protected-access
  assert fast is not None, case  # pyarrow read it, and read it alike:
  for a, b in zip(fast, slow):
    assert a.dtype.kind == b.dtype.kind, case
    np.testing.assert_array_equal(a, b)


def test_csv_custom_column_names(tmp_path):
  rows = "".join(f"{t},{i},{u},x\n" for u, i, _, t in EVENTS)
  path = write(tmp_path / "log.csv", "when,what,who,note\n" + rows)
  assert_events(read(tmp_path, f"csv:{path}", user_col="who", item_col="what",
                     time_col="when"))


def test_tsv_delimiter_sniffed_from_extension(tmp_path):
  rows = "".join(f"{u}\t{i}\t{t}\n" for u, i, _, t in EVENTS)
  path = write(tmp_path / "log.tsv", "uid\tiid\tts\n" + rows)
  assert_events(read(tmp_path, f"csv:{path}", user_col="uid", item_col="iid",
                     time_col="ts"))


@pytest.mark.parametrize("sep", [";", "::", "|"])
def test_csv_explicit_delimiter(tmp_path, sep):
  rows = "".join(f"{u}{sep}{i}{sep}{t}\n" for u, i, _, t in EVENTS)
  header = sep.join(["user_id", "item_id", "timestamp"])
  path = write(tmp_path / "log.txt", header + "\n" + rows)
  assert_events(read(tmp_path, f"csv:{path}", delimiter=sep))


def test_csv_string_ids_stay_strings(tmp_path):
  rows = "".join(f"u{u},item-{i},{t}\n" for u, i, _, t in EVENTS)
  path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n" + rows)
  parsed = read(tmp_path, f"csv:{path}")
  assert_events(parsed, [f"u{u}" for u in USERS], [f"item-{i}" for i in ITEMS])


def test_recbole_inter_parses(tmp_path):
  header = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
  rows = "".join(f"{u}\t{i}\t{r}.0\t{t}.0\n" for u, i, r, t in EVENTS)
  path = write(tmp_path / "ml.inter", header + rows)
  assert_events(read(tmp_path, f"recbole:{path}"))


def test_synthetic_source_passes_size_string(tmp_path):
  calls = []

  def fake(size):
    calls.append(size)
    return inter([(e[0], e[1], e[3]) for e in EVENTS])

  ip.load_data(make_cfg(tmp_path, "synthetic:tiny"), synthetic_fn=fake)
  ip.load_data(make_cfg(tmp_path, "synthetic"), synthetic_fn=fake)
  assert calls == ["tiny", ip.DEFAULT_SYNTHETIC_SIZE]


# -------------------------------------------------------------- processing


@pytest.mark.parametrize("scale", [1, 0.5])  # Integer and float timestamps.
def test_tied_timestamps_keep_file_order(tmp_path, scale):
  # By time, ties in file order: x y w z. Training holds x and y (once
  # each, so ids by first appearance: x=1 y=2); w and z come after: w=3 z=4.
  rows = [("a", "w", 2), ("a", "x", 1), ("a", "y", 1), ("a", "z", 2)]
  data = ip.build_sequences(inter([(u, i, t * scale) for u, i, t in rows]),
                            make_cfg(tmp_path, max_len=3))
  np.testing.assert_array_equal(data.test_inputs, [[1, 2, 3]])
  np.testing.assert_array_equal(data.test_targets, [4])


def test_k_core_filter_iterates_until_stable(tmp_path):
  # Pass 1 drops R and S (seen once); pass 2 drops u2 (1 event left);
  # pass 3 drops X (now seen once). u1 and u3 keep a, b, c.
  rows = [("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u1", "X", 4),
          ("u3", "a", 1), ("u3", "b", 2), ("u3", "c", 3),
          ("u2", "X", 1), ("u2", "R", 2), ("u2", "S", 3)]
  data = ip.build_sequences(inter(rows),
                            make_cfg(tmp_path, min_user_count=3,
                                     min_item_count=2))
  assert data.meta["num_users"] == 2
  assert data.meta["num_items"] == 3
  assert data.meta["num_interactions"] == 6


def test_item_id_1_is_the_most_frequent_in_training(tmp_path):
  rows = []
  for u in range(6):
    rows += [(u, f"own{u}-{k}", k) for k in range(4)]
    rows += [(u, "hit", 4), (u, f"own{u}-4", 5), (u, f"own{u}-5", 6)]
  data = ip.build_sequences(inter(rows), make_cfg(tmp_path))
  assert data.item_counts[1] == 6 and data.item_counts[2:].max() == 1
  np.testing.assert_array_equal(data.valid_inputs[:, -1], np.ones(6))


def test_items_only_in_valid_or_test_get_the_last_ids(tmp_path):
  # "hit" is every user's test target, the most frequent item overall, but
  # never in training: ranking by all events would leak the test targets.
  rows = []
  for u in range(6):
    rows += [(u, f"own{u}-{k}", k) for k in range(3)] + [(u, "hit", 9)]
  data = ip.build_sequences(inter(rows), make_cfg(tmp_path))
  hit = data.test_targets[0]
  np.testing.assert_array_equal(data.test_targets, np.full(6, hit))
  assert data.item_counts[hit] == 0
  assert hit > data.train.max()  # After every item seen in training.
  assert data.num_items == 6 * 3 + 2


def test_loo_split_on_hand_example(tmp_path):
  # Training events (all but each user's last two): A 10 20 30, B 50, each
  # once, so by first appearance 10->1 20->2 30->3 50->4; 40, never in
  # training, comes last: 40->5.
  rows = [("A", 10, 1), ("A", 20, 2), ("A", 30, 3), ("A", 40, 4),
          ("A", 50, 5), ("B", 50, 1), ("B", 40, 2), ("B", 50, 3)]
  data = ip.build_sequences(inter(rows), make_cfg(tmp_path, max_len=3))
  np.testing.assert_array_equal(data.test_inputs, [[2, 3, 5], [0, 4, 5]])
  np.testing.assert_array_equal(data.test_targets, [4, 4])
  np.testing.assert_array_equal(data.valid_inputs, [[1, 2, 3], [0, 0, 4]])
  np.testing.assert_array_equal(data.valid_targets, [5, 5])
  # B's training prefix is one item (no transition), so it has no row.
  np.testing.assert_array_equal(data.train, [[0, 1, 2, 3]])
  np.testing.assert_array_equal(data.item_counts, [0, 1, 1, 1, 0, 0])
  assert data.num_items == 6
  assert data.meta == dict(source="synthetic", protocol="loo", num_users=2,
                           num_items=5, num_interactions=8, num_train_rows=1,
                           num_valid=2, num_test=2, max_len=3)


def test_window_0_keeps_only_the_last_max_len_plus_one_items(tmp_path):
  rows = [("A", i, i) for i in range(1, 11)]  # ids = 1..10 by appearance.
  data = ip.build_sequences(inter(rows), make_cfg(tmp_path, max_len=4,
                                                  window=0))
  np.testing.assert_array_equal(data.train, [[4, 5, 6, 7, 8]])


def test_by_default_every_training_transition_is_a_target_once(tmp_path):
  """Windows of max_len from the end back, sharing one item: the loo
  training part 1..8 of a 10-item history gives transitions 1->2 .. 7->8,
  each in exactly one row."""
  rows = [("A", i, i) for i in range(1, 11)]
  data = ip.build_sequences(inter(rows), make_cfg(tmp_path, max_len=4))
  np.testing.assert_array_equal(data.train, [[4, 5, 6, 7, 8],
                                             [0, 1, 2, 3, 4]])
  pairs = [(a, b) for row in data.train.tolist()
           for a, b in zip(row[:-1], row[1:]) if a]
  assert sorted(pairs) == [(i, i + 1) for i in range(1, 8)]


def unique_events(num_users, length):
  """Every event has its own item, so an item id names one (user, position).

  Items are unique and written in user order. Ids rank training items
  first, each group by first appearance: under `paper` a user's items are
  all training or all held out, so each user's ids stay consecutive and
  (id - 1) // length is a relabelling of the users.
  """
  return inter([(u, f"{u}:{p}", p) for u in range(num_users)
                for p in range(length)])


def test_loo_no_leakage(tmp_path):
  length = 12
  data = ip.build_sequences(unique_events(20, length),
                            make_cfg(tmp_path, max_len=4, window=3))
  trained = set(data.train[data.train > 0].tolist())
  users = np.arange(20)
  # Training items (positions 0..length-3 of each user) take ids 1..T; the
  # held-out ones follow in order of appearance: valid, test, next user.
  num_trained = 20 * (length - 2)
  assert trained == set(range(1, num_trained + 1))
  np.testing.assert_array_equal(data.valid_targets,
                                num_trained + 2 * users + 1)
  np.testing.assert_array_equal(data.test_targets,
                                num_trained + 2 * users + 2)
  np.testing.assert_array_equal(data.valid_inputs[:, -1],
                                (users + 1) * (length - 2))


def test_paper_no_leakage(tmp_path):
  length = 6
  data = ip.build_sequences(unique_events(30, length),
                            make_cfg(tmp_path, protocol="paper", max_len=8))
  user_of = lambda ids: set(((ids[ids > 0] - 1) // length).tolist())
  train_users = user_of(data.train)
  eval_users = user_of(data.test_inputs) | user_of(data.valid_inputs)
  assert not train_users & eval_users
  assert user_of(data.test_targets) == user_of(data.test_inputs)


def test_paper_split_users_disjoint_and_sized(tmp_path):
  length = 4
  data = ip.build_sequences(unique_events(30, length),
                            make_cfg(tmp_path, protocol="paper"))
  user_of = lambda ids: ((ids - 1) // length).tolist()
  test, valid = user_of(data.test_targets), user_of(data.valid_targets)
  train = user_of(data.train[:, -1])
  assert (len(test), len(valid), len(train)) == (6, 3, 21)
  assert len(set(test) | set(valid) | set(train)) == 30
  # Target = the last item, input = all before it.
  np.testing.assert_array_equal(data.test_inputs[:, -1],
                                data.test_targets - 1)


def test_paper_split_is_deterministic_for_a_seed(tmp_path):
  events = unique_events(40, 3)
  split = lambda seed: ip.build_sequences(
      events, make_cfg(tmp_path, protocol="paper", split_seed=seed))
  first, again, other = split(7), split(7), split(8)
  np.testing.assert_array_equal(first.test_targets, again.test_targets)
  np.testing.assert_array_equal(first.train, again.train)
  assert set(first.test_targets) != set(other.test_targets)


def test_windows_cover_every_transition_exactly_once(tmp_path):
  rows = [("A", i, i) for i in range(1, 26)] + [("B", i, i)
                                                for i in range(26, 33)]
  data = ip.build_sequences(inter(rows),
                            make_cfg(tmp_path, max_len=6, window=4))
  pairs = [(a, b) for row in data.train.tolist()
           for a, b in zip(row[:-1], row[1:]) if a]
  # loo trains on all but the last two items of each user: A's first 23
  # (ids 1..23) and B's first 5 (ids 24..28).
  expected = [(i, i + 1) for i in range(1, 23)] + [(i, i + 1)
                                                    for i in range(24, 28)]
  assert sorted(pairs) == expected
  assert (np.count_nonzero(data.train, axis=1) <= 5).all()
  assert data.train.shape[1] == 7


def test_item_counts_come_from_training_rows(tmp_path):
  data = ip.build_sequences(unique_events(5, 6), make_cfg(tmp_path))
  expected = np.bincount(data.train.ravel(), minlength=data.num_items)
  expected[0] = 0
  np.testing.assert_array_equal(data.item_counts, expected)
  assert data.item_counts[data.test_targets].sum() == 0


# ------------------------------------------------------------------- cache


def csv_source(tmp_path):
  path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n" + "".join(
      f"{u},{i},{t}\n" for u, i, _, t in EVENTS))
  return f"csv:{path}"


def cache_files(tmp_path):
  return sorted((tmp_path / "cache").glob("*.npz"))


def test_cache_hit_returns_identical_arrays(tmp_path, monkeypatch):
  cfg = make_cfg(tmp_path, csv_source(tmp_path))
  first = ip.load_data(cfg)
  monkeypatch.setattr(ip, "build_sequences", pytest.fail)
  second = ip.load_data(cfg)
  for name in ("train", "valid_inputs", "valid_targets", "test_inputs",
               "test_targets", "item_counts"):
    np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
  assert (second.fingerprint, second.meta) == (first.fingerprint, first.meta)
  assert [p.name for p in cache_files(tmp_path)] == [
      f"sequences-{first.fingerprint}.npz"]


@pytest.mark.parametrize("damage", [b"garbage", None])
def test_corrupt_cache_file_is_rebuilt(tmp_path, damage):
  cfg = make_cfg(tmp_path, csv_source(tmp_path))
  first = ip.load_data(cfg)
  (path,) = cache_files(tmp_path)
  blob = path.read_bytes()
  path.write_bytes(damage or blob[:len(blob) // 2])  # Or truncated.
  again = ip.load_data(cfg)
  np.testing.assert_array_equal(first.train, again.train)
  assert path.read_bytes() == blob


def test_fingerprint_changes_with_options_and_contents(tmp_path):
  source = csv_source(tmp_path)
  base = ip.load_data(make_cfg(tmp_path, source)).fingerprint
  other_len = ip.load_data(make_cfg(tmp_path, source, max_len=6)).fingerprint
  with open(source[4:], "a") as f:
    f.write("3,20,303\n")
  edited = ip.load_data(make_cfg(tmp_path, source)).fingerprint
  assert len({base, other_len, edited}) == 3


def test_cache_dir_defaults_to_jaxrec_cache_env(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXREC_CACHE", str(tmp_path / "env"))
  ip.load_data(make_cfg(tmp_path, csv_source(tmp_path), cache_dir=""))
  assert len(list((tmp_path / "env").glob("sequences-*.npz"))) == 1


# -------------------------------------------------------------- bad input


def test_missing_file_names_path(tmp_path):
  message = error(tmp_path, f"csv:{tmp_path / 'nope.csv'}")
  assert "nope.csv" in message and "no such file" in message


def test_directory_without_ratings_file(tmp_path):
  write(tmp_path / "ml" / "movies.dat", "1::Heat::Action\n")
  message = error(tmp_path, f"movielens:{tmp_path / 'ml'}")
  assert str(tmp_path / "ml") in message and "ratings.dat" in message


def test_zip_without_ratings_file(tmp_path):
  with zipfile.ZipFile(tmp_path / "ml.zip", "w") as zf:
    zf.writestr("ml/movies.dat", "1::Heat::Action\n")
  message = error(tmp_path, f"movielens:{tmp_path / 'ml.zip'}")
  assert "ml.zip" in message and "no MovieLens ratings file" in message


def test_damaged_zip_is_one_line_error(tmp_path):
  with zipfile.ZipFile(tmp_path / "ml-1m.zip", "w",
                       zipfile.ZIP_DEFLATED) as zf:
    zf.writestr("ml-1m/ratings.dat", ratings_dat() * 50)
  blob = bytearray((tmp_path / "ml-1m.zip").read_bytes())
  blob[60:80] = bytes(20)  # Inside the compressed member.
  (tmp_path / "ml-1m.zip").write_bytes(bytes(blob))
  message = error(tmp_path, f"movielens:{tmp_path / 'ml-1m.zip'}")
  assert "ml-1m.zip" in message


def test_row_with_missing_field_names_line(tmp_path):
  path = write(tmp_path / "ratings.csv", ratings_csv().replace(
      "2,30,4.5,201\n", "2,30,201\n"))
  message = error(tmp_path, f"movielens:{path}")
  assert f"{path}:6:" in message and "expected 4 fields" in message


def test_row_with_extra_field_names_line(tmp_path):
  path = write(tmp_path / "log.tsv", "user_id\titem_id\ttimestamp\n1\t2\t3\n"
               "1\t3\t4\tx\n")
  message = error(tmp_path, f"csv:{path}")
  assert f"{path}:3:" in message and "got 4" in message


def test_malformed_ratings_dat_row_names_line(tmp_path):
  write(tmp_path / "ml-1m" / "ratings.dat", ratings_dat().replace(
      "3::10::4::301", "3::10::4:301"))
  message = error(tmp_path, f"movielens:{tmp_path / 'ml-1m'}")
  assert "ratings.dat:9:" in message


def test_non_numeric_timestamp_names_line(tmp_path):
  path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n1,2,3\n"
               "1,3,yesterday\n")
  message = error(tmp_path, f"csv:{path}")
  assert f"{path}:3:" in message and "'yesterday'" in message


def test_non_integer_movielens_id_names_line(tmp_path):
  write(tmp_path / "ml-100k" / "u.data", u_data().replace("2\t40", "two\t40"))
  message = error(tmp_path, f"movielens:{tmp_path / 'ml-100k'}")
  assert "u.data:6:" in message and "user id 'two'" in message


def test_missing_column_names_option_and_header(tmp_path):
  path = write(tmp_path / "log.csv", "user,item,time\n1,2,3\n")
  message = error(tmp_path, f"csv:{path}", user_col="user", item_col="item")
  assert "'timestamp'" in message and "data.time_col" in message
  assert "['user', 'item', 'time']" in message and f"{path}:1:" in message


def test_recbole_missing_field_names_it(tmp_path):
  path = write(tmp_path / "x.inter", "user_id:token\titem_id:token\n1\t2\n")
  message = error(tmp_path, f"recbole:{path}")
  assert "'timestamp'" in message and "x.inter" in message


def test_header_only_file_has_no_interactions(tmp_path):
  path = write(tmp_path / "log.csv", "user_id,item_id,timestamp\n")
  assert "no interactions" in error(tmp_path, f"csv:{path}")


def test_empty_after_filtering_names_options(tmp_path):
  message = error(tmp_path, csv_source(tmp_path), min_user_count=50)
  assert "data.min_user_count=50" in message
  assert "data.min_item_count=1" in message


def test_unknown_source_kind(tmp_path):
  message = error(tmp_path, "avro:x.avro")
  assert "'avro'" in message


def test_window_longer_than_max_len(tmp_path):
  message = error(tmp_path, csv_source(tmp_path), window=9, max_len=5)
  assert "data.window=9" in message and "data.max_len=5" in message


def test_tfds_missing_package_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  message = error(tmp_path, "tfds:movielens/1m-ratings")
  assert "pip install jaxrec[tfds]" in message


def mock_tfds_movielens(rows):
  """Serves `rows` as any tfds data set, through tfds.load's own code path."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  users, items, times = zip(*rows) if rows else ((), (), ())
  # MovieLens in tfds: text ids, int64 seconds, and a ragged genre list.
  lengths = [1 + n % 2 for n in range(len(rows))]
  genres = tf.RaggedTensor.from_row_lengths(
      tf.zeros([sum(lengths)], tf.int64), tf.constant(lengths, tf.int64))
  columns = {"user_id": tf.constant([str(u) for u in users], tf.string),
             "movie_id": tf.constant([str(i) for i in items], tf.string),
             "timestamp": tf.constant(times, tf.int64), "movie_genres": genres}

  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    return tf.data.Dataset.from_tensor_slices(columns)

  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def test_tfds_source_reads_text_ids_and_times(tmp_path):
  with mock_tfds_movielens([(u, i, t) for u, i, _, t in EVENTS]):
    parsed = read(tmp_path, "tfds:movielens/100k-ratings")
  assert_events(parsed, [str(u) for u in USERS], [str(i) for i in ITEMS])
  assert parsed.name == "tfds:movielens/100k-ratings"


def test_tfds_source_builds_sequences_in_time_order(tmp_path):
  shuffled = [(u, i, t) for u, i, _, t in reversed(EVENTS)]
  with mock_tfds_movielens(shuffled):
    data = ip.load_data(make_cfg(tmp_path, "tfds:movielens/100k-ratings"))
  raw = np.asarray(data.vocab.items)
  # User "2" saw 20, 30, 40, 10: loo tests the last, validates the one before.
  second = list(data.vocab.users).index("2")
  assert raw[data.test_targets[second]] == "10"
  assert raw[data.valid_targets[second]] == "40"


def test_tfds_source_with_no_rows_is_one_line_error(tmp_path):
  with mock_tfds_movielens([]):
    message = error(tmp_path, "tfds:movielens/100k-ratings")
  assert "tfds:movielens/100k-ratings" in message and "no rows" in message
