"""StackRec model growth: a shallow model's blocks stacked into a deeper one.

A growth *method* says where each block of the deep model comes from, as an
index map (deep block -> shallow block, or FRESH = -1 for a new block); with
L shallow blocks and no `top`:

  adjacent    (stackA)  deep i <- shallow i // 2       0,0,1,1,...,L-1,L-1
  cross       (stackC)  deep i <- shallow i mod L      0,1,..,L-1,0,1,..,L-1
  random_top  (StackR)  bottom L copied, top L fresh   0,1,..,L-1,-,..,-
  embed_only  (StackE)  every block fresh              -,-,...,-

`top=k` grows by k blocks instead of L, duplicating only the top k blocks
(the official `ops_copytop.py`): adjacent doubles each of the top k in place
(0,..,L-k-1, L-k,L-k, .., L-1,L-1); cross appends a copy of the top k above
the whole stack (0,..,L-1, L-k,..,L-1); random_top appends k fresh blocks;
embed_only makes all L+k blocks fresh. With k = L each equals its full form.

A *preset* says what happens to the leaves besides the block copies:

  paper     the official code: conv kernels and biases and the item
            embedding copied; LayerNorms reset (scale 1, bias 0), every
            residual gate alpha reset to 0, the output softmax re-initialised.
            A warm start, not function preserving.
  preserve  function preserving: everything copied, and every deep block that
            is not the lowest copy of its source (the second of an adjacent
            pair, the upper cross copy, the top-k copies, fresh blocks) gets
            alpha = 0, so it is the identity and the deep model computes what
            the shallow one did. Needs residual="alpha".
  full      everything copied as is.

"Fresh" and "reset" leaves are exactly the leaves of
`models.init_params(deep_cfg, rng)`, so with `embed_only` + `paper` the deep
model is a fresh model whose item embedding is the shallow one's.

Dilations (NextItNet) are config, not params. Policy `position` (official) keeps the
`dilations` cycle, so a copied kernel runs at the dilation of its new
position; `carry` pins every deep block to its source's dilation (an explicit
per-block list; fresh blocks get their positional dilation). `preserve` is
exact only when each block kept alive runs at its source's dilation: always
under `carry`, which is therefore its default; under `position` that holds
for cross, random_top and top-k cross (the bottom L positions keep their
dilations) but not for adjacent with a cycle such as [1, 4] (shallow block 1,
dilation 4, lands on position 2, dilation 1), and `stack` warns.

It works on every registered backbone: its `surgery` rules (`jaxrec.models`)
name the block stacks (each grown with the same plan), the norms and the
gates; the output head is the `head` subtree; fresh leaves come from
`models.init_params` of the deep config. Array work is `jnp.take` / `jnp.where`
along axis 0, pure and jittable (cfg, method, preset static): wrap
`lambda p, r: stack(p, cfg, ..., rng=r)[0]` in `jax.jit`. Eagerly, every
output leaf is placed with the sharding of the shallow leaf it replaces
(replicated stays replicated).

`grow_checkpoint` / `jaxrec grow` grow a saved run into a new directory
(through `surgery.checkpoint.apply_to_checkpoint`) that `jaxrec train
--init-from` starts from, with a fresh optimizer as in the
paper; `stack_opt_state` (and `map_opt_state=True`) grows Adam's moments too,
which `train --init-opt-state` then uses.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import method_api, models
from jaxrec.config import Config
from jaxrec.errors import JaxrecError
from jaxrec.surgery.checkpoint import apply_to_checkpoint
# What a growth did, leaf by leaf: growth.diff(shallow, deep, cfg).
from jaxrec.surgery.diff import Diff, LeafDiff, diff  # pylint: disable=unused-import
from jaxrec.training.optim import path_name

Params = dict[str, Any]
FRESH = -1  # Index-map entry of a deep block that gets fresh params.
HEAD = "head"  # The output head's subtree, which `paper` re-initialises.
STORED = "blocks"  # The block stack a sharing method stores fewer rows of.
METHODS = ("adjacent", "cross", "random_top", "embed_only")
PRESETS = ("paper", "preserve", "full")
DILATION_POLICIES = ("position", "carry")


@dataclasses.dataclass(frozen=True)
class Plan:
  """One growth step, all static: where each deep block comes from."""
  index_map: tuple[int, ...]
  gate_off: tuple[bool, ...]  # preserve: blocks whose gates are set to 0.
  preset: str
  # A shared model (CpRec) keeps its stored blocks and appends one fresh
  # stored block per FRESH position: its stored `blocks` grow by this map,
  # and the method's source map is composed (`method_api.grown_methods`).
  stored_map: tuple[int, ...] | None = None

  def for_stack(self, name: str) -> "Plan":
    """The plan a stack grows by: the stored blocks of a shared model keep
    their rows (no gate to switch off per position there)."""
    if self.stored_map is None or name != STORED:
      return self
    return Plan(self.stored_map, (False,) * len(self.stored_map), self.preset)


# ------------------------------------------------------------- index maps


def index_map(method: str, num_blocks: int,
              top: int | None = None) -> tuple[int, ...]:
  """Deep block -> shallow source block (FRESH = new); see module docstring."""
  l = num_blocks
  k = l if top is None else top
  if method == "adjacent":
    return tuple(range(l - k)) + tuple(l - k + i // 2 for i in range(2 * k))
  if method == "cross":
    return tuple(range(l)) + tuple(range(l - k, l))
  if method == "random_top":
    return tuple(range(l)) + (FRESH,) * k
  if method == "embed_only":
    return (FRESH,) * (l + k)
  raise JaxrecError(f"growth method {method!r}: expected one of "
                    f"{list(METHODS)}")


def gated_off(idx: tuple[int, ...]) -> tuple[bool, ...]:
  """True for fresh blocks and every copy above the lowest of its source."""
  seen: set[int] = set()
  out = []
  for j in idx:
    out.append(j == FRESH or j in seen)
    seen.add(j)
  return tuple(out)


def gather_blocks(blocks: Params, idx: tuple[int, ...],
                  fresh_blocks: Params | None = None) -> Params:
  """Every leaf: rows `idx` of the shallow stack, fresh rows where idx < 0.

  `fresh_blocks` (the deep depth) fills FRESH rows; None fills zeros (the
  Adam moments of a new block).
  """
  idx_np = np.asarray(idx, np.int32)
  src = np.maximum(idx_np, 0)
  fresh = idx_np == FRESH

  def one(x, f):
    taken = jnp.take(x, src, axis=0)
    mask = fresh.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.where(mask, 0 if f is None else f, taken)

  if fresh_blocks is None:
    return jax.tree.map(lambda x: one(x, None), blocks)
  return jax.tree.map(one, blocks, fresh_blocks)


# ------------------------------------------------------------ tree surgery


def grow_tree(tree: Params, plan: Plan, fresh: Params | None,
              rules: models.SurgeryRules,
              method_stacks: tuple[str, ...] = ()) -> Params:
  """Applies one plan to a params-shaped tree (params or an Adam moment).

  `fresh` is a fresh deep tree; None means zeros (the moments of new params).
  `method_stacks` are the active methods' block-axis subtrees (paths such
  as `skiprec/head`, `peterrec`): their rows follow the backbone's index
  map (a fresh block gets fresh rows, zeros for a moment).
  """
  out = {}
  for name, sub in tree.items():
    fresh_sub = None if fresh is None else fresh[name]
    if name in rules.stacks:
      out[name] = _grow_blocks(sub, plan.for_stack(name), fresh_sub, rules)
    elif plan.preset == "paper" and name == HEAD:
      out[name] = (fresh_sub if fresh_sub is not None
                   else jax.tree.map(jnp.zeros_like, sub))
    else:
      out[name] = sub
  for path in method_stacks:
    out = _grow_at(out, path.split("/"), plan, fresh, rules)
  return out


def _grow_at(tree: Params, path: list[str], plan: Plan,
             fresh: Params | None, rules: models.SurgeryRules) -> Params:
  """`tree` with the block-axis subtree at `path` grown by `plan` (its
  norms and gates, if any, handled as the blocks')."""
  key = path[0]
  if key not in tree:
    return tree
  fresh_sub = None if fresh is None else fresh[key]
  if len(path) == 1:
    return {**tree, key: _grow_blocks(tree[key], plan, fresh_sub, rules)}
  return {**tree, key: _grow_at(tree[key], path[1:], plan, fresh_sub,
                                rules)}


def _grow_blocks(blocks: Params, plan: Plan, fresh: Params | None,
                 rules: models.SurgeryRules) -> Params:
  deep = gather_blocks(blocks, plan.index_map, fresh)
  gate_off = np.asarray(plan.gate_off)

  def fix(path, x, f):
    name = path_name(path)
    if plan.preset == "paper" and _matches(name, rules.norms + rules.gates):
      return jnp.zeros_like(x) if f is None else f
    if plan.preset == "preserve" and _matches(name, rules.gates):
      return jnp.where(gate_off.reshape((-1,) + (1,) * (x.ndim - 1)), 0, x)
    return x

  if fresh is None:
    return jax.tree_util.tree_map_with_path(
        lambda p, x: fix(p, x, None), deep)
  return jax.tree_util.tree_map_with_path(fix, deep, fresh)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
  return any(fnmatch.fnmatchcase(name, p) for p in patterns)


# -------------------------------------------------------------- the API


def stack(params: Params, cfg: Config, method: str,
          preset: str = "paper", *, rng: jax.Array, times: int = 1,
          top: int | None = None,
          dilations: str | None = None) -> tuple[Params, Config]:
  """Grows `params` (shaped by `cfg`) `times` times; returns (params, cfg).

  Each growth adds L blocks (k with `top=k`): 4 -> 8 -> 16 with times=2.
  `dilations`: "position" or "carry"; None means carry for `preserve` (the
  policy that keeps it exact) and position (official) otherwise. The first
  growth draws fresh leaves from `models.init_params(deep_cfg, rng)`,
  growth s > 0 from `fold_in(rng, s)`.
  """
  policy = resolve_policy(preset, dilations)
  check_options(params, cfg, method, preset, policy, times, top)
  plans, cfgs = [], []
  for _ in range(times):
    plans.append(make_plan(cfg, method, preset, top))
    cfg = deep_config(cfg, plans[-1], policy)
    cfgs.append(cfg)
  deep = _grow_params(params, rng, tuple(plans), tuple(cfgs))
  return place_like(deep, params), cfg


@functools.partial(jax.jit, static_argnums=(2, 3))
def _grow_params(params: Params, rng: jax.Array, plans: tuple[Plan, ...],
                 cfgs: tuple[Config, ...]) -> Params:
  """All growths as one program: eagerly, every op would compile alone."""
  for s, (plan, deep_cfg) in enumerate(zip(plans, cfgs)):
    needs_fresh = plan.preset == "paper" or FRESH in plan.index_map
    key = rng if s == 0 else jax.random.fold_in(rng, s)
    fresh = models.init_params(deep_cfg, key) if needs_fresh else None
    params = grow_tree(params, plan, fresh, _rules(deep_cfg),
                       method_api.stacks(deep_cfg))
  return params


def stack_opt_state(opt_state: Any, cfg: Config, method: str,
                    preset: str = "paper", *, times: int = 1,
                    top: int | None = None) -> Any:
  """Maps an optax state the way `stack` maps the params it belongs to.

  Every subtree shaped like the params (Adam's mu and nu) is grown with the
  same plans; copied leaves keep their moments, fresh and reset leaves (and
  the gates `preserve` switches off) get zeros. Other leaves (the step
  count, so Adam's bias correction goes on) are kept.
  """
  shallow = models.abstract_params(cfg)
  check_options(shallow, cfg, method, preset, "position", times, top)
  if cfg.train.freeze:
    raise JaxrecError("mapping the optimizer state of a run with frozen "
                      f"parts (train.freeze={list(cfg.train.freeze)}) is "
                      "not supported; grow without --map-opt-state")
  plans, deep = [], cfg
  for _ in range(times):
    plans.append(make_plan(deep, method, preset, top))
    deep = deep_config(deep, plans[-1], "position")
  structure = jax.tree.structure(shallow)
  deep = _grow_moments(opt_state, tuple(plans), _rules(cfg), structure,
                       method_api.stacks(cfg))
  return place_like(deep, opt_state)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _grow_moments(opt_state: Any, plans: tuple[Plan, ...],
                  rules: models.SurgeryRules, structure: Any,
                  method_stacks: tuple[str, ...]) -> Any:
  def params_like(x):
    return isinstance(x, dict) and jax.tree.structure(x) == structure

  def grow(x):
    if not params_like(x):
      return x
    for plan in plans:
      x = grow_tree(x, plan, None, rules, method_stacks)
    return x

  return jax.tree.map(grow, opt_state, is_leaf=params_like)


def _rules(cfg: Config) -> models.SurgeryRules:
  return models.get(cfg.model.name).surgery


def make_plan(cfg: Config, method: str, preset: str,
              top: int | None) -> Plan:
  """The static part of one growth of a model's stack."""
  idx = index_map(method, cfg.model.num_blocks, top)
  stored_map = None
  shared = method_api.block_map(cfg)
  if shared is not None:
    stored = max(shared) + 1
    stored_map = tuple(range(stored)) + (FRESH,) * idx.count(FRESH)
  return Plan(idx, gated_off(idx), preset, stored_map)


def deep_config(cfg: Config, plan: Plan, policy: str) -> Config:
  """The deep model's config: the backbone's `grown_config` (depth, and
  for NextItNet the dilations by policy) and the active methods' (a shared
  model's composed map)."""
  backbone = models.get(cfg.model.name)
  deep = backbone.grown_config(cfg.model, plan.index_map, policy == "carry")
  methods = method_api.grown_methods(cfg, plan.index_map)
  src_dils, deep_dils = cfg.model.derived(), deep.derived()
  if plan.preset == "preserve" and "dilations" in src_dils:
    _warn_if_moved(plan, src_dils["dilations"], deep_dils["dilations"])
  return cfg.replace(model=deep, methods=methods)


def _warn_if_moved(plan: Plan, src_dils: tuple[int, ...],
                   deep_dils: tuple[int, ...]) -> None:
  """preserve is exact only if each live block keeps its source dilation."""
  for i, (j, off) in enumerate(zip(plan.index_map, plan.gate_off)):
    if not off and deep_dils[i] != src_dils[j]:
      warnings.warn(
          f"preset 'preserve' with dilations='position': shallow block {j} "
          f"(dilation {src_dils[j]}) runs at deep block {i} with dilation "
          f"{deep_dils[i]}, so the deep model does not compute the same "
          "function; use dilations='carry' for an exact copy", stacklevel=4)
      return


def resolve_policy(preset: str, dilations: str | None) -> str:
  if dilations is None:
    return "carry" if preset == "preserve" else "position"
  if dilations not in DILATION_POLICIES:
    raise JaxrecError(f"dilation policy {dilations!r}: expected one of "
                      f"{list(DILATION_POLICIES)}")
  return dilations


def check_options(params: Params, cfg: Config, method: str, preset: str,
                  policy: str, times: int, top: int | None) -> None:
  """Every user mistake as one JaxrecError, before any array work."""
  if method not in METHODS:
    raise JaxrecError(f"growth method {method!r}: expected one of "
                      f"{list(METHODS)}")
  if preset not in PRESETS:
    raise JaxrecError(f"growth preset {preset!r}: expected one of "
                      f"{list(PRESETS)}")
  if policy not in DILATION_POLICIES:
    raise JaxrecError(f"dilation policy {policy!r}: expected one of "
                      f"{list(DILATION_POLICIES)}")
  if not isinstance(times, int) or times < 1:
    raise JaxrecError(f"times={times!r}: expected an integer >= 1")
  depth = cfg.model.num_blocks
  if top is not None and not (isinstance(top, int) and 1 <= top <= depth):
    raise JaxrecError(f"top={top!r}: expected 1..{depth} (the shallow model "
                      f"has {depth} blocks)")
  models.require_fit(params, cfg, "params")
  rules = _rules(cfg)
  stored_gates = STORED in params and any(
      _matches(path_name(p), rules.gates)
      for p, _ in jax.tree_util.tree_leaves_with_path(params[STORED]))
  if (preset == "preserve" and method_api.block_map(cfg) is not None
      and stored_gates):
    raise JaxrecError(
        "preset 'preserve' on a model whose blocks share their gates "
        "(methods.cprec with leaves='all'): a copy cannot start as the "
        "identity while its source runs; untie it first "
        "(jaxrec.methods.cprec.sharing.untie) or use leaves='convs'")
  if preset == "preserve":
    gated = any(
        _matches(path_name(p), rules.gates)
        for stack_ in rules.stacks + method_api.stacks(cfg)
        if stack_ in params
        for p, _ in jax.tree_util.tree_leaves_with_path(params[stack_]))
    if not rules.gates or not gated:
      raise JaxrecError(
          "preset 'preserve' needs a gated residual (model.residual='alpha') "
          "so a duplicated block can start as the identity; this "
          f"{cfg.model.name} has no gate leaves "
          f"({', '.join(rules.gates) or 'none declared'}): use 'paper' or "
          "'full'")
    if method == "embed_only":
      raise JaxrecError("preset 'preserve' cannot keep the function with "
                        "method 'embed_only' (every block is fresh): use "
                        "'paper' or 'full'")


def place_like(deep: Params, shallow: Params) -> Params:
  """Puts each concrete deep leaf on its shallow leaf's sharding.

  Fresh leaves come from an init on the default device; without this a
  replicated model would come back partly on one device. Under `jax.jit`
  (tracers) placement is left to the caller's out_shardings.
  """
  def place(d, s):
    if isinstance(s, jax.core.Tracer) or not isinstance(s, jax.Array):
      return d
    if isinstance(d, jax.core.Tracer):
      return d
    return jax.device_put(d, s.sharding)

  return jax.tree.map(place, deep, shallow)


# ------------------------------------------------------------ checkpoints


def grow_checkpoint(src_dir: str, out_dir: str, method: str,
                    preset: str = "paper", times: int = 1,
                    dilations: str | None = None, top: int | None = None,
                    seed: int = 0, map_opt_state: bool = False,
                    kind: str | None = None) -> Config:
  """Grows a run's checkpoint into `out_dir`; returns the grown Config.

  Reads `src_dir`'s `kind` checkpoint: by default the best (the latest if
  it never validated; the latest with `map_opt_state`, as only it holds the
  optimizer state); `kind="latest"` grows the model where training stopped,
  as progressive stacking does. The grown model is step 0 of a new run
  (`train --init-from out_dir`), with a fresh optimizer as in the paper or,
  with `map_opt_state`, the source's Adam moments grown by
  `stack_opt_state` (used by `train --init-opt-state`).
  """
  policy = resolve_policy(preset, dilations)

  def grow(params, cfg):
    return stack(params, cfg, method, preset, rng=jax.random.key(seed),
                 times=times, top=top, dilations=policy)

  def grow_opt(opt_state, cfg, _):
    return stack_opt_state(opt_state, cfg, method, preset, times=times,
                           top=top)

  return apply_to_checkpoint(
      src_dir, out_dir, grow,
      {"op": "grow", "method": method, "preset": preset, "times": times,
       "dilations": policy, "top": top, "seed": seed,
       "map_opt_state": map_opt_state},
      kind=kind, opt_fn=grow_opt if map_opt_state else None)
