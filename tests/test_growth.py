"""StackRec growth: index maps, presets, dilations, checkpoints, CLI."""
import dataclasses
import functools
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.tree_utils import tree_get

from jaxrec import cli
from jaxrec import evaluation
from jaxrec import heads
from jaxrec import models
from jaxrec.cli import grow as grow_cli
from jaxrec.config import Config, DataConfig, TrainConfig
from jaxrec.data import pipeline
from jaxrec.errors import JaxrecError
from jaxrec.models.nextitnet import NextItNetConfig
from jaxrec.methods.stackrec import growth
from jaxrec.tasks import next_item
from jaxrec.training import checkpoints, loop, optim
from jaxrec.training import checkpoint_meta
from jaxrec.training import orbax_io
from jaxrec.training import state as state_lib

RNG = jax.random.key(7)
# Jitted once per config: eagerly every op of a forward pass compiles alone.
init_params = jax.jit(models.init_params, static_argnums=0)
hidden_states = jax.jit(models.hidden_states, static_argnums=1)


def tiny_config(**kw):
  base = dict(num_items=20, embed_dim=8, num_blocks=4, kernel_size=3)
  base.update(kw)
  return Config(model=NextItNetConfig(**base))


@functools.partial(jax.jit, static_argnums=(0, 1))
def trained_like_params(cfg, seed=0):
  """Fresh params have alpha 0, LN 1/0 and zero biases: the defaults a reset
  produces anyway. Perturb every leaf so a test can tell copy from reset."""
  params = models.init_params(cfg, jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [x + 0.3 * jax.random.normal(k, x.shape)
            for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, leaves)


def abstract_params(cfg):
  """Shapes only: enough for the checks that run before any array work."""
  return jax.eval_shape(lambda: models.init_params(cfg, jax.random.key(0)))


def inputs(cfg, seed=0):
  ids = np.random.default_rng(seed).integers(0, cfg.model.num_items, (3, 16))
  return jnp.asarray(ids, jnp.int32)


@functools.partial(jax.jit, static_argnums=1)
def all_scores(params, cfg, ids):
  """The head's scores of every item at every position: [B, T, V]."""
  h = models.hidden_states(params, cfg, ids)
  flat = h.reshape(-1, h.shape[-1])
  scores = heads.get(cfg.head.name).tile_scores(params, cfg, flat, 0,
                                                cfg.model.num_items)
  return scores.reshape(h.shape[:2] + (-1,))


def assert_same_function(deep, deep_cfg, params, cfg, x):
  """Hidden states and the scores of every item agree."""
  np.testing.assert_allclose(hidden_states(deep, deep_cfg, x),
                             hidden_states(params, cfg, x),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(all_scores(deep, deep_cfg, x),
                             all_scores(params, cfg, x),
                             rtol=1e-5, atol=1e-5)


def block(params, i):
  return jax.tree.map(lambda a: a[i], params["blocks"])


def assert_trees_equal(a, b):
  chex.assert_trees_all_equal(a, b)


# ------------------------------------------------------------- index maps


@pytest.mark.parametrize("method,expected", [
    ("adjacent", (0, 0, 1, 1, 2, 2)),
    ("cross", (0, 1, 2, 0, 1, 2)),
    ("random_top", (0, 1, 2, -1, -1, -1)),
    ("embed_only", (-1,) * 6),
])
def test_index_map_follows_the_paper_formula(method, expected):
  assert growth.index_map(method, 3) == expected


@pytest.mark.parametrize("method,expected", [
    ("adjacent", (0, 1, 2, 2, 3, 3)),  # Top 2 doubled in place.
    ("cross", (0, 1, 2, 3, 2, 3)),  # Top 2 appended above the stack.
    ("random_top", (0, 1, 2, 3, -1, -1)),
])
def test_top_k_index_map_matches_official_copytop(method, expected):
  assert growth.index_map(method, 4, top=2) == expected


@pytest.mark.parametrize("method", growth.METHODS)
def test_top_equal_to_depth_is_the_full_growth(method):
  assert growth.index_map(method, 5, top=5) == growth.index_map(method, 5)


def test_gather_blocks_takes_rows_and_fills_fresh_ones():
  blocks = {"w": jnp.arange(3.0)[:, None] * jnp.ones((3, 2))}
  fresh = {"w": jnp.full((4, 2), -9.0)}
  out = growth.gather_blocks(blocks, (2, -1, 0, 2), fresh)
  np.testing.assert_array_equal(out["w"][:, 0], [2.0, -9.0, 0.0, 2.0])


# ------------------------------------------------------------------ presets


@pytest.mark.parametrize("method", ["adjacent", "cross", "random_top"])
def test_copied_blocks_land_where_the_index_map_says(method):
  cfg = tiny_config()
  params = trained_like_params(cfg)
  deep, _ = growth.stack(params, cfg, method, "full", rng=RNG)
  for i, j in enumerate(growth.index_map(method, 4)):
    if j >= 0:
      assert_trees_equal(block(deep, i), block(params, j))


def test_fresh_blocks_equal_a_fresh_init_with_the_given_rng():
  cfg = tiny_config()
  deep, deep_cfg = growth.stack(trained_like_params(cfg), cfg, "random_top",
                                "full", rng=RNG)
  fresh = init_params(deep_cfg, RNG)
  assert_trees_equal(jax.tree.map(lambda a: a[4:], deep["blocks"]),
                     jax.tree.map(lambda a: a[4:], fresh["blocks"]))


def test_paper_resets_layer_norm_to_one_and_zero():
  cfg = tiny_config()
  deep, _ = growth.stack(trained_like_params(cfg), cfg, "adjacent", "paper",
                         rng=RNG)
  for ln in ("ln1", "ln2"):
    np.testing.assert_array_equal(deep["blocks"][ln]["scale"], 1.0)
    np.testing.assert_array_equal(deep["blocks"][ln]["bias"], 0.0)


def test_paper_resets_every_alpha_to_zero():
  cfg = tiny_config()
  deep, _ = growth.stack(trained_like_params(cfg), cfg, "cross", "paper",
                         rng=RNG)
  np.testing.assert_array_equal(deep["blocks"]["alpha"], np.zeros(8))


def test_paper_reinitialises_the_softmax_from_rng():
  cfg = tiny_config()
  deep, deep_cfg = growth.stack(trained_like_params(cfg), cfg, "adjacent",
                                "paper", rng=RNG)
  assert_trees_equal(deep["head"],
                     init_params(deep_cfg, RNG)["head"])


def test_paper_copies_conv_kernels_biases_and_item_embedding():
  cfg = tiny_config()
  params = trained_like_params(cfg)
  deep, _ = growth.stack(params, cfg, "adjacent", "paper", rng=RNG)
  assert_trees_equal(deep["item_embedding"], params["item_embedding"])
  idx = np.asarray(growth.index_map("adjacent", 4))
  for conv in ("conv1", "conv2"):
    assert_trees_equal(deep["blocks"][conv],
                       jax.tree.map(lambda a: a[idx], params["blocks"][conv]))


def test_embed_only_paper_is_a_fresh_model_with_the_old_embedding():
  cfg = tiny_config()
  params = trained_like_params(cfg)
  deep, deep_cfg = growth.stack(params, cfg, "embed_only", "paper", rng=RNG)
  expected = init_params(deep_cfg, RNG)
  expected["item_embedding"] = params["item_embedding"]
  assert_trees_equal(deep, expected)


def test_full_copies_every_leaf():
  cfg = tiny_config()
  params = trained_like_params(cfg)
  deep, _ = growth.stack(params, cfg, "cross", "full", rng=RNG)
  idx = np.asarray(growth.index_map("cross", 4))
  expected = dict(params, blocks=jax.tree.map(lambda a: a[idx],
                                              params["blocks"]))
  assert_trees_equal(deep, expected)


@pytest.mark.parametrize("method,top", [
    ("adjacent", None), ("cross", None), ("random_top", None),
    ("adjacent", 2), ("cross", 1)])
def test_preserve_keeps_the_hidden_states(method, top):
  cfg = tiny_config()
  params = trained_like_params(cfg)
  x = inputs(cfg)
  deep, deep_cfg = growth.stack(params, cfg, method, "preserve", rng=RNG,
                                top=top)
  assert_same_function(deep, deep_cfg, params, cfg, x)


def test_preserve_keeps_hidden_states_over_repeated_growth():
  cfg = tiny_config()
  params = trained_like_params(cfg)
  x = inputs(cfg)
  deep, deep_cfg = growth.stack(params, cfg, "cross", "preserve", rng=RNG,
                                times=2)
  assert deep_cfg.model.num_blocks == 16
  assert_same_function(deep, deep_cfg, params, cfg, x)


@pytest.mark.parametrize("method,top,alive", [
    ("adjacent", None, [1, 0, 1, 0, 1, 0, 1, 0]),  # Second of each pair off.
    ("cross", None, [1, 1, 1, 1, 0, 0, 0, 0]),  # Upper copy off.
    ("cross", 2, [1, 1, 1, 1, 0, 0]),  # The top-k copies off.
])
def test_preserve_switches_off_the_duplicates_gate(method, top, alive):
  cfg = tiny_config()
  params = trained_like_params(cfg)
  deep, _ = growth.stack(params, cfg, method, "preserve", rng=RNG, top=top)
  idx = np.asarray(growth.index_map(method, 4, top))
  np.testing.assert_array_equal(
      deep["blocks"]["alpha"],
      np.where(alive, np.asarray(params["blocks"]["alpha"])[idx], 0.0))


def test_preserve_defaults_to_carry_dilations():
  cfg = tiny_config(dilations=(1, 4))
  _, deep_cfg = growth.stack(trained_like_params(cfg), cfg, "adjacent",
                             "preserve", rng=RNG)
  assert deep_cfg.model.dilations == (1, 1, 4, 4, 1, 1, 4, 4)


def test_preserve_under_position_warns_when_a_live_block_moves():
  plan = growth.make_plan(Config(model=NextItNetConfig(num_blocks=4)),
                          "adjacent", "preserve", None)
  with pytest.warns(UserWarning, match="dilations='carry'"):
    growth.deep_config(tiny_config(dilations=(1, 4)), plan, "position")


def test_cross_preserve_is_exact_under_position_dilations():
  cfg = tiny_config(dilations=(1, 4))
  params = trained_like_params(cfg)
  x = inputs(cfg)
  deep, deep_cfg = growth.stack(params, cfg, "cross", "preserve", rng=RNG,
                                dilations="position")
  assert deep_cfg.model.dilations == (1, 4)
  assert_same_function(deep, deep_cfg, params, cfg, x)


# ---------------------------------------------------------------- dilations


def test_position_policy_keeps_the_dilation_cycle():
  cfg = tiny_config()
  _, deep_cfg = growth.stack(trained_like_params(cfg), cfg, "adjacent",
                             "paper", rng=RNG, dilations="position")
  assert deep_cfg.model.dilations == cfg.model.dilations == (1, 4)
  assert deep_cfg.model.block_dilations() == (1, 4) * 4


def test_carry_policy_pins_each_block_to_its_source_dilation():
  plan = growth.make_plan(Config(model=NextItNetConfig(num_blocks=4)),
                          "adjacent", "paper", None)
  deep_cfg = growth.deep_config(tiny_config(dilations=(1, 2, 4, 8)), plan,
                                "carry")
  assert deep_cfg.model.dilations == (1, 1, 2, 2, 4, 4, 8, 8)


def test_carry_gives_fresh_blocks_their_positional_dilation():
  plan = growth.make_plan(Config(model=NextItNetConfig(num_blocks=2)),
                          "random_top", "paper", None)
  deep_cfg = growth.deep_config(tiny_config(num_blocks=2, dilations=(1, 2, 4)),
                                plan, "carry")
  assert deep_cfg.model.dilations == (1, 2, 4, 1)


# ----------------------------------------------------- depth and execution


def test_repeated_stacking_reaches_128_blocks():
  cfg = tiny_config(num_blocks=4)
  params = trained_like_params(cfg)
  deep, deep_cfg = growth.stack(params, cfg, "adjacent", "full", rng=RNG,
                                times=5)
  assert deep_cfg.model.num_blocks == 128
  models.check_params(deep, deep_cfg)
  # Five adjacent doublings: deep block i comes from shallow block i // 32.
  kernels = deep["blocks"]["conv1"]["kernel"]
  np.testing.assert_array_equal(
      kernels, np.asarray(params["blocks"]["conv1"]["kernel"])[
          np.arange(128) // 32])


def test_top_k_grows_by_k_blocks_each_time():
  cfg = tiny_config()
  deep, deep_cfg = growth.stack(trained_like_params(cfg), cfg, "cross",
                                "full", rng=RNG, top=2, times=3)
  assert deep_cfg.model.num_blocks == 10
  models.check_params(deep, deep_cfg)


def test_jitted_stack_equals_eager():
  cfg = tiny_config()
  params = trained_like_params(cfg)
  fn = jax.jit(lambda p, r: growth.stack(p, cfg, "adjacent", "paper",
                                         rng=r)[0])
  eager, _ = growth.stack(params, cfg, "adjacent", "paper", rng=RNG)
  assert_trees_equal(fn(params, RNG), eager)


def test_opt_state_moments_follow_the_block_map():
  cfg = tiny_config()
  params = trained_like_params(cfg)
  opt = optax.adam(1e-3)
  state = opt.init(params)
  # Make the moments distinguishable: mu = params, nu = 2 * params.
  state = (state[0]._replace(mu=params, count=jnp.asarray(5, jnp.int32),
                             nu=jax.tree.map(lambda a: 2 * a, params)),
           ) + tuple(state[1:])
  deep_state = growth.stack_opt_state(state, cfg, "cross", "full")
  deep, _ = growth.stack(params, cfg, "cross", "full", rng=RNG)
  assert_trees_equal(deep_state[0].mu, deep)
  assert_trees_equal(deep_state[0].nu, jax.tree.map(lambda a: 2 * a, deep))
  assert int(deep_state[0].count) == 5


def test_opt_state_of_reset_and_fresh_leaves_is_zero():
  cfg = tiny_config()
  params = trained_like_params(cfg)
  state = optax.adam(1e-3).init(params)
  state = (state[0]._replace(mu=params),) + tuple(state[1:])
  mu = growth.stack_opt_state(state, cfg, "random_top", "paper")[0].mu
  np.testing.assert_array_equal(mu["head"]["kernel"], 0.0)
  np.testing.assert_array_equal(mu["blocks"]["ln1"]["scale"], 0.0)
  np.testing.assert_array_equal(mu["blocks"]["conv1"]["kernel"][4:], 0.0)
  assert_trees_equal(mu["blocks"]["conv1"]["kernel"][:4],
                     params["blocks"]["conv1"]["kernel"])


SHARDED_SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaxrec import models
    from jaxrec.config import Config
    from jaxrec.models.nextitnet import NextItNetConfig
    from jaxrec.methods.stackrec import growth
    assert jax.device_count() == 8, jax.device_count()
    cfg = Config(model=NextItNetConfig(num_items=20, embed_dim=8,
                                       num_blocks=4))
    params = jax.jit(models.init_params, static_argnums=0)(
        cfg, jax.random.key(0))
    params["blocks"]["alpha"] = params["blocks"]["alpha"] + 0.5
    one, _ = growth.stack(params, cfg, "adjacent", "paper",
                          rng=jax.random.key(1))
    replicated = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P())
    many, _ = growth.stack(jax.device_put(params, replicated), cfg,
                           "adjacent", "paper", rng=jax.random.key(1))
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)):
      np.testing.assert_array_equal(a, b)
      assert b.sharding.is_fully_replicated, b.sharding
      assert len(b.sharding.device_set) == 8, b.sharding
    print("SHARDED_OK")
""")


def test_stack_on_8_devices_equals_1_device_and_stays_replicated():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env,
                       capture_output=True, text=True, timeout=120,
                       check=False)
  assert "SHARDED_OK" in run.stdout, run.stderr[-3000:]


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="stackA"), "growth method 'stackA'"),
    (dict(preset="warm"), "growth preset 'warm'"),
    (dict(dilations="keep"), "dilation policy 'keep'"),
    (dict(top=5), "top=5: expected 1..4"),
    (dict(top=0), "top=0: expected 1..4"),
    (dict(times=0), "times=0"),
])
def test_bad_option_names_the_option(kwargs, match):
  cfg = tiny_config()
  args = dict(method="adjacent", preset="paper")
  args.update(kwargs)
  with pytest.raises(JaxrecError, match=match):
    growth.stack(abstract_params(cfg), cfg, args.pop("method"),
                 args.pop("preset"), rng=RNG, **args)


def test_params_of_another_config_are_rejected():
  params = abstract_params(tiny_config(num_blocks=3))
  with pytest.raises(JaxrecError, match="do not fit the model config"):
    growth.stack(params, tiny_config(num_blocks=4), "adjacent", rng=RNG)


def test_preserve_on_plain_residual_is_rejected():
  cfg = tiny_config(residual="plain")
  with pytest.raises(JaxrecError, match="gated residual.*nextitnet has no gate leaves"):
    growth.stack(abstract_params(cfg), cfg, "adjacent", "preserve",
                 rng=RNG)


def test_preserve_with_embed_only_is_rejected():
  cfg = tiny_config()
  with pytest.raises(JaxrecError, match="embed_only"):
    growth.stack(abstract_params(cfg), cfg, "embed_only", "preserve",
                 rng=RNG)


# -------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-block model trained for 4 steps, and its data."""
  root = tmp_path_factory.mktemp("growth")
  data_cfg = DataConfig(source="synthetic:tiny", cache_dir=str(root / "cache"),
                        max_len=12)
  data = pipeline.load_data(data_cfg)
  cfg = Config(model=NextItNetConfig(embed_dim=8, num_blocks=2),
               data=data_cfg,
               train=TrainConfig(steps=4, eval_every=2, batch_size=8,
                                 eval_batch_size=8))
  src = str(root / "shallow")
  loop.train(cfg, src, data=data, progress_bar=False)
  return cfg, data, src, root


@pytest.fixture(scope="module")
def grown(run):
  cfg, _, src, root = run
  out = str(root / "deep")
  deep_cfg = growth.grow_checkpoint(src, out, "adjacent", "paper", seed=3)
  return deep_cfg, out


def test_grown_checkpoint_holds_the_stacked_params(run, grown):
  _, _, src, _ = run
  deep_cfg, out = grown
  shallow, src_cfg, _ = evaluation.load_params(src)
  expected, _ = growth.stack(shallow, src_cfg, "adjacent", "paper",
                             rng=jax.random.key(3))
  params, cfg, meta = evaluation.load_params(out)
  assert cfg.model == deep_cfg.model and cfg.model.num_blocks == 4
  assert meta["step"] == 0
  assert_trees_equal(params, expected)


def test_grown_checkpoint_appends_a_grow_entry_to_the_lineage(run, grown):
  _, _, src, _ = run
  _, out = grown
  _, meta = checkpoints.read_meta(out, "latest")
  entry = meta["lineage"][-1]
  assert entry["op"] == "grow" and entry["dir"] == os.path.abspath(src)
  assert (entry["method"], entry["preset"], entry["times"]) == (
      "adjacent", "paper", 1)
  assert entry["dilations"] == "position" and entry["top"] is None
  assert entry["map_opt_state"] is False
  assert entry["step"] == 4


def test_grown_dir_has_its_config_json(grown):
  deep_cfg, out = grown
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model"]["num_blocks"] == deep_cfg.model.num_blocks


def test_describe_checkpoint_shows_the_grow_lineage(grown):
  _, out = grown
  text = evaluation.describe_checkpoint(out)
  assert "model: nextitnet (" in text and "num_blocks=4" in text
  assert "op=grow" in text and "method=adjacent" in text


def test_training_starts_from_the_grown_checkpoint(run, grown):
  cfg, data, _, root = run
  _, out = grown
  result = loop.train(cfg, str(root / "deep_trained"), data=data,
                       init_from=out, progress_bar=False)
  assert result["steps"] == 4
  _, meta = checkpoints.read_meta(str(root / "deep_trained"))
  assert [e["op"] for e in meta["lineage"]] == ["grow", "init_from"]
  assert meta["config"]["model"]["num_blocks"] == 4


def test_grown_state_restores_as_a_full_train_state_with_fresh_adam(grown):
  deep_cfg, out = grown
  mngr = orbax_io.open_existing(out, "latest")
  state, _ = orbax_io.restore(
      mngr, target=state_lib.abstract_state(deep_cfg, "latest"))
  assert int(state["step"]) == 0 and int(state["first_bad_step"]) == -1
  assert int(tree_get(state["opt_state"], "count")) == 0
  np.testing.assert_array_equal(
      tree_get(state["opt_state"], "mu")["blocks"]["conv1"]["kernel"], 0.0)


def test_map_opt_state_grows_the_saved_adam_moments(run, tmp_path):
  _, _, src, _ = run
  src_cfg = checkpoint_meta.config_from_meta(
      checkpoints.read_meta(src, "latest")[1], src)
  src_state, _ = orbax_io.restore(
      orbax_io.open_existing(src, "latest"),
      target=state_lib.abstract_state(src_cfg, "latest"))
  out = str(tmp_path / "mapped")
  deep_cfg = growth.grow_checkpoint(src, out, "cross", "full",
                                    map_opt_state=True)
  state, _ = orbax_io.restore(
      orbax_io.open_existing(out, "latest"),
      target=state_lib.abstract_state(deep_cfg, "latest"))
  expected = growth.stack_opt_state(src_state["opt_state"], src_cfg,
                                    "cross", "full")
  assert_trees_equal(state["opt_state"], expected)
  # Adam's bias correction goes on.
  assert int(tree_get(state["opt_state"], "count")) == 4


def test_grow_refuses_an_out_dir_holding_a_run(run, grown):
  _, _, src, _ = run
  _, out = grown
  with pytest.raises(JaxrecError, match="already holds files"):
    growth.grow_checkpoint(src, out, "cross")


def test_grow_rejects_a_checkpoint_of_another_model(tmp_path):
  mngr = orbax_io.manager(str(tmp_path / "other"), "latest")
  orbax_io.save(mngr, 1, {"params": {"w": jnp.zeros(3)}},
                {"format": "someone.else/2"})
  mngr.wait_until_finished()
  with pytest.raises(JaxrecError, match="checkpoint format 'someone.else/2'"):
    growth.grow_checkpoint(str(tmp_path / "other"), str(tmp_path / "out"),
                           "adjacent")


def test_grow_rejects_params_that_do_not_fit_their_config(run, tmp_path):
  cfg = run[0]
  model = dataclasses.replace(cfg.model, num_items=20)
  wrong = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                       abstract_params(cfg.replace(model=dataclasses.replace(
                           model, num_blocks=3))))
  mngr = orbax_io.manager(str(tmp_path / "bad"), "latest")
  orbax_io.save(mngr, 1, {"params": wrong},
                checkpoint_meta.make_meta(cfg.replace(model=model), "x", 1,
                                          []))
  mngr.wait_until_finished()
  with pytest.raises(JaxrecError, match="bad/checkpoints/latest/1"):
    growth.grow_checkpoint(str(tmp_path / "bad"), str(tmp_path / "out"),
                           "adjacent")


def test_grow_of_a_missing_dir_names_it(tmp_path):
  with pytest.raises(JaxrecError, match="no jaxrec checkpoints"):
    growth.grow_checkpoint(str(tmp_path / "nope"), str(tmp_path / "out"),
                           "adjacent")


def test_cli_grow_prints_source_and_deep_depth(run, tmp_path, capsys):
  _, _, src, _ = run
  parser = cli.Parser(prog="jaxrec")
  grow_cli.add_parser(parser.add_subparsers(dest="command",
                                            parser_class=cli.Parser))
  out = str(tmp_path / "cli_deep")
  args = parser.parse_args(["grow", "--from", src, "--out", out, "--method",
                            "cross", "--preset", "preserve", "--times", "2"])
  grow_cli.run(args)
  printed = capsys.readouterr().out
  assert "2 -> 8 blocks" in printed
  assert checkpoints.read_meta(out, "latest")[1]["lineage"][-1]["times"] == 2


def test_cli_grow_rejects_an_unknown_method():
  parser = cli.Parser(prog="jaxrec")
  grow_cli.add_parser(parser.add_subparsers(dest="command",
                                            parser_class=cli.Parser))
  with pytest.raises(JaxrecError, match="--method"):
    parser.parse_args(["grow", "--from", "a", "--out", "b", "--method", "x"])


def test_grow_checkpoint_can_grow_the_latest_instead_of_the_best(tmp_path,
                                                                 run):
  _, _, src, _ = run
  out = str(tmp_path / "grown_latest")
  growth.grow_checkpoint(src, out, "adjacent", "paper", kind="latest")
  _, meta = checkpoints.read_meta(out, "latest")
  assert meta["lineage"][-1]["kind"] == "latest"
  assert meta["lineage"][-1]["step"] == 4


def test_map_opt_state_from_the_best_checkpoint_is_refused(tmp_path, run):
  _, _, src, _ = run
  with pytest.raises(JaxrecError, match="--source latest"):
    growth.grow_checkpoint(src, str(tmp_path / "g"), "adjacent", "paper",
                           map_opt_state=True, kind="best")


def first_step_by_hand(cfg, data, params, opt_state=None):
  """optax's first update of a run, outside the loop: the task loss's
  gradient on batch 0 with the step-0 rng, then the run's optimizer from
  `opt_state` (default: a fresh one)."""
  opt = optim.make_optimizer(cfg.train,
                             optim.trainable_labels(params, cfg.train.freeze))
  if opt_state is None:
    opt_state = opt.init(params)
  batch = jax.tree.map(jnp.asarray, next_item.batch(
      data, 0, cfg.train.batch_size, cfg.train.seed))
  rng = jax.random.fold_in(jax.random.key(cfg.train.seed), 0)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(next_item.loss)(params, cfg, batch, rng)
    updates, _ = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates)

  return step(params, opt_state)


def test_init_opt_state_starts_from_the_mapped_adam_moments(tmp_path, run):
  cfg, data, src, _ = run
  grown = str(tmp_path / "mapped")
  deep_cfg = growth.grow_checkpoint(src, grown, "adjacent", "preserve",
                                    map_opt_state=True)
  one_step = cfg.replace(train=dataclasses.replace(cfg.train, steps=1,
                                                   eval_every=1))
  outs = {}
  for flag in (False, True):
    out = str(tmp_path / f"ft_{flag}")
    loop.train(one_step, out, data, init_from=grown, init_opt_state=flag,
                progress_bar=False)
    outs[flag] = evaluation.load_params(out, "latest")
  params_fresh, params_mapped = outs[False][0], outs[True][0]
  assert outs[True][2]["lineage"][-1]["opt_state"] is True
  diffs = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
      params_fresh, params_mapped))
  assert any(diffs)  # Adam's first step differs with non-zero moments.
  # Each run's first step is optax's, from the grown checkpoint's moments
  # (--init-opt-state) or from fresh ones.
  saved, _ = orbax_io.restore(
      orbax_io.open_existing(grown, "latest"),
      target=state_lib.abstract_state(deep_cfg, "latest"))
  run_cfg = outs[True][1]
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, params_mapped, first_step_by_hand(
      run_cfg, data, saved["params"], saved["opt_state"]))
  jax.tree.map(close, params_fresh,
               first_step_by_hand(run_cfg, data, saved["params"]))


def test_init_opt_state_refuses_another_optimizer(tmp_path, run):
  cfg, data, src, _ = run
  grown = str(tmp_path / "mapped2")
  growth.grow_checkpoint(src, grown, "cross", "paper", map_opt_state=True)
  clipped = cfg.replace(train=dataclasses.replace(cfg.train, clip_norm=1.0))
  with pytest.raises(JaxrecError, match="init-opt-state"):
    loop.train(clipped, str(tmp_path / "ft"), data, init_from=grown,
                init_opt_state=True, progress_bar=False)
