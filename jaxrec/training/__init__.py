"""The training core, one module per concern: `mesh` (the data x model
mesh, batch and state placement), `optim` (the optimizer from a
trainable-label tree), `state` (train state, what a checkpoint holds,
restoring params), `checkpoints` (Orbax I/O and metadata, the ordered save path), `rundir` (the run
directory and its logs), `lock` (one writer per run directory),
`interrupts` (Ctrl-C at step boundaries) and `loop` (the train loop and its
pure step)."""
