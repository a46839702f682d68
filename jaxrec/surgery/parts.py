"""A network inside a trained backbone, taken out as a model of its own.

GRec's encoder is a bidirectional NextItNet (`jaxrec.models.grec.encoder`):
trained by gap filling, it is the masked pretraining network PeterRec
fine-tunes. `extract_checkpoint(RUN, OUT, "encoder")` saves it as step 0
of a run whose config is that NextItNet's, so `jaxrec finetune --from OUT`
(and eval, grow, train --init-from) treat it as any masked pretraining.

The part gets a fresh output head: the backbone's head scored the whole
network's output (GRec's decoder), never the part's, so keeping it would
only look trained. PeterRec drops the pretrained head anyway.
"""
from __future__ import annotations

import dataclasses

import jax

from jaxrec import heads, models
from jaxrec.config import Config
from jaxrec.errors import JaxrecError
from jaxrec.surgery.checkpoint import apply_to_checkpoint


def extract(params: models.Params, cfg: Config, part: str,
            rng: jax.Array) -> tuple[models.Params, Config]:
  """The params and config of `part` of the model (`params`, `cfg`), with
  a fresh head; refuses, in one line, a part the backbone lacks and a run
  with methods active (they act on the whole backbone, not on a part)."""
  name = cfg.model.name
  parts = models.get(name).parts
  if part not in parts:
    raise JaxrecError(
        f"--part={part!r}: backbone {name!r} has "
        + (f"the parts {sorted(parts)}" if parts else "no parts")
        + " (Backbone.parts)")
  if cfg.methods:
    raise JaxrecError(
        f"--part={part}: the run has methods {[m.NAME for m in cfg.methods]} "
        f"active; they act on the whole {name}, not on its {part}: extract "
        "from a run without them")
  part_params, part_model = parts[part](params, cfg.model)
  # A task the run named was the whole backbone's; the part's own is auto.
  new_cfg = cfg.replace(model=part_model,
                        train=dataclasses.replace(cfg.train, task="auto"))
  head = heads.get(new_cfg.head.name).init(new_cfg.head, part_model, rng)
  return {**part_params, "head": head}, new_cfg


def extract_checkpoint(src_dir: str, out_dir: str, part: str, *,
                       seed: int = 0, kind: str | None = None) -> Config:
  """Saves `part` of `src_dir`'s `kind` checkpoint as step 0 of `out_dir`
  (lineage and vocabulary carried); returns the part's Config."""
  return apply_to_checkpoint(
      src_dir, out_dir,
      lambda params, cfg: extract(params, cfg, part, jax.random.key(seed)),
      {"op": "extract", "part": part, "seed": seed}, kind=kind)
