"""From a data source to split, padded `SequenceData`, with an on-disk cache.

`load_data(cfg)` parses `cfg.source` into `Interactions`, builds per-user
chronological sequences, applies the iterated k-core filter, remaps items to
1..V-1 by popularity (0 = padding) and splits by protocol:

  loo:   per user, test = last item, valid = second to last, training rows
         come only from the items before both targets.
  paper: users are shuffled with `split_seed`; whole sequences go to test,
         valid or train, and their last item is the target.

Training rows never contain a valid or test target position. The result is
cached as one .npz keyed by a fingerprint of the source contents and every
processing option.

Sources: a registered data set's name (`movielens-100k`, fetched on first
use: `jaxrec.data.registry`), `synthetic[:SIZE]`, `movielens:PATH`
(directory or GroupLens zip), `csv:PATH`, `parquet:PATH` (pyarrow),
`recbole:PATH.inter`, `tfds:NAME`. Text files are parsed with numpy's C `loadtxt` (a few seconds for ML-20M); only when that fails (a bad
row, string ids) a line-by-line pass runs, which names the first bad line.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import tempfile
import warnings
import zipfile
import zlib
from typing import Any, Callable, ContextManager, IO

import numpy as np

from jaxrec import config as config_lib
from jaxrec.config import DataConfig
from jaxrec.errors import JaxrecError, reported_as
from jaxrec.data import registry
from jaxrec.data.sequences import Interactions, SequenceData
from jaxrec.data.vocabulary import Vocabulary

log = logging.getLogger(__name__)

# Bump when processing changes, so old caches are not reused.
PIPELINE_VERSION = 2  # 2: ids ranked by training-split frequency.
DEFAULT_SYNTHETIC_SIZE = "small"  # `synthetic` alone; synthetic.generate's.
SOURCE_KINDS = ("synthetic", "movielens", "csv", "parquet", "recbole", "tfds")
# MovieLens ratings files, in the order they are looked for.
MOVIELENS_FILES = ("ratings.dat", "ratings.csv", "u.data")
# Whole-file hashing below this size; above, size + mtime + both ends.
FULL_HASH_LIMIT = 256 << 20
EDGE_BYTES = 1 << 20
_CHUNK = 1 << 24
_ARRAY_FIELDS = ("train", "valid_inputs", "valid_targets", "test_inputs",
                 "test_targets", "item_counts")

Opener = Callable[[], ContextManager[IO[bytes]]]
SyntheticFn = Callable[[str], Interactions]


# ----------------------------------------------------------------- public API


def load_data(cfg: DataConfig,
              synthetic_fn: SyntheticFn | None = None,
              vocab: Vocabulary | None = None,
              drop_vanished: bool = False) -> SequenceData:
  """Parses, filters, splits and caches `cfg.source` (see module docstring).

  Args:
    cfg: the data options.
    synthetic_fn: replaces `jaxrec.data.synthetic.generate` for `synthetic[:SIZE]`
      sources; called with the size string.
    vocab: a checkpoint's vocabulary to number items by (`--init-from`,
      `eval --data`): see `build_sequences`.
    drop_vanished: with `vocab`, renumber without the items this data no
      longer has (default: keep their ids).
  """
  _check_options(cfg)  # Before any parsing, so a typo fails at once.
  source = resolve_source(cfg.source, cfg, synthetic_fn)
  fingerprint = data_fingerprint(cfg, source.key, vocab, drop_vanished)
  path = os.path.join(cache_dir(cfg), f"sequences-{fingerprint}.npz")
  data = load_cache(path, fingerprint)
  if data is not None:
    log.info("data: cache hit %s", path)
    return data
  data = build_sequences(source.read(), cfg, fingerprint, vocab,
                         drop_vanished)
  save_cache(path, data)
  return data


@dataclasses.dataclass(frozen=True)
class Source:
  """A resolved source: what identifies its contents, and how to parse it."""
  key: str  # Content identity for the fingerprint (a digest or name+version).
  read: Callable[[], Interactions]


def resolve_source(spec: str, cfg: DataConfig,
                   synthetic_fn: SyntheticFn | None = None) -> Source:
  """Checks that `spec` (a `data.source` string) exists, fetching a named
  data set on first use; parses nothing yet."""
  if registry.is_name(spec):
    return registered_source(registry.fetch(spec))
  kind, _, arg = spec.partition(":")
  if kind not in SOURCE_KINDS:
    raise JaxrecError(f"data.source={spec!r}: unknown kind {kind!r}; expected "
                      f"a data set ({', '.join(registry.DATASETS)}), "
                      "synthetic[:SIZE], movielens:PATH, csv:PATH, "
                      "parquet:PATH, recbole:PATH.inter or tfds:NAME")
  if kind in config_lib.TRANSFER_SOURCES:
    raise JaxrecError(f"data.source={spec!r}: a PeterRec downstream file, "
                      f"read by `jaxrec finetune --task {kind}`, not a "
                      "sequence source")
  if kind == "synthetic":
    return _synthetic_source(arg or DEFAULT_SYNTHETIC_SIZE, synthetic_fn)
  if not arg:
    raise JaxrecError(f"data.source={spec!r}: missing the "
                      f"{'NAME' if kind == 'tfds' else 'PATH'} after ':'")
  if kind == "tfds":
    return Source(f"tfds:{arg}", functools.partial(read_tfds, arg))
  path = os.path.expanduser(arg)
  if not os.path.exists(path):
    hint = (" (`jaxrec data fetch NAME` fetches GroupLens's data sets; "
            "`--data NAME` reads them)" if kind == "movielens" else "")
    raise JaxrecError(f"{path}: no such file or directory "
                      f"(data.source={spec!r}){hint}")
  if kind == "movielens":
    return _movielens_source(path)
  if kind == "csv":
    return _file_source(path, csv_format(path, cfg))
  if kind == "parquet":
    if not os.path.isfile(path):
      raise JaxrecError(f"{path}: not a file")
    columns = (cfg.user_col, cfg.item_col, cfg.time_col)
    return Source(_file_digest(path),
                  functools.partial(read_parquet, path, columns))
  return _file_source(path, recbole_format())


def registered_source(found: registry.Fetched) -> Source:
  """The ratings of a fetched data set (`jaxrec.data.registry`)."""
  where = found.files["ratings"]
  if isinstance(where, tuple):  # A member of the publisher's zip.
    zip_path, member = where
    fmt = movielens_format(member.rsplit("/", 1)[-1])
    return Source(found.key, functools.partial(_read_member, zip_path, member,
                                               fmt))
  return Source(found.key, functools.partial(
      read_parquet, where, ("user_id", "movie_id", "timestamp")))


def build_sequences(inter: Interactions, cfg: DataConfig,
                    fingerprint: str = "", vocab: Vocabulary | None = None,
                    drop_vanished: bool = False) -> SequenceData:
  """Filters, remaps, orders and splits raw events (no caching).

  `meta["num_items"]` counts real items (V - 1); `num_items` on the result is
  V, padding included. The result's `vocab` maps its ids back to raw ids.

  Without `vocab`, ids rank items by training-split frequency. With one (a
  checkpoint's), an item it knows keeps its id, so a model's rows stay
  meaningful across data versions; items it has never seen get the ids
  after its last one, ranked by training frequency among themselves; items
  it has that this data lacks ("vanished") keep their ids, or with
  `drop_vanished` are removed and the remaining ids closed up in their old
  order. `meta["vocab_growth"]` counts known, new and vanished items.
  """
  _check_options(cfg)
  loo = cfg.protocol == "loo"
  events = _filtered_events(inter, cfg, min_len=3 if loo else 2)
  users, items, order = events.users, events.items, events.order
  codes = items[order]
  user_sorted = users[order]
  starts = np.flatnonzero(np.r_[True, user_sorted[1:] != user_sorted[:-1]])
  ends = np.r_[starts[1:], len(codes)]
  split = _split_loo if loo else _split_paper
  # Ids rank items by their frequency in the training split alone (CpRec's
  # frequency bands are id ranges): ranking by all events would let the
  # valid and test targets decide which items get the large embeddings.
  train_codes = _training_events(codes, *split(codes, starts, ends,
                                               cfg)["train"])
  num_codes = int(codes.max()) + 1
  growth = None
  if vocab is None:
    new_ids = _popularity_ranks(num_codes, train_codes)
    item_raw = np.empty(num_codes + 1, dtype=events.item_raw.dtype)
    item_raw[0] = ""  # Padding.
    item_raw[new_ids] = events.item_raw
  else:
    new_ids, item_raw, growth = _ids_from_vocab(
        events.item_raw, train_codes, num_codes, vocab, drop_vanished)
  seq = new_ids[codes]
  parts = split(seq, starts, ends, cfg)
  train = _train_rows(seq, *parts.pop("train"), cfg)
  # Not seq.max() + 1: a vocabulary may keep ids of items this data lacks.
  num_items = len(item_raw)
  counts = np.bincount(train.ravel(), minlength=num_items).astype(np.int64)
  counts[0] = 0
  meta = dict(source=cfg.source, protocol=cfg.protocol,
              num_users=len(starts), num_items=num_items - 1,
              num_interactions=len(seq), num_train_rows=len(train),
              num_valid=len(parts["valid_targets"]),
              num_test=len(parts["test_targets"]), max_len=cfg.max_len)
  if growth is not None:
    meta["vocab_growth"] = growth
  users_raw = events.user_raw[user_sorted[starts]]
  return SequenceData(num_items=num_items, train=train, item_counts=counts,
                      fingerprint=fingerprint, meta=meta,
                      vocab=Vocabulary(item_raw, users_raw), **parts)


def _ids_from_vocab(item_raw: np.ndarray, train_codes: np.ndarray,
                    num_codes: int, vocab: Vocabulary, drop_vanished: bool
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(id of each item code, raw id of each id, counts): see
  `build_sequences`. Ids of the result start at 1; index 0 of the id array
  is padding."""
  lookup = vocab.index()
  raw = item_raw.astype(str)
  old = np.fromiter((lookup.get(r, 0) for r in raw.tolist()), np.int64,
                    count=num_codes)
  known = old > 0
  present = np.zeros(vocab.num_items, bool)
  present[old[known]] = True
  present[0] = False
  vanished = int(vocab.num_items - 1 - present.sum())
  if drop_vanished:
    kept_old = np.flatnonzero(present)  # Old order, closed up.
    remap = np.zeros(vocab.num_items, np.int64)
    remap[kept_old] = np.arange(1, len(kept_old) + 1)
    base_raw = vocab.items[kept_old]
  else:
    remap = np.arange(vocab.num_items)
    base_raw = vocab.items[1:]
  new_ids = np.zeros(num_codes, np.int64)
  new_ids[known] = remap[old[known]]
  fresh = np.flatnonzero(~known)
  if len(fresh):
    counts = np.bincount(train_codes, minlength=num_codes)[fresh]
    # Among themselves new items rank by training frequency, ties by first
    # appearance (their code order), as a fresh numbering would.
    rank = np.lexsort((fresh, -counts))
    new_ids[fresh[rank]] = len(base_raw) + 1 + np.arange(len(fresh))
  items = np.r_[np.array([""]), base_raw, raw[fresh[rank]] if len(fresh)
                else np.array([], dtype=str)]
  growth = {"known": int(known.sum()), "new": len(fresh),
            "vanished": vanished,
            "vanished_policy": "dropped" if drop_vanished else "kept",
            "from_vocabulary": vocab.fingerprint()}
  return new_ids, items.astype(str), growth


def _check_options(cfg: DataConfig) -> None:
  cfg.validate()
  if cfg.window > cfg.max_len:
    raise JaxrecError(f"data.window={cfg.window}: expected <= data.max_len="
                      f"{cfg.max_len} (a window must fit in a training row)")


def data_fingerprint(cfg: DataConfig, source_key: str,
                     vocab: Vocabulary | None = None,
                     drop_vanished: bool = False) -> str:
  """SHA-256 of the source contents and every processing option (and the
  vocabulary numbering the items, when one is given)."""
  options = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
             if f.name != "cache_dir"}
  content: dict[str, Any] = {"pipeline": PIPELINE_VERSION,
                             "source_key": source_key, "options": options}
  if vocab is not None:  # Absent otherwise: older fingerprints stay valid.
    content["vocabulary"] = [vocab.fingerprint(), bool(drop_vanished)]
  blob = json.dumps(content, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def cache_dir(cfg: DataConfig) -> str:
  """`cfg.cache_dir`, else $JAXREC_CACHE, else ~/.cache/jaxrec."""
  path = cfg.cache_dir or os.environ.get("JAXREC_CACHE") or os.path.join(
      "~", ".cache", "jaxrec")
  return os.path.expanduser(path)


def load_cache(path: str, fingerprint: str) -> SequenceData | None:
  """The cached arrays, or None when absent, unreadable or inconsistent."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      if "vocab_items" not in z.files:
        # Written before vocabularies were cached: same ids, rebuilt once.
        log.info("data: cache %s has no vocabulary; rebuilding", path)
        return None
      arrays = {name: z[name] for name in _ARRAY_FIELDS}
      vocab = Vocabulary(z["vocab_items"], z["vocab_users"])
      stored = str(z["fingerprint"])
      meta = json.loads(str(z["meta"]))
  except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError,
          zipfile.BadZipFile, zlib.error) as e:
    # A half-written or damaged file is rebuilt, never trusted.
    log.warning("data: ignoring unreadable cache %s (%s)", path, e)
    return None
  if (stored != fingerprint or not _consistent(arrays, meta)
      or vocab.num_items != len(arrays["item_counts"])):
    log.warning("data: ignoring inconsistent cache %s", path)
    return None
  return SequenceData(num_items=len(arrays["item_counts"]),
                      fingerprint=fingerprint, meta=meta, vocab=vocab,
                      **arrays)


def save_cache(path: str, data: SequenceData) -> None:
  """Writes atomically: a killed run leaves the old file or none, not half."""
  directory = os.path.dirname(path)
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
      vocab = ({} if data.vocab is None else
               {"vocab_items": data.vocab.items,
                "vocab_users": data.vocab.users})
      np.savez(f, fingerprint=np.array(data.fingerprint),
               meta=np.array(json.dumps(data.meta)),
               **{name: getattr(data, name) for name in _ARRAY_FIELDS},
               **vocab)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:  # A read-only cache only costs a rebuild next time.
    log.warning("data: could not write cache %s (%s)", path, e)
    if tmp and os.path.exists(tmp):
      os.remove(tmp)


# --------------------------------------------------------------------- sources


def _synthetic_source(size: str, synthetic_fn: SyntheticFn | None) -> Source:
  if synthetic_fn is not None:
    # An arbitrary function has no version: fingerprint what it returns.
    inter = synthetic_fn(size)
    return Source(f"synthetic:{size}:{_interactions_digest(inter)}",
                  lambda: inter)
  from jaxrec.data import synthetic  # pylint: disable=import-outside-toplevel
  # The module's source digest also catches code edits without a version bump.
  version = getattr(synthetic, "GENERATOR_VERSION", None)
  key = f"synthetic:{size}:{version}:{_sha256_file(synthetic.__file__)}"
  return Source(key, functools.partial(synthetic.generate, size))


def read_tfds(name: str) -> Interactions:
  """`tfds:NAME`, e.g. movielens/1m-ratings (fields user_id, movie_id, ...)."""
  try:
    # pylint: disable-next=import-outside-toplevel
    import tensorflow_datasets as tfds
  except ImportError:
    raise JaxrecError(f"tfds:{name}: tensorflow_datasets is not installed; "
                      "run `pip install jaxrec[tfds]`") from None
  try:
    ds = tfds.as_numpy(tfds.load(name, split="train", batch_size=-1))
    fields = [ds[k] for k in ("user_id", "movie_id", "timestamp")]
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise JaxrecError(f"tfds:{name}: could not load: {first}") from None
  return Interactions(*fields, name=f"tfds:{name}")


_PARQUET_OPTIONS = ("data.user_col", "data.item_col", "data.time_col")


def read_parquet(path: str, columns: tuple[str, str, str]) -> Interactions:
  """`parquet:PATH`: user, item and time columns named (or indexed) like
  csv's. Ids may be integers or strings; times numbers or timestamps
  (read as their integer value in the column's unit). Reads only the three
  columns."""
  try:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise JaxrecError(f"parquet:{path}: pyarrow is not installed; run `pip "
                      "install jaxrec[parquet]`") from None
  with reported_as(path, "read the Parquet schema"):
    names = pq.read_schema(path).names
  picked = []
  for column, option in zip(columns, _PARQUET_OPTIONS):
    if column in names:
      picked.append(column)
    elif column.isdigit() and int(column) < len(names):
      picked.append(names[int(column)])
    else:
      raise JaxrecError(f"{path}: no column {column!r} ({option}); the file "
                        f"has columns {names}")
  with reported_as(path, "read the Parquet file"):
    table = pq.read_table(path, columns=list(dict.fromkeys(picked)))
  if table.num_rows == 0:
    raise JaxrecError(f"{path}: no interactions (the file has no rows)")
  users, items, times = (
      _parquet_column(path, table.column(name), name, option, pa, kind)
      for name, option, kind in zip(picked, _PARQUET_OPTIONS,
                                    ("id", "id", "time")))
  return Interactions(users, items, times, name=path)


def _parquet_column(path: str, column: Any, name: str, option: str, pa: Any,
                    kind: str) -> np.ndarray:
  """One column as numpy; nulls and unusable types are one line."""
  types = pa.types
  if column.null_count:
    first = int(np.flatnonzero(column.is_null().to_numpy(
        zero_copy_only=False))[0])
    raise JaxrecError(f"{path}: column {name!r} ({option}) has "
                      f"{column.null_count} null values (the first in row "
                      f"{first})")
  typ = column.type
  if types.is_dictionary(typ):  # Categorical strings: decode them.
    column, typ = column.cast(typ.value_type), typ.value_type
  if kind == "time" and (types.is_timestamp(typ) or types.is_date(typ)
                         or types.is_duration(typ)):
    return column.cast(pa.int64()).to_numpy()
  if types.is_integer(typ):
    return column.to_numpy().astype(np.int64)
  if kind == "time" and types.is_floating(typ):
    values = column.to_numpy()
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
      raise JaxrecError(f"{path}: column {name!r} ({option}) row "
                        f"{int(bad[0])}: timestamp {values[bad[0]]} is not "
                        "finite")
    return values.astype(np.float64)
  if kind == "id" and (types.is_string(typ) or types.is_large_string(typ)):
    return np.asarray(column.to_pylist(), dtype=str)
  expected = ("integers or strings" if kind == "id" else
              "numbers or timestamps")
  raise JaxrecError(f"{path}: column {name!r} ({option}) has type {typ}; "
                    f"expected {expected}")


@dataclasses.dataclass(frozen=True)
class TextFormat:
  """How to read one delimited text file."""
  delimiter: str  # May be several characters ("::" for ml-1m).
  columns: tuple[str, str, str]  # user, item, time: header names, or indices.
  options: tuple[str, str, str]  # What to name when a column is missing.
  header: bool = True
  integer_ids: bool = False  # MovieLens: a non-integer id is an error.
  strip_types: bool = False  # RecBole "user_id:token" -> "user_id".


def csv_format(path: str, cfg: DataConfig) -> TextFormat:
  delimiter = {"\\t": "\t", "tab": "\t"}.get(cfg.delimiter, cfg.delimiter)
  if not delimiter:
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
  return TextFormat(delimiter, (cfg.user_col, cfg.item_col, cfg.time_col),
                    ("data.user_col", "data.item_col", "data.time_col"))


def recbole_format() -> TextFormat:
  names = ("user_id", "item_id", "timestamp")
  return TextFormat("\t", names, tuple(f"RecBole field {n!r}" for n in names),
                    strip_types=True)


def movielens_format(filename: str) -> TextFormat:
  """u.data (ml-100k), ratings.dat (ml-1m, ml-10m), ratings.csv (others)."""
  if filename == "ratings.csv":
    names = ("userId", "movieId", "timestamp")
    return TextFormat(",", names, ("MovieLens",) * 3, integer_ids=True)
  delimiter = "\t" if filename == "u.data" else "::"
  return TextFormat(delimiter, ("0", "1", "3"), ("", "", ""), header=False,
                    integer_ids=True)


def _movielens_source(path: str) -> Source:
  if os.path.isdir(path):
    found = _find_ratings_file(path)
    return _file_source(found, movielens_format(os.path.basename(found)))
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      member = _find_ratings_member(path, zf.namelist())
    fmt = movielens_format(member.rsplit("/", 1)[-1])
    key = f"{_file_digest(path)}:{member}"
    return Source(key, functools.partial(_read_member, path, member, fmt))
  if os.path.basename(path) in MOVIELENS_FILES:
    return _file_source(path, movielens_format(os.path.basename(path)))
  raise JaxrecError(f"{path}: not a MovieLens directory, zip or ratings file "
                    f"({', '.join(MOVIELENS_FILES)})")


def _find_ratings_file(root: str) -> str:
  """The shallowest ratings file under `root` (e.g. ml-1m/ratings.dat)."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    depth = os.path.relpath(dirpath, root).count(os.sep) + (dirpath != root)
    if depth >= 3:  # GroupLens nests one level; don't crawl a home directory.
      dirnames.clear()
    found += [(depth, MOVIELENS_FILES.index(n), os.path.join(dirpath, n))
              for n in filenames if n in MOVIELENS_FILES]
  if not found:
    raise JaxrecError(f"{root}: no MovieLens ratings file "
                      f"({', '.join(MOVIELENS_FILES)}) in this directory")
  return min(found)[2]


def _find_ratings_member(path: str, names: list[str]) -> str:
  found = [n for n in names if n.rsplit("/", 1)[-1] in MOVIELENS_FILES]
  if not found:
    raise JaxrecError(f"{path}: no MovieLens ratings file "
                      f"({', '.join(MOVIELENS_FILES)}) in this zip")
  return min(found, key=lambda n: (n.count("/"),
                                   MOVIELENS_FILES.index(n.rsplit("/")[-1])))


def _read_member(zip_path: str, member: str, fmt: TextFormat) -> Interactions:
  opener = functools.partial(_open_member, zip_path, member)
  try:
    return read_table(opener, f"{zip_path}:{member}", fmt)
  except (zipfile.BadZipFile, zlib.error, EOFError) as e:
    raise JaxrecError(f"{zip_path}: damaged zip ({e}); download it "
                      "again") from None


@contextlib.contextmanager
def _open_member(zip_path: str, member: str):
  with zipfile.ZipFile(zip_path) as zf, zf.open(member) as f:
    yield f


def _file_source(path: str, fmt: TextFormat) -> Source:
  if not os.path.isfile(path):
    raise JaxrecError(f"{path}: not a file")
  opener = functools.partial(open, path, "rb")
  return Source(_file_digest(path),
                lambda: read_table(opener, path, fmt))


# ---------------------------------------------------------------- text tables


def read_table(opener: Opener, display: str, fmt: TextFormat) -> Interactions:
  """Parses a delimited file: fast C path, line-by-line pass on failure."""
  cols, num_fields = _header_columns(opener, display, fmt)
  parsed = _fast_table(opener, fmt, cols, num_fields)
  if parsed is None:
    parsed = _slow_table(opener, display, fmt, cols, num_fields)
  users, items, times = parsed
  if len(users) == 0:
    raise JaxrecError(f"{display}: no interactions (the file has no data rows)")
  return Interactions(users, items, times, name=display)


def _header_columns(opener: Opener, display: str,
                    fmt: TextFormat) -> tuple[tuple[int, int, int], int]:
  """Column indices of user, item, time and the number of fields per row."""
  if not fmt.header:
    # Headerless MovieLens files have 4 fields: user item rating timestamp.
    return tuple(int(c) for c in fmt.columns), 4
  with opener() as f:
    line = f.readline()
  if not line.strip():
    raise JaxrecError(f"{display}:1: expected a header line naming columns")
  names = [n.strip().strip('"').strip("'") for n in line.decode(
      "utf-8-sig", "replace").rstrip("\r\n").split(fmt.delimiter)]
  if fmt.strip_types:
    names = [n.split(":", 1)[0] for n in names]
  return tuple(_column_index(display, names, c, o)
               for c, o in zip(fmt.columns, fmt.options)), len(names)


def _column_index(display: str, names: list[str], column: str,
                  option: str) -> int:
  if column in names:
    return names.index(column)
  if column.isdigit() and int(column) < len(names):
    return int(column)
  raise JaxrecError(f"{display}:1: no column {column!r} ({option}); the "
                    f"header has columns {names}")


def _fast_table(opener: Opener, fmt: TextFormat, cols: tuple[int, int, int],
                num_fields: int) -> tuple[np.ndarray, ...] | None:
  """numpy's C loadtxt for all-numeric data; None when anything is off."""
  delimiter = fmt.delimiter
  if delimiter == "::":  # Split on ':' instead; the odd fields are empty.
    delimiter, cols = ":", tuple(2 * c for c in cols)
    num_fields = 2 * num_fields - 1
  if len(delimiter) != 1:
    return None
  dtype = [("u", np.int64), ("i", np.int64), ("t", np.float64)]
  try:
    with opener() as f, warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "input contained no data"
      table = np.loadtxt(f, dtype=dtype, delimiter=delimiter, usecols=cols,
                         skiprows=int(fmt.header), comments=None, ndmin=1)
  except ValueError:
    return None
  times = table["t"]
  # Above 2**53 float64 merges distinct timestamps: parse exactly instead.
  if not np.all(np.isfinite(times)) or np.any(np.abs(times) >= 2.0**53):
    return None
  # loadtxt ignores fields past `usecols`; the delimiter total finds them.
  # (Only a long row and a short row missing just unused fields, erring by
  # the same amount, would cancel out; their used fields parsed fine.)
  rows = len(table) + int(fmt.header)
  if _count_byte(opener, delimiter.encode()) != rows * (num_fields - 1):
    return None
  if np.all(times == np.round(times)):
    times = times.astype(np.int64)
  return table["u"], table["i"], times


def _count_byte(opener: Opener, byte: bytes) -> int:
  count = 0
  with opener() as f:
    while chunk := f.read(_CHUNK):
      count += chunk.count(byte)
  return count


def _slow_table(opener: Opener, display: str, fmt: TextFormat,
                cols: tuple[int, int, int],
                num_fields: int) -> tuple[np.ndarray, ...]:
  """Line by line: names the first bad line, and keeps string ids."""
  sep = fmt.delimiter.encode()
  kinds = ("user id", "item id")
  users, items, times = [], [], []
  with opener() as f:
    for lineno, raw in enumerate(f, start=1):
      if (fmt.header and lineno == 1) or not raw.strip():
        continue
      fields = raw.rstrip(b"\r\n").split(sep)
      if len(fields) != num_fields:
        raise JaxrecError(f"{display}:{lineno}: expected {num_fields} fields "
                          f"separated by {fmt.delimiter!r}, got {len(fields)}")
      u, i, t = (fields[c].strip() for c in cols)
      for kind, token in zip(kinds, (u, i)):
        if fmt.integer_ids and not _is_int(token):
          raise JaxrecError(f"{display}:{lineno}: {kind} {_show(token)} is "
                            "not an integer")
        _require_utf8(display, lineno, kind, token)
      users.append(u)
      items.append(i)
      times.append(_timestamp(display, lineno, t))
  return _id_array(users), _id_array(items), _time_array(times)


def _require_utf8(display: str, lineno: int, kind: str, token: bytes) -> None:
  """Refuses an id that is not UTF-8: decoding it with replacement merged
  distinct ids (b'a\\xff' and b'a\\xfe' both became 'a\\ufffd')."""
  if token.isascii():
    return
  try:
    token.decode("utf-8")
  except UnicodeDecodeError:
    raise JaxrecError(f"{display}:{lineno}: {kind} {token!r} is not UTF-8 "
                      "text") from None


def _timestamp(display: str, lineno: int, token: bytes) -> int | float:
  try:
    return int(token)
  except ValueError:
    pass
  try:
    value = float(token)
  except ValueError:
    value = math.nan
  if not math.isfinite(value):
    raise JaxrecError(f"{display}:{lineno}: timestamp {_show(token)} is not "
                      "a number")
  return value


def _is_int(token: bytes) -> bool:
  try:
    int(token)
    return True
  except ValueError:
    return False


def _show(token: bytes) -> str:
  return repr(token.decode("utf-8", "replace"))


def _id_array(tokens: list[bytes]) -> np.ndarray:
  """Integer ids when every token is one, else the strings themselves."""
  try:
    return np.array([int(t) for t in tokens], dtype=np.int64)
  except (ValueError, OverflowError):
    return np.array([t.decode("utf-8", "replace") for t in tokens])


def _time_array(values: list[int | float]) -> np.ndarray:
  if all(isinstance(v, int) for v in values):
    try:
      return np.array(values, dtype=np.int64)
    except OverflowError:
      pass
  return np.array(values, dtype=np.float64)


# ------------------------------------------------------------------ processing


@dataclasses.dataclass(frozen=True)
class _Events:
  """k-core-filtered events: user codes, item codes (0..K-1 in
  first-appearance order), the order sorting them by user, then time (ties
  in file order), and the raw id of each item code and user code."""
  users: np.ndarray
  items: np.ndarray
  order: np.ndarray
  item_raw: np.ndarray  # [K]
  user_raw: np.ndarray  # [max user code + 1]


def _filtered_events(inter: Interactions, cfg: DataConfig,
                     min_len: int) -> _Events:
  """See `_Events`."""
  raw_users, raw_items, times = _check_interactions(inter)
  users, items = _factorize(raw_users), _factorize(raw_items)
  min_user = max(cfg.min_user_count, min_len)
  keep = _k_core(users, items, min_user, cfg.min_item_count)
  if not keep.any():
    raise JaxrecError(
        f"{inter.name}: no interactions left after filtering with "
        f"data.min_user_count={cfg.min_user_count} and data.min_item_count="
        f"{cfg.min_item_count} (protocol {cfg.protocol!r} also needs "
        f"{min_len} per user); lower them")
  users, items, times = users[keep], items[keep], times[keep]
  raw_items = raw_items[keep]
  codes, first = _first_appearance_codes(items)
  user_raw = np.empty(int(users.max()) + 1, dtype=raw_users.dtype)
  user_raw[users] = raw_users[keep]
  return _Events(users, codes, _chronological_order(users, times),
                 _raw_str(raw_items[first]), _raw_str(user_raw))


def _raw_str(values: np.ndarray) -> np.ndarray:
  """Raw ids as strings: what a vocabulary holds (ints print as ints)."""
  return values.astype(str) if values.dtype.kind != "O" else np.array(
      [str(v) for v in values], dtype=str)


def _factorize(values: np.ndarray) -> np.ndarray:
  """Codes 0..K-1 in sorted order of the distinct values."""
  if (values.dtype.kind in "iu" and values.min() >= 0
      and values.max() < 4 * len(values) + (1 << 20)):
    # Dense non-negative ints (all MovieLens ids): O(N), no sort.
    present = np.zeros(int(values.max()) + 1, bool)
    present[values] = True
    return (np.cumsum(present) - 1)[values]
  return np.unique(values, return_inverse=True)[1].reshape(-1)


def _chronological_order(users: np.ndarray, times: np.ndarray) -> np.ndarray:
  """Indices sorting by user, then time, ties in file order (stable)."""
  bits = max(1, (len(users) - 1).bit_length())
  by_time = _stable_argsort(times, bits)
  return by_time[_stable_argsort(users[by_time], bits)]


def _stable_argsort(values: np.ndarray, bits: int) -> np.ndarray:
  """Stable argsort; `bits` holds any index into `values`."""
  if values.dtype.kind in "iu":
    low, high = int(values.min()), int(values.max())
    if (high - low).bit_length() + bits <= 62:
      # Packing (value, index) into one int64 turns the stable argsort into
      # a plain sort, which numpy vectorises: seconds faster on 20M events.
      packed = (values - low).astype(np.int64, copy=False) << bits
      packed |= np.arange(len(values))
      return np.sort(packed) & ((1 << bits) - 1)
  return np.argsort(values, kind="stable")


def _check_interactions(
    inter: Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  users, items, times = (np.asarray(a).reshape(-1) for a in
                         (inter.users, inter.items, inter.timestamps))
  if not len(users) == len(items) == len(times):
    raise JaxrecError(f"{inter.name}: users, items and timestamps differ in "
                      f"length ({len(users)}, {len(items)}, {len(times)})")
  if len(users) == 0:
    raise JaxrecError(f"{inter.name}: no interactions")
  if times.dtype.kind not in "iuf" or not np.all(np.isfinite(times)):
    raise JaxrecError(f"{inter.name}: timestamps must be finite numbers")
  return users, items, times


def _k_core(users: np.ndarray, items: np.ndarray, min_user: int,
            min_item: int) -> np.ndarray:
  """Drops rare users and items until both thresholds hold at once."""
  keep = np.ones(len(users), bool)
  while True:
    user_counts = np.bincount(users[keep], minlength=users.max() + 1)
    item_counts = np.bincount(items[keep], minlength=items.max() + 1)
    new = keep & (user_counts[users] >= min_user) & (
        item_counts[items] >= min_item)
    if new.sum() == keep.sum():
      return keep
    keep = new


def _first_appearance_codes(items: np.ndarray
                            ) -> tuple[np.ndarray, np.ndarray]:
  """Codes 0..K-1 numbering items in order of their first event in the file
  (the tie-break of `_popularity_ids`), and the index of each code's first
  event."""
  _, first, inverse = np.unique(items, return_index=True, return_inverse=True)
  rank = np.empty(len(first), np.int64)
  rank[np.argsort(first, kind="stable")] = np.arange(len(first))
  return rank[inverse.reshape(-1)], np.sort(first)


def _training_events(codes: np.ndarray, starts: np.ndarray,
                     ends: np.ndarray) -> np.ndarray:
  """The item codes of the training events: codes[start:end] of each range."""
  lengths = np.maximum(ends - starts, 0)
  offsets = np.arange(lengths.sum()) - np.repeat(
      np.cumsum(lengths) - lengths, lengths)
  return codes[np.repeat(starts, lengths) + offsets]


def _popularity_ids(codes: np.ndarray, train_codes: np.ndarray) -> np.ndarray:
  """`codes` as ids 1..V-1 by descending training-split frequency, ties
  (and items seen only in valid or test) by first appearance."""
  return _popularity_ranks(int(codes.max()) + 1, train_codes)[codes]


def _popularity_ranks(num_codes: int, train_codes: np.ndarray) -> np.ndarray:
  """The id of each item code under `_popularity_ids`."""
  counts = np.bincount(train_codes, minlength=num_codes)
  rank = np.lexsort((np.arange(num_codes), -counts))
  new_ids = np.empty(num_codes, np.int64)
  new_ids[rank] = np.arange(1, num_codes + 1)
  return new_ids


def _split_loo(seq: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               cfg: DataConfig) -> dict[str, Any]:
  """Test: last item; valid: the one before; train: everything earlier."""
  return dict(
      train=(starts, ends - 2),
      valid_inputs=_left_padded(seq, starts, ends - 2, cfg.max_len),
      valid_targets=seq[ends - 2].astype(np.int32),
      test_inputs=_left_padded(seq, starts, ends - 1, cfg.max_len),
      test_targets=seq[ends - 1].astype(np.int32))


def _split_paper(seq: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 cfg: DataConfig) -> dict[str, Any]:
  """Whole sequences to test / valid / train by a seeded user shuffle."""
  num_users = len(starts)
  perm = np.random.default_rng(cfg.split_seed).permutation(num_users)
  num_test = int(cfg.test_fraction * num_users)
  num_valid = int(cfg.valid_fraction * num_users)
  if min(num_test, num_valid, num_users - num_test - num_valid) < 1:
    raise JaxrecError(
        f"data.test_fraction={cfg.test_fraction}, data.valid_fraction="
        f"{cfg.valid_fraction}: {num_users} users leave {num_test} test, "
        f"{num_valid} valid and {num_users - num_test - num_valid} train "
        "sequences; each needs at least one")
  test, valid = perm[:num_test], perm[num_test:num_test + num_valid]
  train = perm[num_test + num_valid:]
  return dict(
      train=(starts[train], ends[train]),
      valid_inputs=_left_padded(seq, starts[valid], ends[valid] - 1,
                                cfg.max_len),
      valid_targets=seq[ends[valid] - 1].astype(np.int32),
      test_inputs=_left_padded(seq, starts[test], ends[test] - 1, cfg.max_len),
      test_targets=seq[ends[test] - 1].astype(np.int32))


def _train_rows(seq: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                cfg: DataConfig) -> np.ndarray:
  """[N, max_len + 1] rows with at least one transition each: by default
  every transition of every training history once (windows of max_len)."""
  window = cfg.max_len if cfg.window < 0 else cfg.window
  if window > 0:
    starts, ends = _windows(starts, ends, window)
  width = cfg.max_len + 1
  real = np.minimum(ends - starts, width)
  keep = real >= 2
  return _left_padded(seq, starts[keep], ends[keep], width)


def _windows(starts: np.ndarray, ends: np.ndarray,
             window: int) -> tuple[np.ndarray, np.ndarray]:
  """Chunks of window+1 items from the end back, sharing one item, so each
  transition of every sequence lies in exactly one chunk."""
  lengths = ends - starts
  per_seq = np.where(lengths >= 2, -(-(lengths - 1) // window), 0)
  seq_of = np.repeat(np.arange(len(starts)), per_seq)
  back = np.arange(len(seq_of)) - np.repeat(np.cumsum(per_seq) - per_seq,
                                            per_seq)
  chunk_ends = ends[seq_of] - back * window
  chunk_starts = np.maximum(starts[seq_of], chunk_ends - window - 1)
  return chunk_starts, chunk_ends


def _left_padded(seq: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 width: int) -> np.ndarray:
  """The last `width` items of each seq[start:end], left-padded with 0."""
  _require_memory(len(starts), width)
  index = ends[:, None] - width + np.arange(width)
  real = index >= starts[:, None]
  return np.where(real, seq[np.maximum(index, 0)], 0).astype(np.int32)


def _require_memory(rows: int, width: int) -> None:
  """Refuses a data.max_len whose padded rows cannot fit in memory (it was
  a MemoryError traceback, or a machine swapping to a halt)."""
  need = rows * width * 17  # int64 index, bool mask, int64 result per cell.
  have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  if need > have:
    raise JaxrecError(f"data.max_len too large: {rows:,} padded rows of "
                      f"{width:,} ids need about {need / 2**30:,.1f} GiB, "
                      f"more than this machine's {have / 2**30:,.1f} GiB")


def _consistent(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
  """Shapes agree with each other and with the metadata."""
  max_len = meta.get("max_len")
  return (isinstance(max_len, int)
          and arrays["train"].ndim == 2
          and arrays["train"].shape[1] == max_len + 1
          and arrays["valid_inputs"].shape[1:] == (max_len,)
          and arrays["test_inputs"].shape[1:] == (max_len,)
          and len(arrays["valid_inputs"]) == len(arrays["valid_targets"])
          and len(arrays["test_inputs"]) == len(arrays["test_targets"])
          and arrays["item_counts"].ndim == 1)


# ------------------------------------------------------------------- hashing


def _file_digest(path: str) -> str:
  """Content identity of a source file for the cache fingerprint.

  Files up to FULL_HASH_LIMIT are hashed whole. Larger ones (ML-20M is
  ~500 MB) hash size + mtime + the first and last MB: a re-download or edit
  changes one of them in practice, and it saves seconds on every run.
  """
  size = os.path.getsize(path)
  if size <= FULL_HASH_LIMIT:
    return _sha256_file(path)
  h = hashlib.sha256(f"{size}:{os.stat(path).st_mtime_ns}".encode())
  with open(path, "rb") as f:
    h.update(f.read(EDGE_BYTES))
    f.seek(size - EDGE_BYTES)
    h.update(f.read(EDGE_BYTES))
  return h.hexdigest()


def _sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _interactions_digest(inter: Interactions) -> str:
  h = hashlib.sha256()
  for array in (inter.users, inter.items, inter.timestamps):
    array = np.ascontiguousarray(array)
    if array.dtype.kind == "O":  # tobytes() would hash pointers.
      array = array.astype(str)
    h.update(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
  return h.hexdigest()
