"""Methods as plug-ins: the one interface through which a paper's method
reaches the model, the loop and serving.

A method (SkipRec, PeterRec, ...) is a package under `jaxrec/methods/`
that builds one `Method` record and calls `register`. The core imports
this module and never a method: backbones, tasks, the loop, checkpoints
and serving ask `active(cfg)` and fold the hooks below in phase order.

A `Method` is a record of pure functions whose defaults do nothing
(optax's `GradientTransformation`, not a class hierarchy). It owns
`cfg.methods[NAME]` (its `MethodConfig`, `jaxrec.config`) and the top-level
subtree `params[NAME]`, so ownership gives checkpoint filtering and
freezing by path (`NAME/.*`). Hooks:

  init(params, cfg, rng) -> params
      adds `params[NAME]` to a fresh tree (a key of its own: adding a
      method leaves every other leaf as it was).
  attach(params, cfg, rng) -> params
      the same on a trained tree (`train --init-from` a run without the
      method); defaults to `init`.
  stacks(cfg) -> paths
      its subtrees with a leading block axis ([L, ...]); StackRec growth
      moves them by the same index map as the backbone's blocks.
  side_inputs(params, cfg, ids, *, train, rng) -> (tree | None, aux)
      per-position inputs of the block scan (leaves [L, ...]: SkipRec's
      gates [L, B], PeterRec's patch params), and what its loss or report
      needs from this forward pass (`aux`, keyed by the method's name).
  slots(cfg) -> {slot: fn(x_in, x_out, side_i) -> x_out}
      code run inside every block at a slot the backbone declares
      (`slot:NAME` capabilities: `layer1`, `layer2` after each layer,
      `branch` on the residual branch before it is added).
  loss_terms(params, cfg, aux, batch) -> {term: scalar}
      added to the task's loss, logged as `loss/NAME/term`.
  report(params, cfg, data) -> dict
      what metrics.json and `jaxrec eval` add (SkipRec's block usage).
  param_moves: ((old path, new path), ...)
      where a config-version-2 checkpoint stored this method's leaves.
  run_blocks(params, cfg) -> tree [L, ...]
      the block tree of every run position, when the method stores blocks
      otherwise (CpRec's sharing: S stored blocks and a map); one method
      at most (it claims `block_storage`).
  block_map(cfg) -> (stored block per run position) | None
      the map behind `run_blocks` (growth keeps a shared model shared).
  grown(cfg, sources) -> its config after StackRec's growth by `sources`
      (deep position -> shallow position, -1 fresh).

An `aux` entry `SCORE_MASK` [B, T] restricts which positions the task's
loss scores (SkipRec trains its policy on the first half of a row and
scores the second half).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp

from jaxrec import config as config_lib
from jaxrec.errors import JaxrecError

Params = dict[str, Any]
# slot fn: (the layer's input, its output, this block's side inputs of the
# method) -> the new output.
SlotFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
SCORE_MASK = "score_mask"


def _no_init(params: Params, cfg: Any, rng: jax.Array) -> Params:
  del cfg, rng
  return params


def _no_side(params: Params, cfg: Any, ids: jax.Array, *, train: bool,
             rng: jax.Array | None) -> tuple[Any, dict[str, Any]]:
  del params, cfg, ids, train, rng
  return None, {}


@dataclasses.dataclass(frozen=True)
class Method:
  """One registry entry (see the module docstring)."""
  name: str
  config: type  # Its MethodConfig subclass.
  init: Callable[[Params, Any, jax.Array], Params] = _no_init
  attach: Callable[[Params, Any, jax.Array], Params] | None = None
  stacks: Callable[[Any], tuple[str, ...]] = lambda cfg: ()
  side_inputs: Callable[..., tuple[Any, dict[str, Any]]] = _no_side
  slots: Callable[[Any], Mapping[str, SlotFn]] = lambda cfg: {}
  loss_terms: Callable[..., Mapping[str, jax.Array]] = (
      lambda params, cfg, aux, batch: {})
  report: Callable[..., dict[str, Any]] = lambda params, cfg, data: {}
  param_moves: tuple[tuple[str, str], ...] = ()
  run_blocks: Callable[[Params, Any], Params] | None = None
  block_map: Callable[[Any], tuple[int, ...] | None] = lambda cfg: None
  grown: Callable[[Any, tuple[int, ...]], Any] | None = None

  def attach_fn(self) -> Callable[[Params, Any, jax.Array], Params]:
    return self.init if self.attach is None else self.attach


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds a method (its package calls this on import); a name is taken
  once, and it must be its config's NAME."""
  if method.name in _METHODS:
    raise AssertionError(f"method {method.name!r} is registered twice")
  if method.config.NAME != method.name:
    raise AssertionError(f"method {method.name!r} has a config named "
                         f"{method.config.NAME!r}")
  _METHODS[method.name] = method
  config_lib.register_class("methods", method.name, method.config)
  return method


def names() -> tuple[str, ...]:
  """Every method, the plug-in packages loaded first."""
  config_lib.load_plugins()
  return tuple(_METHODS)


def get(name: str) -> Method:
  if name not in _METHODS:
    config_lib.load_plugins()
  if name not in _METHODS:
    raise JaxrecError(f"methods: unknown method {name!r}; expected one of "
                      f"{list(names())}")
  return _METHODS[name]


def active(cfg: Any) -> list[tuple[Method, Any]]:
  """(method, its config) of every method `cfg` turns on, in phase order."""
  return [(get(m.NAME), m) for m in cfg.methods]


# ------------------------------------------------------------ the folds


def init(params: Params, cfg: Any, rng: jax.Array) -> Params:
  """A fresh backbone + head tree with every active method's subtree."""
  for method, _ in active(cfg):
    params = method.init(params, cfg, jax.random.fold_in(rng, _key(method)))
  return params


def attach(params: Params, cfg: Any, rng: jax.Array,
           names: Any) -> Params:
  """A trained tree with the methods `names` (active in `cfg`, new to the
  tree) attached in phase order. Named, not guessed from the tree: a
  method may own no subtree (CpRec's sharing ties the blocks in place)."""
  for method, _ in active(cfg):
    if method.name in names:
      params = method.attach_fn()(params, cfg,
                                  jax.random.fold_in(rng, _key(method)))
  return params


def stacks(cfg: Any) -> tuple[str, ...]:
  """Every active method's block-axis subtrees (paths)."""
  return tuple(path for method, _ in active(cfg)
               for path in method.stacks(cfg))


@dataclasses.dataclass(frozen=True)
class BlockPlan:
  """What the methods put into one forward pass of a block stack.

  `side` (per-position inputs keyed by method, leaves [L, ...]) goes into
  the scan; each block calls `at(slot, x_in, x_out, side_i)`, which runs
  the methods' functions for that slot in phase order. `wrap` may replace
  the scanned block function (SkipRec's real skipping at inference).
  """
  slots: tuple[tuple[str, tuple[tuple[str, SlotFn], ...]], ...] = ()
  side: dict[str, Any] | None = None
  wrap: Callable[[Any], Any] | None = None
  storage: Callable[[Params], Params] | None = None

  def run_blocks(self, params: Params) -> Params:
    """The block tree of every run position, [L, ...]: `params["blocks"]`
    unless a method stores blocks otherwise."""
    return params["blocks"] if self.storage is None else self.storage(params)

  def at(self, slot: str, x_in: jax.Array, x_out: jax.Array,
         side_i: dict[str, Any] | None) -> jax.Array:
    for name, fns in self.slots:
      if name == slot:
        for owner, fn in fns:
          x_out = fn(x_in, x_out, None if side_i is None
                     else side_i.get(owner))
    return x_out


def block_plan(params: Params, cfg: Any, ids: jax.Array, *, train: bool,
               rng: jax.Array | None, sides: Mapping[str, Any] | None = None,
               wrap: Callable[[Any], Any] | None = None
               ) -> tuple[BlockPlan, dict[str, Any]]:
  """(the plan of one forward pass, aux keyed by method). A method whose
  side inputs `sides` gives (e.g. gates chosen by the caller) does not
  compute its own."""
  side, aux = {}, {}
  by_slot: dict[str, list[tuple[str, SlotFn]]] = {}
  storage = None
  for method, _ in active(cfg):
    if method.run_blocks is not None:
      storage = functools.partial(method.run_blocks, cfg=cfg)
    if sides is not None and method.name in sides:
      tree = sides[method.name]
    else:
      key = (None if rng is None
             else jax.random.fold_in(rng, _key(method)))
      tree, own = method.side_inputs(params, cfg, ids, train=train, rng=key)
      if own:
        aux[method.name] = own
    if tree is not None:
      # One entry per run position: a tree of another depth would be
      # scanned against the wrong blocks (or fail deep inside the scan).
      chex.assert_tree_shape_prefix(tree, (cfg.model.num_blocks,))
      side[method.name] = tree
    for slot, fn in method.slots(cfg).items():
      by_slot.setdefault(slot, []).append((method.name, fn))
  slots = tuple((slot, tuple(fns)) for slot, fns in by_slot.items())
  return BlockPlan(slots, side or None, wrap, storage), aux


def block_map(cfg: Any) -> tuple[int, ...] | None:
  """Run position -> stored block of the model's stack, or None when
  every position has its own block."""
  for method, _ in active(cfg):
    source = method.block_map(cfg)
    if source is not None:
      return source
  return None


def grown_methods(cfg: Any, sources: tuple[int, ...]) -> tuple[Any, ...]:
  """The method configs of a model grown by `sources` (StackRec)."""
  return tuple(mcfg if method.grown is None else method.grown(cfg, sources)
               for method, mcfg in active(cfg))


def score_mask(aux: Mapping[str, Any], mask: jax.Array) -> jax.Array:
  """The task's loss mask narrowed by every method's `SCORE_MASK`."""
  for own in aux.values():
    if SCORE_MASK in own:
      mask = mask & own[SCORE_MASK].reshape(mask.shape)
  return mask


def loss_terms(params: Params, cfg: Any, aux: Mapping[str, Any],
               batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Every active method's extra loss terms, as `NAME/term`."""
  out = {}
  for method, _ in active(cfg):
    for term, value in method.loss_terms(params, cfg, aux.get(method.name,
                                                              {}),
                                         batch).items():
      out[f"{method.name}/{term}"] = value
  return out


def total_extra_loss(terms: Mapping[str, jax.Array]) -> jax.Array:
  return sum(terms.values(), jnp.zeros((), jnp.float32))


def report(params: Params, cfg: Any, data: Any) -> dict[str, Any]:
  """What the active methods add to metrics.json and `jaxrec eval`."""
  out: dict[str, Any] = {}
  for method, _ in active(cfg):
    out.update(method.report(params, cfg, data))
  return out


def move_legacy_params(params: Params, methods: tuple[Any, ...]) -> Params:
  """A config-version-2 tree with every method's leaves at their new
  paths (`param_moves`): restore as saved, move, then check."""
  out = params
  for mcfg in methods:
    for old, new in get(mcfg.NAME).param_moves:
      out = _move(out, old.split("/"), new.split("/"))
  return out


def _move(tree: Params, old: list[str], new: list[str]) -> Params:
  node = tree
  for key in old[:-1]:
    if not isinstance(node, dict) or key not in node:
      return tree
    node = node[key]
  if not isinstance(node, dict) or old[-1] not in node:
    return tree
  moved = node[old[-1]]
  tree = _without(tree, old)
  return _with(tree, new, moved)


def _without(tree: Params, path: list[str]) -> Params:
  if len(path) == 1:
    return {k: v for k, v in tree.items() if k != path[0]}
  return {**tree, path[0]: _without(tree[path[0]], path[1:])}


def _with(tree: Params, path: list[str], value: Any) -> Params:
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _with(tree.get(path[0], {}), path[1:], value)}


def _key(method: Method) -> int:
  """A fold-in constant per method, from its name (stable across runs)."""
  return sum(ord(c) * 31 ** i for i, c in enumerate(method.name)) % 2 ** 31
