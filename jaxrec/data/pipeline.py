"""From a data source to split, padded `SequenceData`, with an on-disk cache.

`load_data(cfg)` resolves `cfg.source` (`jaxrec.data.sources`: a registered
data set's name such as `movielens-100k`, fetched on first use, or
`synthetic[:SIZE]`, `movielens:PATH`, `csv:PATH`, `parquet:PATH`,
`recbole:PATH.inter`, `tfds:NAME`), parses it into `Interactions` (text
through pyarrow, `jaxrec.data.text_table`), builds per-user chronological
sequences, filters, numbers and splits them (`jaxrec.data.splits`), and
caches the result as one .npz keyed by a fingerprint of the source's
contents and every processing option (`jaxrec.data.cache`).
"""
from __future__ import annotations

import logging
import os

from jaxrec.config import DataConfig
from jaxrec.data import cache
from jaxrec.data.sequences import SequenceData
from jaxrec.data.sources import (DEFAULT_SYNTHETIC_SIZE, Source,
                                 SyntheticFn, registered_source,
                                 resolve_source)
from jaxrec.data.splits import build_sequences, check_options
from jaxrec.data.vocabulary import Vocabulary

log = logging.getLogger(__name__)

__all__ = ["load_data", "build_sequences", "resolve_source",
           "registered_source", "Source", "DEFAULT_SYNTHETIC_SIZE"]


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
  check_options(cfg)  # Before any parsing, so a typo fails at once.
  source = resolve_source(cfg.source, cfg, synthetic_fn)
  fingerprint = cache.data_fingerprint(cfg, source.key, vocab, drop_vanished)
  path = os.path.join(cache.cache_dir(cfg), f"sequences-{fingerprint}.npz")
  data = cache.load_cache(path, fingerprint)
  if data is not None:
    log.info("data: cache hit %s", path)
    return data
  data = build_sequences(source.read(), cfg, fingerprint, vocab,
                         drop_vanished)
  cache.save_cache(path, data)
  return data
