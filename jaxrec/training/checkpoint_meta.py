"""A checkpoint's JSON metadata: format, config, data fingerprint,
training position and lineage (the checkpoints this one was grown or
fine-tuned from, oldest first).

Checkpoints of jaxrec 0.1 (`jaxrec.nextitnet/1`: the output layer under
`softmax`, the head options in the model config) are converted when their
params are loaded; a run in that format cannot be resumed (its optimizer
state has another layout), which says so in one line.
"""
from __future__ import annotations

from typing import Any

from jaxrec import config as config_lib
from jaxrec.errors import CheckpointDamaged, JaxrecError

FORMAT = "jaxrec/2"
LEGACY_FORMATS = ("jaxrec.nextitnet/1",)


def check_format(meta: dict[str, Any], origin: str,
                 legacy_ok: bool = True) -> None:
  """Refuses a checkpoint of another program or of an unreadable version."""
  found = meta.get("format")
  if found == FORMAT or (legacy_ok and found in LEGACY_FORMATS):
    return
  readable = [FORMAT, *LEGACY_FORMATS] if legacy_ok else [FORMAT]
  raise JaxrecError(f"{origin}: checkpoint format {found!r}; expected "
                    + " or ".join(repr(f) for f in readable)
                    + ("" if legacy_ok or found not in LEGACY_FORMATS else
                       " (start a new run from it with --init-from)"))


def is_legacy(meta: dict[str, Any]) -> bool:
  return meta.get("format") in LEGACY_FORMATS


def require_jaxrec_meta(meta: Any, origin: str) -> None:
  """Metadata that reads back but is not a jaxrec checkpoint's is damage."""
  if not isinstance(meta, dict) or "format" not in meta:
    raise CheckpointDamaged(f"{origin}: its metadata is not a jaxrec "
                            "checkpoint's")


def stored_config(meta: dict[str, Any], origin: str,
                  legacy_ok: bool = True) -> dict[str, Any]:
  """The config dict a checkpoint's metadata holds, its format checked."""
  check_format(meta, origin, legacy_ok=legacy_ok)
  if not isinstance(meta.get("config"), dict):
    raise CheckpointDamaged(f"{origin}: its metadata holds no config")
  return meta["config"]


def config_from_meta(meta: dict[str, Any], origin: str) -> config_lib.Config:
  """The Config a checkpoint was written with (legacy ones upgraded)."""
  return config_lib.from_dict(stored_config(meta, origin),
                              origin=f"{origin}: config")


def convert_legacy_params(params: dict[str, Any]) -> dict[str, Any]:
  """jaxrec.nextitnet/1 params -> the current tree: the output layer moves
  from `softmax` to `head`; the backbone leaves are unchanged."""
  out = {k: v for k, v in params.items() if k != "softmax"}
  out["head"] = params["softmax"]
  return out


def make_meta(cfg: config_lib.Config, data_fingerprint: str, step: int,
              lineage: list[dict[str, Any]],
              vocabulary: dict[str, Any] | None = None,
              **extra: Any) -> dict[str, Any]:
  """A checkpoint's JSON metadata. `vocabulary` is `Vocabulary.meta()` of
  the run's DIR/vocabulary.json (None: the run has none)."""
  return {"format": FORMAT, "backbone": cfg.model.name,
          "head": cfg.head.name, "config": cfg.to_dict(), "step": int(step),
          "data_fingerprint": data_fingerprint, "lineage": lineage,
          "vocabulary": vocabulary, **extra}
