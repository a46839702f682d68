"""PeterRec's model patch (Yuan et al., SIGIR 2020): a bottleneck that
adapts a frozen pretrained block to a new task.

  P(z) = z + up(GELU(down(z)))     down [C, H], up [H, C], H = C/4 default

`up` starts at zero (kernel and bias), so a freshly patched network
computes exactly what the pretrained one did and fine-tuning starts from
the pretrained function (the official code draws both from N(0, 0.02), so
its patched net starts perturbed). GELU is the tanh form, as the official
`get_mp`. The placements inside a NextItNet block are the block's business
(`jaxrec.models.nextitnet`); this module is the patch alone.
"""
from __future__ import annotations

import flax.linen as nn
import jax

from jaxrec.nn.conv import weight_init


class Patch(nn.Module):
  """`branch`: up(GELU(down(z))); with `residual` z + branch (serial
  placements), without it the branch alone (parallel placements add it
  beside a conv or a block)."""
  hidden: int
  residual: bool = True

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    h = nn.Dense(self.hidden, kernel_init=weight_init, dtype=z.dtype,
                 name="down")(z)
    h = jax.nn.gelu(h, approximate=True)
    branch = nn.Dense(z.shape[-1], kernel_init=nn.initializers.zeros,
                      dtype=z.dtype, name="up")(h)
    return z + branch if self.residual else branch
