"""The methods of the zoo, one package per paper (`jaxrec.method_api` is
the interface); importing this package registers them. No core module
imports it: the `jaxrec.plugins` entry points load it on first use of a
registry (`jaxrec.config.load_plugins`).

  stackrec   StackRec: a shallow model's blocks stacked into a deeper one
  skiprec    SkipRec: a per-user policy that skips blocks
  peterrec   PeterRec: patches in a frozen pretrained network
"""
from jaxrec.methods import peterrec, skiprec, stackrec

__all__ = ["peterrec", "skiprec", "stackrec"]
