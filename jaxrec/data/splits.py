"""From raw events to split, padded sequences (`build_sequences`).

Per-user chronological sequences (ties in file order), the iterated k-core
filter, item ids ranked by training-split frequency (0 = padding), and the
split by protocol:

  loo:   per user, test = last item, valid = second to last, training rows
         come only from the items before both targets.
  paper: users are shuffled with `split_seed`; whole sequences go to test,
         valid or train, and their last item is the target.

Training rows never contain a valid or test target position.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from jaxrec.config import DataConfig
from jaxrec.data.sequences import Interactions, SequenceData
from jaxrec.data.vocabulary import Vocabulary
from jaxrec.errors import JaxrecError

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
  check_options(cfg)
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
  train, row_source = _train_rows(seq, *parts.pop("train"), cfg)
  parts.update(_user_indices(len(starts), parts.pop("train_seqs")[row_source],
                             parts.pop("valid_seqs"), parts.pop("test_seqs")))
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


def check_options(cfg: DataConfig) -> None:
  cfg.validate()
  if cfg.window > cfg.max_len:
    raise JaxrecError(f"data.window={cfg.window}: expected <= data.max_len="
                      f"{cfg.max_len} (a window must fit in a training row)")


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


def _user_indices(num_users: int, train_seqs: np.ndarray,
                  valid_seqs: np.ndarray, test_seqs: np.ndarray
                  ) -> dict[str, np.ndarray]:
  """The user index of each train, valid and test row (`SequenceData`):
  sequence s is user s + 1 if some training row is its, else 0 (unseen:
  no model trained on it, so it must not look known in evaluation)."""
  seen = np.zeros(num_users, bool)
  seen[train_seqs] = True

  def index(seqs):
    return np.where(seen[seqs], seqs + 1, 0).astype(np.int32)

  return dict(train_users=(train_seqs + 1).astype(np.int32),
              valid_users=index(valid_seqs), test_users=index(test_seqs))


def _split_loo(seq: np.ndarray, starts: np.ndarray, ends: np.ndarray,
               cfg: DataConfig) -> dict[str, Any]:
  """Test: last item; valid: the one before; train: everything earlier.
  `*_seqs`: the sequence (user) of each split's rows."""
  every = np.arange(len(starts))
  return dict(
      train=(starts, ends - 2), train_seqs=every, valid_seqs=every,
      test_seqs=every,
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
      train=(starts[train], ends[train]), train_seqs=train, valid_seqs=valid,
      test_seqs=test,
      valid_inputs=_left_padded(seq, starts[valid], ends[valid] - 1,
                                cfg.max_len),
      valid_targets=seq[ends[valid] - 1].astype(np.int32),
      test_inputs=_left_padded(seq, starts[test], ends[test] - 1, cfg.max_len),
      test_targets=seq[ends[test] - 1].astype(np.int32))


def _train_rows(seq: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
  """([N, max_len + 1] rows with at least one transition each, the index
  into starts/ends each row comes from): by default every transition of
  every training history once (windows of max_len)."""
  window = cfg.max_len if cfg.window < 0 else cfg.window
  source = np.arange(len(starts))
  if window > 0:
    starts, ends, source = _windows(starts, ends, window)
  width = cfg.max_len + 1
  real = np.minimum(ends - starts, width)
  keep = real >= 2
  return _left_padded(seq, starts[keep], ends[keep], width), source[keep]


def _windows(starts: np.ndarray, ends: np.ndarray, window: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Chunks of window+1 items from the end back, sharing one item, so each
  transition of every sequence lies in exactly one chunk (with the
  sequence each chunk comes from)."""
  lengths = ends - starts
  per_seq = np.where(lengths >= 2, -(-(lengths - 1) // window), 0)
  seq_of = np.repeat(np.arange(len(starts)), per_seq)
  back = np.arange(len(seq_of)) - np.repeat(np.cumsum(per_seq) - per_seq,
                                            per_seq)
  chunk_ends = ends[seq_of] - back * window
  chunk_starts = np.maximum(starts[seq_of], chunk_ends - window - 1)
  return chunk_starts, chunk_ends, seq_of


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
