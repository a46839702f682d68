"""The methods of the zoo, one package per paper (`jaxrec.method_api` is
the interface); importing this package registers them. No core module
imports it: the `jaxrec.plugins` entry points load it on first use of a
registry (`jaxrec.config.load_plugins`).

  stackrec   StackRec: a shallow model's blocks stacked into a deeper one
  cprec      CpRec: blocks shared by an index map (and, in the core, the
             adaptive embedding and the tree softmax)
  skiprec    SkipRec: a per-user policy that skips blocks
  peterrec   PeterRec: patches in a frozen pretrained network
"""
from jaxrec.methods import cprec, peterrec, skiprec, stackrec

__all__ = ["cprec", "peterrec", "skiprec", "stackrec"]
