"""The processed-data cache: one .npz per fingerprint of the source's
contents and every processing option, written atomically, and distrusted
whenever it does not read back whole and consistent."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import zipfile
import zlib
from typing import Any

import numpy as np

from jaxrec.config import DataConfig
from jaxrec.data.sequences import SequenceData
from jaxrec.data.vocabulary import Vocabulary

log = logging.getLogger(__name__)

# Bump when processing changes, so old caches are not reused.
PIPELINE_VERSION = 2  # 2: ids ranked by training-split frequency.


_ARRAY_FIELDS = ("train", "valid_inputs", "valid_targets", "test_inputs",
                 "test_targets", "item_counts", "train_users", "valid_users",
                 "test_users")


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
      if not {"vocab_items", "train_users"} <= set(z.files):
        # Written before vocabularies (or users) were cached: the same ids,
        # so the fingerprint stays; rebuilt once.
        log.info("data: cache %s predates vocabularies or users; "
                 "rebuilding", path)
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
               **{name: getattr(data, name) for name in _ARRAY_FIELDS
                  if getattr(data, name) is not None},
               **vocab)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:  # A read-only cache only costs a rebuild next time.
    log.warning("data: could not write cache %s (%s)", path, e)
    if tmp and os.path.exists(tmp):
      os.remove(tmp)


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
          and arrays["item_counts"].ndim == 1
          and all(len(arrays[f"{split}_users"]) == len(arrays[rows])
                  for split, rows in (("train", "train"),
                                      ("valid", "valid_targets"),
                                      ("test", "test_targets"))))
