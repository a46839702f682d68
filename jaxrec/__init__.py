"""jaxrec: very deep sequential recommenders (NextItNet family) in JAX/Flax.

Modules, one idea each: `models` (NextItNet, the scanned residual stack),
`losses` (chunked and sampled softmax), `input_pipeline` and `synthetic`
(data), `metrics` (full ranking), `train` (the loop), `checkpoints` (Orbax),
`evaluation` (saved runs), `cli` (the `jaxrec` command).
"""

__version__ = "0.1.0"
