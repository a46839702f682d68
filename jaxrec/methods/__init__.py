"""The methods of the zoo, one package each (`jaxrec.method_api` is the
interface): importing this package registers them. No core module imports
it; `jaxrec/__init__.py` does, so every entry point has the registry.

  skiprec    SkipRec: a per-user policy that skips blocks
  peterrec   PeterRec: patches in a frozen pretrained network

StackRec's growth (`jaxrec.surgery.growth`) and CpRec's compression (the
adaptive embedding, the tree softmax and `model.share`) are still core
modules; they move here next.
"""
from jaxrec.methods import peterrec, skiprec

__all__ = ["peterrec", "skiprec"]
