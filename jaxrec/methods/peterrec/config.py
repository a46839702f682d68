"""PeterRec's options: `methods.peterrec` in a config file, `--patch*`
flags (`jaxrec finetune --placement` sets them)."""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxrec.config import MethodConfig, choice, option, require

PLACEMENTS = ("serial", "serial_top", "parallel", "block_parallel")
# The backbone slots each placement writes to.
SLOTS = {"serial": ("layer1", "layer2"), "serial_top": ("layer2",),
         "parallel": ("layer1", "layer2"), "block_parallel": ("branch",)}


@dataclasses.dataclass(frozen=True)
class PeterRecConfig(MethodConfig):
  """Model patches inside a frozen pretrained network (Yuan et al., SIGIR
  2020)."""
  NAME = "peterrec"
  PHASE = 40  # Last: it adapts whatever the earlier methods built.
  FLAGS = {"placement": "--patch", "dim": "--patch-dim"}
  SWITCH = ("placement", "none")  # `--patch none` turns PeterRec off.
  LEGACY = {"patch": "placement", "patch_dim": "dim"}

  placement: str = option("serial", "PeterRec model patches: serial (after "
                          "each layer) | serial_top (after the second "
                          "only) | parallel (beside each layer) | "
                          "block_parallel (beside the whole block); the "
                          "flag's none turns patches off")
  dim: int = option(0, "PeterRec patch bottleneck width H (0: C/4)")

  @classmethod
  def legacy_active(cls, model: dict[str, Any]) -> bool:
    return model.get("patch", "none") != "none"

  def requires(self, cfg: Any) -> frozenset[str]:
    # Patches are per run position: on a model that shares blocks (CpRec)
    # each position that runs a stored block gets a patch of its own.
    slots = SLOTS.get(self.placement, ())
    return frozenset({"block_stack", *(f"slot:{s}" for s in slots)})

  def validate(self) -> None:
    choice("methods.peterrec.placement", self.placement, PLACEMENTS)
    require(self.dim >= 0, "methods.peterrec.dim", self.dim,
            ">= 0 (0: embed_dim / 4)")

  def width(self, model: Any) -> int:
    """The bottleneck width H."""
    return self.dim or max(1, model.embed_dim // 4)

  def patch_names(self) -> tuple[str, ...]:
    """The patches of one block: patch1/patch2 by layer, or one patch."""
    if self.placement == "block_parallel":
      return ("patch",)
    return tuple(f"patch{s[-1]}" for s in SLOTS[self.placement])
