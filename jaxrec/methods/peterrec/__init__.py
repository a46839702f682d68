"""PeterRec (Yuan et al., SIGIR 2020): fine-tune a pretrained network for a
downstream task by training small patches inside it, the rest frozen.

Read top to bottom:

config.py     `methods.peterrec` (the `--patch*` flags): placement, width
patches.py    the patch subtree `peterrec`, zero-initialised, and its code
              at the backbone's slots
finetune.py   the whole method: a pretrained run + a downstream file ->
              a fine-tuning run (the paper's presets and baselines);
              `jaxrec finetune` calls it

The downstream tasks (cold start, profiles) are core tasks
(`jaxrec.tasks.transfer`) over data read by `jaxrec.data.transfer`.
Patches go on any backbone whose config offers `block_stack` and the
slots of the placement (NextItNet, SASRec). On a model that shares blocks
(CpRec) each run position gets its own patch beside the shared block.
"""
from jaxrec import method_api
from jaxrec.methods.peterrec import patches
from jaxrec.methods.peterrec.config import PeterRecConfig

METHOD = method_api.register(method_api.Method(
    name=PeterRecConfig.NAME, config=PeterRecConfig, init=patches.init,
    stacks=lambda cfg: ("peterrec",), side_inputs=patches.side_inputs,
    slots=patches.slots,
    param_moves=tuple((f"blocks/{p}", f"peterrec/{p}")
                      for p in ("patch1", "patch2", "patch"))))
