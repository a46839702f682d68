"""Tasks: what a run optimises and how it is evaluated.

A task provides `loss(params, cfg, batch, rng, sampler) -> scalar` and
`loss_parts(...) -> (scalar, the methods' terms in it by name)`,
`represent(params, cfg, inputs, users=None) -> [B, C]` (what scores the
outputs; `users` [B], 0 = unseen, for a backbone that reads them),
`batch(data, step, batch_size, seed) -> dict` (a pure function of the
step, so a resume replays exactly), and `rank_fn(cfg)` /
`sampled_rank_fn(cfg)` for evaluation. `next_item` is the sequential
recommendation task every causal backbone trains on; `masked_item` trains a
bidirectional one;
`gap_filling` trains GRec (next items, each hidden from the encoder's
view); `transfer` (PeterRec) classifies a user's sequence into a new vocabulary of
target items (cold start) or classes (profiles).
"""

from typing import Any

from jaxrec.tasks import gap_filling, masked_item, next_item, transfer

BY_NAME = {"next_item": next_item, "masked_item": masked_item,
           "gap_filling": gap_filling}


def for_config(cfg: Any) -> Any:
  """The task a config trains on: `transfer` for `train.task` cold_start or
  profile; else the backbone's (`training_task()`: `next_item` for a causal
  one, `masked_item` for a bidirectional one, GRec's `gap_filling`).
  Methods act through their hooks, not through a task."""
  if cfg.train.task != "auto":
    return transfer
  return BY_NAME[cfg.model.training_task()]
