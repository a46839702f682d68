"""jaxrec: very deep sequential recommenders (NextItNet family) in JAX/Flax.

Packages, one concern each: `nn` (layers, the scan over blocks), `models`
(backbones by name), `heads` (output heads), `tasks` (what a run optimises
and how it is evaluated), `data` (sources, processing, batching, synthetic
data), `training` (loop, mesh, optimizer, checkpoints, run directory),
`surgery` (growth, new heads, applied to checkpoints), `cli` (the `jaxrec`
command); `evaluation` works on saved runs.
"""

__version__ = "0.2.0"
