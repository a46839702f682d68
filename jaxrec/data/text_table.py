"""Delimited text files of interactions (CSV, TSV, RecBole .inter,
MovieLens's ratings files) into id and time columns.

pyarrow's multithreaded CSV reader parses the file; when it cannot (a row
with too few fields, a non-numeric timestamp, an empty field), or an id
column comes out neither integer nor string, a line-by-line pass reads it
again and reports the first bad line as `FILE:LINE: ...`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import IO, Callable, ContextManager

import numpy as np
import pyarrow as pa
from pyarrow import compute, csv

from jaxrec.config import DataConfig
from jaxrec.data.sequences import Interactions
from jaxrec.errors import JaxrecError

Opener = Callable[[], ContextManager[IO[bytes]]]


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


def read_table(opener: Opener, display: str, fmt: TextFormat) -> Interactions:
  """Parses a delimited file: pyarrow, then a line-by-line pass on
  failure (see the module docstring)."""
  cols, num_fields = _header_columns(opener, display, fmt)
  parsed = _arrow_table(opener, fmt, cols, num_fields)
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


def _arrow_table(opener: Opener, fmt: TextFormat, cols: tuple[int, int, int],
                 num_fields: int) -> tuple[np.ndarray, ...] | None:
  """pyarrow's CSV reader, read as the line-by-line pass would: no quoting,
  no null values, ids stripped of spaces (integers when every one is, else
  strings), finite numeric times. None when anything is off, so that the
  line-by-line pass finds and names the bad line."""
  delimiter = fmt.delimiter
  if delimiter == "::":  # Split on ':' instead; the odd fields are empty.
    delimiter, cols = ":", tuple(2 * c for c in cols)
    num_fields = 2 * num_fields - 1
  if len(delimiter) != 1:
    return None
  # Named columns make pyarrow refuse a row with more or fewer fields.
  names = [f"f{k}" for k in range(num_fields)]
  try:
    with opener() as f:
      table = csv.read_csv(
          f, read_options=csv.ReadOptions(column_names=names,
                                          skip_rows=int(fmt.header)),
          parse_options=csv.ParseOptions(delimiter=delimiter,
                                         quote_char=False),
          convert_options=csv.ConvertOptions(
              include_columns=list(dict.fromkeys(names[c] for c in cols)),
              null_values=[], strings_can_be_null=False))
  except (pa.ArrowInvalid, pa.ArrowTypeError):
    return None
  users, items = (_arrow_ids(table.column(names[c]), fmt.integer_ids)
                  for c in cols[:2])
  times = _arrow_times(table.column(names[cols[2]]))
  if users is None or items is None or times is None:
    return None
  return users, items, times


def _arrow_ids(column: pa.ChunkedArray, integer_ids: bool) -> np.ndarray | None:
  if pa.types.is_integer(column.type):
    return column.to_numpy().astype(np.int64, copy=False)
  if not pa.types.is_string(column.type):
    return None
  column = compute.utf8_trim_whitespace(column)
  try:
    return column.cast(pa.int64()).to_numpy()
  except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
    pass
  if integer_ids:
    return None  # The line-by-line pass names the first non-integer id.
  return column.to_numpy(zero_copy_only=False).astype(str)


def _arrow_times(column: pa.ChunkedArray) -> np.ndarray | None:
  if pa.types.is_integer(column.type):
    return column.to_numpy().astype(np.int64, copy=False)
  if pa.types.is_floating(column.type):
    values = column.to_numpy().astype(np.float64, copy=False)
    return values if np.all(np.isfinite(values)) else None
  return None


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
