"""Gap filling: GRec's objective (Yuan et al., WWW 2020). Next-item
prediction where the encoder reads the sequence with each predicted item
cut out, so it can use the items after the gap ("future data helps
training") without seeing the answer.

Training: a row's inputs x and next-item targets y (y_t = x_{t+1}, as
`next_item`); a share `GAP_SHARE` of the real targets, at least one per
row, is chosen (drawn per row); the encoder's view `encoder_ids` is x with
x_{t+1} replaced by MASK for every chosen t; the loss is the head's over
the chosen targets only. The official code (fajieyuan/WWW2020-grec) masks
50% of a sequence and always with the mask token; so does this. The
choice is a pure function of (seed, step), so a resume replays it.

Evaluation and serving are `next_item`'s: the history alone, which both the
encoder and the decoder read (nothing after the last item exists to hide).
"""
from __future__ import annotations

import numpy as np

from jaxrec.data import sequences
from jaxrec.tasks import next_item

NAME = "gap_filling"
GAP_SHARE = 0.5  # Of a row's real targets (official masked_lm_prob 0.5).


def gap_rows(inputs: np.ndarray, targets: np.ndarray,
             rng: np.random.Generator, mask_id: int,
             share: float = GAP_SHARE
             ) -> tuple[np.ndarray, np.ndarray]:
  """(encoder_ids, targets kept) of rows [B, T]: each chosen target's item
  becomes MASK in the encoder's view; unchosen targets become 0."""
  real = targets != 0
  count = np.where(real.any(1), np.maximum(1, np.rint(share * real.sum(1))),
                   0)
  keys = np.where(real, rng.random(targets.shape), np.inf)
  order = np.argsort(np.argsort(keys, axis=1), axis=1)
  chosen = order < count[:, None]
  # Target t is input t+1; the last target lies beyond the inputs already.
  hidden = np.zeros_like(chosen)
  hidden[:, 1:] = chosen[:, :-1]
  encoder_ids = np.where(hidden, mask_id, inputs).astype(inputs.dtype)
  return encoder_ids, np.where(chosen, targets, 0).astype(targets.dtype)


def batch(data: sequences.SequenceData, step: int, batch_size: int,
          seed: int) -> dict[str, np.ndarray]:
  """The training batch of `step`: a pure function of (seed, step)."""
  rows = sequences.train_batch(data.train, step, batch_size, seed)
  rng = np.random.default_rng([seed, step, 0x67617073])  # "gaps"
  encoder_ids, targets = gap_rows(rows["inputs"], rows["targets"], rng,
                                  data.num_items)
  return {"inputs": rows["inputs"], "encoder_ids": encoder_ids,
          "targets": targets}


loss_parts = next_item.loss_parts
loss = next_item.loss
last_hidden = next_item.last_hidden
represent = next_item.represent
rank_fn = next_item.rank_fn
sampled_rank_fn = next_item.sampled_rank_fn
sampler_for = next_item.sampler_for
report = next_item.report
