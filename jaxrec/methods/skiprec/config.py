"""SkipRec's options: `methods.skiprec` in a config file, `--skip-*` flags."""
from __future__ import annotations

import dataclasses
from typing import Any

from jaxrec.config import MethodConfig, choice, option, require

MODES = ("gumbel", "rl")


@dataclasses.dataclass(frozen=True)
class SkipRecConfig(MethodConfig):
  """A per-user policy that skips residual blocks (Chen et al., AAAI 2021)."""
  NAME = "skiprec"
  PHASE = 30  # After growth and compression: one gate per final position.
  CLAIMS = frozenset({"residual_gate"})
  FLAGS = {"mode": "--skip", "lam": "--skip-lambda", "tau": "--skip-tau",
           "policy_dim": "--skip-policy-dim",
           "train_split": "--skip-train-split", "confine": "--skip-confine",
           "init_embedding": "--skip-init-embedding",
           "rl_penalty": "--skip-rl-penalty"}
  SWITCH = ("mode", "none")  # `--skip none` turns SkipRec off.
  LEGACY = {"skip": "mode", "skip_lambda": "lam", "skip_tau": "tau",
            "skip_policy_dim": "policy_dim",
            "skip_train_split": "train_split", "skip_confine": "confine",
            "skip_init_embedding": "init_embedding",
            "skip_rl_penalty": "rl_penalty"}

  mode: str = option("gumbel", "SkipRec policy training: gumbel "
                     "(straight-through Gumbel, trained jointly) | rl "
                     "(self-critical REINFORCE); the flag's none turns "
                     "SkipRec off")
  lam: float = option(0.0, "SkipRec usage penalty: loss += lam * "
                      "mean(gate) (0: the official Gumbel variant)")
  tau: float = option(10.0, "SkipRec Gumbel-softmax temperature (the soft "
                      "backward pass; the hard sample ignores it)")
  policy_dim: int = option(0, "SkipRec policy width (0: embed_dim)")
  train_split: str = option(
      "half", "SkipRec training: half (the policy reads the first half of "
      "each training row, the loss scores the second half, so no gate "
      "depends on a target it is trained on) | all (official: the policy "
      "reads the whole row, early positions' gates see later items)")
  confine: bool = option(False, "SkipRec: the official code's sigmoid "
                         "before the softmax, which confines keep "
                         "probabilities to [0.269, 0.731]")
  init_embedding: bool = option(
      True, "SkipRec: a policy added to a trained backbone starts from its "
      "item embedding (the official --use_pre; a banded embedding gives its "
      "projected vectors; needs policy_dim 0)")
  rl_penalty: float = option(0.1, "SkipRec rl: reward = hit@5 - penalty * "
                             "share of blocks used")

  @classmethod
  def legacy_active(cls, model: dict[str, Any]) -> bool:
    return model.get("skip", "none") != "none"

  def requires(self, cfg: Any) -> frozenset[str]:
    # One gate per run position (a position that runs a shared block skips
    # that run only); a gate of 0 must make the block the identity; the
    # policy reads the past only.
    return frozenset({"block_stack", "residual_gate", "causal"})

  def validate(self) -> None:
    choice("methods.skiprec.mode", self.mode, MODES)
    choice("methods.skiprec.train_split", self.train_split, ("half", "all"))
    require(self.lam >= 0, "methods.skiprec.lam", self.lam, ">= 0")
    require(self.tau > 0, "methods.skiprec.tau", self.tau, "> 0")
    require(self.policy_dim >= 0, "methods.skiprec.policy_dim",
            self.policy_dim, ">= 0 (0: embed_dim)")

  def width(self, model: Any) -> int:
    """The policy's width P."""
    return self.policy_dim or model.embed_dim
