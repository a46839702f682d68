"""SkipRec: a per-user policy that skips residual blocks.

policy.py    the policy subtree, straight-through Gumbel and argmax gates,
             block usage
attach.py    adding a policy to a trained backbone (function and checkpoint)

The joint training loss (Gumbel with a usage penalty, or self-critical
REINFORCE) is the task `jaxrec.tasks.skiprec`; really skipping blocks at
inference is `jaxrec.nn.skipping`.
"""
