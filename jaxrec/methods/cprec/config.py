"""CpRec's layer sharing options: `methods.cprec` in a config file,
`--share*` and `--block-source` flags."""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxrec.config import MethodConfig, choice, option, require
from jaxrec.errors import JaxrecError

SCHEMES = ("cross_layer", "cross_block", "adjacent_layer", "adjacent_block")


@dataclasses.dataclass(frozen=True)
class CpRecConfig(MethodConfig):
  """Block-wise layer sharing (Sun et al., SIGIR 2020), as an index map
  from run position to stored block; a block's dilation (or any positional
  static) always follows its run position."""
  NAME = "cprec"
  PHASE = 20  # After growth sets the depth; before skipping and patches.
  CLAIMS = frozenset({"block_storage"})
  COMPRESSES = True
  FLAGS = {"share": "--share", "period": "--share-period",
           "leaves": "--share-leaves", "block_source": "--block-source"}
  SWITCH = ("share", "none")  # `--share none` turns sharing off.
  LEGACY = {"share": "share", "share_period": "period",
            "share_leaves": "leaves", "block_source": "block_source"}

  share: str = option("cross_block", "CpRec layer sharing: cross_layer "
                      "(one stored block, its two layers shared, ALBERT) | "
                      "cross_block (position i runs stored block i mod P) | "
                      "adjacent_layer (a block's two layers share one "
                      "kernel) | adjacent_block (position i runs stored "
                      "block i // 2); the flag's none turns sharing off")
  period: int = option(2, "cross_block: stored blocks P; must divide "
                       "num_blocks")
  leaves: str = option("all", "what sharing shares: all (whole blocks, the "
                       "paper) | convs (norms and gates stay per position, "
                       "in block_norms [L, ...])")
  block_source: tuple[int, ...] = option(
      (), "explicit map run position -> stored block (one per block); "
      "growing a shared model writes it")

  @classmethod
  def legacy_active(cls, model: dict[str, Any]) -> bool:
    return (model.get("share", "none") != "none"
            or bool(model.get("block_source")))

  def source_map(self, num_blocks: int) -> tuple[int, ...] | None:
    """Run position -> stored block, or None when every block is its own."""
    if self.block_source:
      return tuple(self.block_source)
    if self.share == "cross_layer":
      return (0,) * num_blocks
    if self.share == "cross_block":
      return tuple(i % self.period for i in range(num_blocks))
    if self.share == "adjacent_block":
      return tuple(i // 2 for i in range(num_blocks))
    return None

  def stored_blocks(self, num_blocks: int) -> int:
    source = self.source_map(num_blocks)
    return num_blocks if source is None else max(source) + 1

  def shares_layers(self) -> bool:
    """Whether a block's two layers share one kernel."""
    return self.share in ("adjacent_layer", "cross_layer")

  def split_norms(self, num_blocks: int) -> bool:
    """Whether norms and gates live per position beside shared blocks."""
    return self.leaves == "convs" and self.source_map(num_blocks) is not None

  def requires(self, cfg: Any) -> frozenset[str]:
    need = {"block_stack"}
    if self.shares_layers():
      need.add("layer_pair")  # Two layers that can run one kernel.
    return frozenset(need)

  def removes(self, cfg: Any) -> frozenset[str]:
    if self.source_map(cfg.model.num_blocks) is None:
      return frozenset()
    return frozenset({"own_blocks"})

  def removal_hint(self) -> str:
    return ("methods.cprec shares blocks; untie the model first "
            "(jaxrec.methods.cprec.sharing.untie)")

  def validate(self) -> None:
    choice("methods.cprec.share", self.share, SCHEMES)
    choice("methods.cprec.leaves", self.leaves, ("all", "convs"))

  def check(self, cfg: Any) -> None:
    depth = cfg.model.num_blocks
    if self.block_source:
      src = list(self.block_source)
      require(len(src) == depth and set(src) == set(range(max(src) + 1)),
              "methods.cprec.block_source", src,
              f"{depth} stored-block indices covering 0..S-1")
    elif self.share == "cross_block":
      require(1 <= self.period < depth and depth % self.period == 0,
              "methods.cprec.period", self.period,
              f"a divisor of model.num_blocks={depth} below it")
    elif self.share == "adjacent_block":
      require(depth % 2 == 0, "model.num_blocks", depth,
              "an even depth for methods.cprec.share='adjacent_block'")
    if cfg.train.train_top_blocks and self.source_map(depth) is not None:
      raise JaxrecError(
          f"train.train_top_blocks={cfg.train.train_top_blocks}: the model "
          f"shares blocks (methods.cprec.share={self.share!r}), so no stored "
          "block is the top one; freeze by path (train.freeze) instead")
