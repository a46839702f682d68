"""CpRec (Sun et al., SIGIR 2020): a generic compression framework for
sequential recommenders.

Read top to bottom:

config.py    `methods.cprec` (the `--share*` flags): the sharing scheme as
             an index map from run position to stored block
storage.py   shared storage: init keeps one block per stored index, the
             block scan gets every run position's tree by a gather; growth
             composes the maps
sharing.py   untying a shared model into the equal unshared one

Attached to a trained unshared model (`train --init-from RUN --share
...`), `init` ties it: stored block s keeps the trained block at the first
position that runs it (and a layer pair keeps its first layer).

CpRec's other two parts are core components that any model can use: the
block-wise adaptive input embedding (`model.embedding=adaptive`,
`jaxrec.nn.embedding`) and the two-level tree softmax (`head.name=
tree_softmax`, `jaxrec.heads.tree_softmax`, with its exact early-exit
top-N), both on the frequency bands of `jaxrec.nn.bands`. Block sharing
works on every backbone with a block stack (NextItNet, SASRec); layer
sharing needs a block with a pair of layers (`layer_pair`: NextItNet).
"""
from jaxrec import method_api
from jaxrec.methods.cprec import storage
from jaxrec.methods.cprec.config import CpRecConfig

METHOD = method_api.register(method_api.Method(
    name=CpRecConfig.NAME, config=CpRecConfig, init=storage.init,
    stacks=storage.stacks, run_blocks=storage.run_blocks,
    block_map=storage.block_map, grown=storage.grown,
    report=storage.report))
