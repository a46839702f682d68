"""The raw-id <-> model-id mapping of a run: which item each id scores.

The pipeline numbers items by training-split frequency (1 = most frequent,
0 = padding), so a model's ids mean nothing without the mapping that
produced them: predictions must be turned back into raw item ids, and a
run started from a checkpoint (`train --init-from`, `eval --data`) must
number a new data version's items the way the checkpoint did.

A run directory holds it as `DIR/vocabulary.json` (written atomically):

  {"format": "jaxrec.vocabulary/1", "fingerprint": SHA256,
   "items": ["", RAW_1, ...], "users": [RAW, ...]}

`items[i]` is the raw id (a string) of model id i (`items[0]` is "" for
padding); `users` are the data's users in the order of its sequences
(under the `loo` protocol, row i of valid and test is user i). Each
checkpoint's metadata records `vocabulary: {fingerprint, num_items,
num_users}`, so a vocabulary file that does not belong to a checkpoint is
detected (`check_matches`). JSON rather than .npz: it is readable by any
serving stack without numpy, and a few MB even for ML-20M.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

from jaxrec.errors import JaxrecError, reported_as

FILENAME = "vocabulary.json"
FORMAT = "jaxrec.vocabulary/1"


@dataclasses.dataclass(frozen=True, eq=False)
class Vocabulary:
  """Raw ids of a data set's items (by model id) and users (by row)."""
  items: np.ndarray  # [V] str: items[i] is the raw id of model id i.
  users: np.ndarray  # [U] str: raw user ids, in the data's user order.

  def __post_init__(self):
    # Strings whatever the source's dtype: an int id 7 and a CSV's "7" are
    # the same item, and JSON keeps only strings without loss.
    object.__setattr__(self, "items", _as_str(self.items))
    object.__setattr__(self, "users", _as_str(self.users))
    if len(self.items) < 1 or self.items[0] != "":
      raise JaxrecError("vocabulary: items[0] must be '' (the padding id)")

  @property
  def num_items(self) -> int:
    """V, padding included (the model's `num_items`)."""
    return len(self.items)

  def index(self) -> dict[str, int]:
    """raw item id -> model id (padding excluded)."""
    return _index(self)

  def encode_items(self, raw: Sequence[str]) -> tuple[np.ndarray, int]:
    """(model ids int32, number of unknown tokens); unknown ids become 0."""
    lookup = _index(self)
    ids = np.fromiter((lookup.get(str(r), 0) for r in raw), np.int32,
                      count=len(raw))
    return ids, int(np.sum(ids == 0))

  def decode_items(self, ids: Any) -> np.ndarray:
    """Raw item ids (str) of model ids; an id outside [0, V) is an error."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= self.num_items):
      raise JaxrecError(f"vocabulary: item id {int(ids.max())} outside "
                        f"[0, {self.num_items})")
    return self.items[ids]

  def fingerprint(self) -> str:
    """SHA-256 of the items (in id order) and the users."""
    blob = json.dumps({"items": self.items.tolist(),
                       "users": self.users.tolist()})
    return hashlib.sha256(blob.encode()).hexdigest()

  def meta(self) -> dict[str, Any]:
    """What a checkpoint's metadata records of it."""
    return {"fingerprint": self.fingerprint(), "num_items": self.num_items,
            "num_users": len(self.users)}

  def save(self, directory: str) -> str:
    """Writes DIRECTORY/vocabulary.json atomically; returns its path."""
    path = os.path.join(directory, FILENAME)
    tmp = f"{path}.tmp{os.getpid()}"
    with reported_as(path, "write the vocabulary"):
      os.makedirs(directory, exist_ok=True)
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "fingerprint": self.fingerprint(),
                   "items": self.items.tolist(),
                   "users": self.users.tolist()}, f)
        f.write("\n")
      os.replace(tmp, path)
    return path

  @staticmethod
  def load(directory: str) -> "Vocabulary":
    """Reads DIRECTORY/vocabulary.json, checking its format and hash."""
    path = os.path.join(directory, FILENAME)
    if not os.path.isfile(path):
      raise JaxrecError(f"{path}: no such file")
    with reported_as(path, "read the vocabulary"):
      with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
      found = raw.get("format") if isinstance(raw, dict) else None
      raise JaxrecError(f"{path}: vocabulary format {found!r}; expected "
                        f"{FORMAT!r}")
    items, users = raw.get("items"), raw.get("users")
    if not (isinstance(items, list) and isinstance(users, list)
            and all(isinstance(x, str) for x in items)
            and all(isinstance(x, str) for x in users)):
      raise JaxrecError(f"{path}: 'items' and 'users' must be lists of "
                        "strings")
    vocab = Vocabulary(np.array(items, dtype=str), np.array(users, dtype=str))
    if vocab.fingerprint() != raw.get("fingerprint"):
      raise JaxrecError(f"{path}: damaged (its contents do not match its "
                        "fingerprint)")
    return vocab

  def check_matches(self, recorded: dict[str, Any] | None,
                    origin: str) -> None:
    """Refuses a vocabulary other than the one a checkpoint records."""
    if recorded and recorded.get("fingerprint") != self.fingerprint():
      raise JaxrecError(f"{origin}: its vocabulary.json is not the one its "
                        "checkpoint was trained with (fingerprint differs)")


def of_run(run_dir: str) -> Vocabulary:
  """The vocabulary of a run or surgery directory, or of a checkpoint
  directory inside one (DIR/checkpoints[/KIND[/STEP]] reads DIR's)."""
  vocab = find(run_dir)
  if vocab is None:
    raise JaxrecError(f"{run_dir}: no {FILENAME} (a run trained before "
                      "vocabularies were saved, or on in-memory data)")
  return vocab


def find(run_dir: str) -> Vocabulary | None:
  """`of_run`, or None when the run has no vocabulary file (a damaged one
  is still an error)."""
  for directory in _candidates(run_dir):
    if os.path.isfile(os.path.join(directory, FILENAME)):
      return Vocabulary.load(directory)
  return None


def _candidates(run_dir: str) -> list[str]:
  """run_dir itself, then the run directory above its checkpoints/."""
  here = os.path.abspath(run_dir)
  parts = here.split(os.sep)
  out = [here]
  if "checkpoints" in parts:
    last = len(parts) - 1 - parts[::-1].index("checkpoints")
    out.append(os.sep.join(parts[:last]) or os.sep)
  return out


def _as_str(values: Any) -> np.ndarray:
  arr = np.asarray(values)
  if arr.dtype.kind != "U":
    arr = np.array([str(v) for v in arr.reshape(-1)], dtype=str)
  return arr.reshape(-1)


# Vocabulary is frozen, so one dict per instance suffices; keyed by id()
# with the instance kept alive by the cache entry itself.
_INDEX_CACHE: dict[int, tuple[Vocabulary, dict[str, int]]] = {}


def _index(vocab: Vocabulary) -> dict[str, int]:
  hit = _INDEX_CACHE.get(id(vocab))
  if hit is not None and hit[0] is vocab:
    return hit[1]
  lookup = {raw: i for i, raw in enumerate(vocab.items.tolist()) if i}
  if len(_INDEX_CACHE) > 8:
    _INDEX_CACHE.clear()
  _INDEX_CACHE[id(vocab)] = (vocab, lookup)
  return lookup
