"""Tasks: what a run optimises and how it is evaluated.

A task provides `loss(params, cfg, batch, rng, sampler) -> scalar`,
`batch(data, step, batch_size, seed) -> dict` (a pure function of the
step, so a resume replays exactly), and `rank_fn(cfg)` /
`sampled_rank_fn(cfg)` for evaluation. `next_item` is the sequential
recommendation task every backbone trains on; a classification task comes
with PeterRec.
"""

from typing import Any


def for_config(cfg: Any) -> Any:
  """The task a config trains on: `skiprec` when the model has a SkipRec
  policy (`model.skip`), else `next_item`."""
  # pylint: disable=import-outside-toplevel
  from jaxrec.skip import policy
  if policy.enabled(cfg):
    from jaxrec.tasks import skiprec
    return skiprec
  from jaxrec.tasks import next_item
  return next_item
