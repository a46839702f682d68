"""SkipRec (Chen et al., AAAI 2021): a per-user policy that skips blocks.

Read top to bottom:

config.py     `methods.skiprec` (and the `--skip-*` flags): mode, lam, tau,
              policy width, training split, ...
policy.py     the policy subtree `skiprec`, straight-through Gumbel and
              argmax gates, block usage
training.py   the gates of a forward pass (side inputs), the `branch` slot
              that scales each block's residual branch, the usage penalty
              or REINFORCE term, the block-usage report
attach.py     a policy added to a trained backbone (function, checkpoint)
skipping.py   inference that really skips gated-off blocks (cond, compact)

Works on every backbone whose config offers `block_stack`,
`residual_gate` and `causal` (NextItNet; SASRec with `--residual alpha`);
others are refused in one line naming what is missing. On a model that
shares blocks (CpRec) a gate belongs to a run position: skipping it skips
that run of the stored block, not the block's other positions.
"""
from jaxrec import method_api
from jaxrec.methods.skiprec import attach, training
from jaxrec.methods.skiprec.config import SkipRecConfig

METHOD = method_api.register(method_api.Method(
    name=SkipRecConfig.NAME, config=SkipRecConfig,
    init=attach.init, attach=attach.attach,
    stacks=lambda cfg: ("skiprec/head",),  # One row per backbone block.
    side_inputs=training.side_inputs,
    slots=lambda cfg: {"branch": training.gate_branch},
    loss_terms=training.loss_terms, report=training.report,
    param_moves=(("policy", "skiprec"),)))
