"""Where interactions come from: a `data.source` string resolved into a
`Source` (what identifies its contents, and how to read it).

Kinds: a registered data set's name (`jaxrec.data.registry`),
`synthetic[:SIZE]`, `movielens:PATH` (a directory, a GroupLens zip or its
ratings file), `csv:PATH`, `parquet:PATH`, `recbole:PATH.inter` and
`tfds:NAME`. Delimited text goes through `jaxrec.data.text_table`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import zipfile
import zlib
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxrec import config as config_lib
from jaxrec.config import DataConfig
from jaxrec.data import download, registry
from jaxrec.data.sequences import Interactions
from jaxrec.data.text_table import (TextFormat, csv_format, movielens_format,
                                    read_table, recbole_format)
from jaxrec.errors import JaxrecError, reported_as

DEFAULT_SYNTHETIC_SIZE = "small"  # `synthetic` alone; synthetic.generate's.


SOURCE_KINDS = ("synthetic", "movielens", "csv", "parquet", "recbole", "tfds")


# MovieLens ratings files, in the order they are looked for.
MOVIELENS_FILES = ("ratings.dat", "ratings.csv", "u.data")


# Whole-file hashing below this size; above, size + mtime + both ends.
FULL_HASH_LIMIT = 256 << 20


EDGE_BYTES = 1 << 20


SyntheticFn = Callable[[str], Interactions]


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


def _synthetic_source(size: str, synthetic_fn: SyntheticFn | None) -> Source:
  if synthetic_fn is not None:
    # An arbitrary function has no version: fingerprint what it returns.
    inter = synthetic_fn(size)
    return Source(f"synthetic:{size}:{_interactions_digest(inter)}",
                  lambda: inter)
  from jaxrec.data import synthetic  # pylint: disable=import-outside-toplevel
  # The module's source digest also catches code edits without a version bump.
  version = getattr(synthetic, "GENERATOR_VERSION", None)
  key = f"synthetic:{size}:{version}:{download.sha256_file(synthetic.__file__)}"
  return Source(key, functools.partial(synthetic.generate, size))


TFDS_FIELDS = ("user_id", "movie_id", "timestamp")


def read_tfds(name: str) -> Interactions:
  """`tfds:NAME`, e.g. movielens/1m-ratings (fields user_id, movie_id, ...).

  Only the three fields are read, in batches: `tfds.load(batch_size=-1)`
  batches every feature at once, and the MovieLens sets carry ragged genre
  lists that cannot form one tensor. Text ids (tfds stores MovieLens ids as
  bytes) are decoded to str so the vocabulary can be written as JSON.
  """
  try:
    # pylint: disable-next=import-outside-toplevel
    import tensorflow_datasets as tfds
  except ImportError:
    raise JaxrecError(f"tfds:{name}: tensorflow_datasets is not installed; "
                      "run `pip install jaxrec[tfds]`") from None
  try:
    ds = tfds.load(name, split="train")
    ds = ds.map(lambda row: tuple(row[k] for k in TFDS_FIELDS))
    batches = list(tfds.as_numpy(ds.batch(1 << 16)))
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise JaxrecError(f"tfds:{name}: could not load: {first}") from None
  if not batches:
    raise JaxrecError(f"tfds:{name}: the train split holds no rows")
  users, items, times = (np.concatenate(column) for column in zip(*batches))
  return Interactions(_text_ids(users), _text_ids(items), times,
                      name=f"tfds:{name}")


def _text_ids(ids: np.ndarray) -> np.ndarray:
  if ids.dtype.kind in "OS":  # tf.string comes back as bytes.
    return np.char.decode(ids.astype(bytes), "utf-8")
  return ids


_PARQUET_OPTIONS = ("data.user_col", "data.item_col", "data.time_col")


def read_parquet(path: str, columns: tuple[str, str, str]) -> Interactions:
  """`parquet:PATH`: user, item and time columns named (or indexed) like
  csv's. Ids may be integers or strings; times numbers or timestamps
  (read as their integer value in the column's unit). Reads only the three
  columns."""
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
      _parquet_column(path, table.column(name), name, option, kind)
      for name, option, kind in zip(picked, _PARQUET_OPTIONS,
                                    ("id", "id", "time")))
  return Interactions(users, items, times, name=path)


def _parquet_column(path: str, column: pa.ChunkedArray, name: str,
                    option: str, kind: str) -> np.ndarray:
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


def _file_digest(path: str) -> str:
  """Content identity of a source file for the cache fingerprint.

  Files up to FULL_HASH_LIMIT are hashed whole. Larger ones (ML-20M is
  ~500 MB) hash size + mtime + the first and last MB: a re-download or edit
  changes one of them in practice, and it saves seconds on every run.
  """
  size = os.path.getsize(path)
  if size <= FULL_HASH_LIMIT:
    return download.sha256_file(path)
  h = hashlib.sha256(f"{size}:{os.stat(path).st_mtime_ns}".encode())
  with open(path, "rb") as f:
    h.update(f.read(EDGE_BYTES))
    f.seek(size - EDGE_BYTES)
    h.update(f.read(EDGE_BYTES))
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
