"""The backbone contract: what every registered model provides.

A backbone maps item ids [B, T] to hidden states [B, T, C] (a float32
residual stream); an output head (`jaxrec.heads`) turns hidden states into
scores. A backbone is one module with:

- a config dataclass extending `jaxrec.config.BackboneConfig`;
- `init(cfg, rng) -> params`: a plain nested dict; every leaf of a block
  stack has a leading block axis (made by vmapping the block's init);
- `apply(params, cfg, ids, *, train, rng, plan, unroll) -> h`:
  `train` switches dropout on (keys from `rng`); `plan` (a
  `jaxrec.method_api.BlockPlan`) carries the active methods' per-position
  side inputs into the block scan and their code to the slots each block
  calls (`plan.at(slot, x_in, x_out, side_i)`); `unroll` runs the stack as
  a Python loop (the test oracle);
- `capabilities()` on its config: what it promises the methods
  (`block_stack`, `residual_gate`, `slot:NAME`, ...), so a method that
  needs more is refused in one line;
- `surgery`: which subtrees are block stacks, which block leaves are
  norms and gates, and the block's layers, for growth and freezing;
- `grown_config(cfg, sources, carry)`: the config of a model whose run
  position i holds old block `sources[i]` (-1: fresh);
- `parts`: networks inside the backbone that are models of another
  registered backbone, by name: (params, cfg) -> (that model's backbone
  params, its config). GRec's `encoder` is a bidirectional NextItNet;
  `jaxrec extract --part encoder` saves it as a run of its own, which
  PeterRec fine-tunes like any masked pretraining;
- `extra_inputs`: names of per-row arrays beside the ids that `apply`
  takes as keyword arguments when a task's batch holds them (GRec's
  `encoder_ids`, the gap-filled view its encoder reads); without them
  (evaluation, serving) `apply` uses its documented default. `users`
  (each row's user index, 0 = unseen; SequenceData.train_users, ...) is
  one such array, in every next-item batch and evaluation batch; a
  backbone that reads it sizes its table by `fit_users` on its config.

Registering the module's `BACKBONE` in `jaxrec.models` gives it every head,
task, loss, evaluation, checkpoint, resume and growth path, and the contract
tests in tests/test_contract.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class BlockLayer:
  """One layer of a block, as fnmatch patterns over its block leaves: the
  weights, and the norm that belongs to the layer (NextItNet's LayerNorm
  after its conv; SASRec's pre-norm before its sublayer)."""
  weights: tuple[str, ...]
  norm: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class SurgeryRules:
  """Where surgery acts on a backbone's tree. Paths are '/'-joined keys;
  leaf names inside a block are fnmatch patterns."""
  stacks: tuple[str, ...] = ("blocks",)  # Subtrees with a leading block axis.
  norms: tuple[str, ...] = ()  # Block leaves that StackRec's `paper` resets.
  gates: tuple[str, ...] = ()  # Block leaves scaling a residual branch.
  # The block's layers, bottom to top, the i-th the one whose output the
  # `layer{i+1}` slot sees. Fine-tuning presets are written in them
  # (FineLast1 trains the top block's last layer, PeterRec the last
  # layer's norm: `jaxrec.methods.peterrec.finetune`), so they need no
  # backbone's leaf names; a backbone declaring none is refused by those
  # presets.
  layers: tuple[BlockLayer, ...] = ()


def grown_depth(cfg: Any, sources: tuple[int, ...], carry: bool) -> Any:
  """The default `grown_config`: only the depth changes."""
  del carry  # Nothing positional in the config.
  return dataclasses.replace(cfg, num_blocks=len(sources))


@dataclasses.dataclass(frozen=True)
class Backbone:
  """One registry entry (see the module docstring)."""
  name: str
  config: type
  init: Callable[..., Params]
  apply: Callable[..., Any]
  surgery: SurgeryRules
  grown_config: Callable[[Any, tuple[int, ...], bool], Any] = grown_depth
  extra_inputs: tuple[str, ...] = ()
  parts: dict[str, Callable[[Params, Any], tuple[Params, Any]]] = (
      dataclasses.field(default_factory=dict))
