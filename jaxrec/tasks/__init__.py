"""Tasks: what a run optimises and how it is evaluated.

A task provides `loss(params, cfg, batch, rng, sampler) -> scalar`,
`represent(params, cfg, inputs) -> [B, C]` (what scores the outputs),
`batch(data, step, batch_size, seed) -> dict` (a pure function of the
step, so a resume replays exactly), and `rank_fn(cfg)` /
`sampled_rank_fn(cfg)` for evaluation. `next_item` is the sequential
recommendation task every causal backbone trains on; `masked_item` trains a
bidirectional one; `skiprec` trains a backbone with a SkipRec policy;
`transfer` (PeterRec) classifies a user's sequence into a new vocabulary of
target items (cold start) or classes (profiles).
"""

from typing import Any


def for_config(cfg: Any) -> Any:
  """The task a config trains on: `transfer` for `train.task` cold_start or
  profile; else `skiprec` when the model has a SkipRec policy
  (`model.skip`), `masked_item` when it is bidirectional, `next_item`."""
  # pylint: disable=import-outside-toplevel
  from jaxrec.skip import policy
  if cfg.train.task != "auto":
    from jaxrec.tasks import transfer
    return transfer
  if not cfg.model.is_causal():
    from jaxrec.tasks import masked_item
    return masked_item
  if policy.enabled(cfg):
    from jaxrec.tasks import skiprec
    return skiprec
  from jaxrec.tasks import next_item
  return next_item
