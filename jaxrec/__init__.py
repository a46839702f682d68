"""jaxrec: very deep sequential recommenders (NextItNet family) in JAX/Flax.

Packages, one concern each: `nn` (layers, the scan over blocks), `models`
(backbones by name), `heads` (output heads), `tasks` (what a run optimises
and how it is evaluated), `data` (sources, processing, batching, synthetic
data), `training` (loop, mesh, optimizer, checkpoints, run directory),
`surgery` (growth, new heads, applied to checkpoints), `cli` (the `jaxrec`
command); `evaluation` works on saved runs. `method_api` is the plug-in
interface, and `methods` holds one package per paper's method; no core
package imports `methods`. The packages that fill the registries
(`models`, `heads`, `methods`, and any outside plug-in) are found through
the `jaxrec.plugins` entry points (`jaxrec.config.load_plugins`), so
importing `jaxrec` stays cheap (the CLI handles Ctrl-C from its first
moment) and an outside package adds a method or backbone by declaring one.
"""

__version__ = "0.2.0"

