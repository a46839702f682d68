"""The data x model mesh: parsing, the sharding rules, and equivalence.

On 8 fake CPU devices (a subprocess, so the flag takes effect before jax
starts), meshes data=8, data=4,model=2 and data=2,model=4 must give one
device's losses, updated params and ranking metrics, with the item tables
and their Adam moments really split by rows.
"""
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrec import config, models, sharding
from jaxrec.errors import JaxrecError
from jaxrec.heads.tree_softmax import TreeSoftmaxConfig
from jaxrec.models.nextitnet import NextItNetConfig
from jaxrec.training import state as state_lib
from jaxrec.training.mesh import parse_mesh

from test_cli import TINY, run_error
from test_train import run_python


@pytest.mark.parametrize("spec,want", [
    ("", (8, 1)), ("data=8", (8, 1)), ("model=2", (4, 2)),
    ("data=2,model=4", (2, 4)), (" model = 8 ", (1, 8))])
def test_parse_mesh(spec, want):
  assert parse_mesh(spec, 8) == want


@pytest.mark.parametrize("spec,message", [
    ("data=4,model=4", "data x model must equal the 8 devices"),
    ("data=3", "data x model must equal the 8 devices"),
    ("data=8,expert=1", "'expert=1' is not AXIS=SIZE"),
    ("model", "'model' is not AXIS=SIZE"),
    ("model=two", "model size 'two' is not an integer"),
    ("model=0", "model size '0' is not an integer >= 1"),
    ("model=2,model=4", "axis 'model' given twice")])
def test_bad_mesh_is_one_line_naming_the_option(spec, message):
  with pytest.raises(JaxrecError, match=message) as e:
    parse_mesh(spec, 8)
  assert str(e.value).startswith(f"--mesh={spec}:")
  assert "\n" not in str(e.value)


def _abstract_state(cfg):
  params = models.abstract_params(cfg)
  opt = state_lib.optimizer_for(cfg, params)[0]
  return jax.eval_shape(lambda p: state_lib.init_state(p, opt), params)


def _named_specs(tree, model):
  specs = sharding.specs(tree, model)
  return {sharding.path_name(p): s for p, s in
          jax.tree_util.tree_leaves_with_path(
              specs, is_leaf=lambda x: isinstance(x, P))}


def test_rules_split_tables_and_their_adam_moments_by_rows():
  cfg = config.Config(model=NextItNetConfig(num_items=64, num_blocks=2,
                                            embed_dim=8))
  specs = _named_specs(_abstract_state(cfg), 2)
  rows, cols = P("model", None), P("model")
  for name in ("params/item_embedding/embedding", "params/head/kernel"):
    assert specs[name] == rows, name
  assert specs["params/head/bias"] == cols
  moments = {n: s for n, s in specs.items() if n.startswith("opt_state")
             and n.endswith(("item_embedding/embedding", "head/kernel"))}
  assert len(moments) >= 4, moments  # Adam's mu and nu of both tables.
  assert all(s == rows for s in moments.values()), moments
  blocks = [s for n, s in specs.items() if "/blocks/" in n]
  assert blocks and all(s == P() for s in blocks)
  # One model shard: nothing is split.
  assert set(_named_specs(_abstract_state(cfg), 1).values()) == {P()}


def test_tree_softmax_and_adaptive_tables_are_split_too():
  cfg = config.Config(
      model=NextItNetConfig(num_items=66, num_blocks=1, embed_dim=8,
                            embedding="adaptive", num_bands=3,
                            band_cutoffs=(18, 34)),
      head=TreeSoftmaxConfig())
  specs = _named_specs({"params": models.abstract_params(cfg)}, 2)
  assert specs["params/item_embedding/band_0/embedding"] == P("model", None)
  assert specs["params/item_embedding/band_1/embedding"] == P("model", None)
  assert specs["params/item_embedding/band_1/projection"] == P()
  assert specs["params/head/band_2/kernel"] == P("model", None)
  assert specs["params/head/band_2/bias"] == P("model")
  assert specs["params/head/band_1/projection"] == P()
  assert specs["params/head/head_kernel"] == P("model", None)
  # Band tables follow the bands' sizes: one that model=4 cannot split (18
  # rows) stays replicated instead of refusing CpRec on that mesh.
  specs = _named_specs({"params": models.abstract_params(cfg)}, 4)
  assert specs["params/item_embedding/band_0/embedding"] == P()
  assert specs["params/item_embedding/band_2/embedding"] == P("model", None)
  assert specs["params/head/head_kernel"] == P("model", None)  # 20 rows.


def test_rows_that_do_not_split_are_refused_naming_the_option():
  cfg = config.Config(model=NextItNetConfig(num_items=65, num_blocks=1,
                                            embed_dim=8))
  with pytest.raises(JaxrecError, match=r"^--mesh: params/(item_embedding/"
                     r"embedding|head/kernel|head/bias) has 65 rows, not a "
                     r"multiple of model=2; pick"):
    sharding.specs(_abstract_state(cfg), 2)


EQUIVALENCE = """
import json, sys, jax, numpy as np
from jaxrec import config, models, sharding
from jaxrec.errors import JaxrecError
from jaxrec.models.nextitnet import NextItNetConfig
from jaxrec.data import pipeline, sequences
from jaxrec.tasks import next_item
from jaxrec.training import loop, state as state_lib
from jaxrec.training.mesh import Sharder, make_mesh

def run(loss, smoothing, meshes, evaluate, tree=False):
  model = NextItNetConfig(num_blocks=1, embed_dim=8)
  head = config.Config().head
  if tree:  # CpRec: adaptive embedding, tree softmax over 3 bands.
    from jaxrec.heads.tree_softmax import TreeSoftmaxConfig
    model = NextItNetConfig(num_blocks=1, embed_dim=8, num_bands=3,
                            band_cutoffs=(16, 32), embedding="adaptive")
    head = TreeSoftmaxConfig()
  cfg = config.Config(
      model=model, head=head,
      data=config.DataConfig(source="synthetic:tiny,items=63", max_len=12),
      train=config.TrainConfig(batch_size=16, eval_batch_size=16,
                               loss_chunk=5, loss=loss, num_samples=7,
                               label_smoothing=smoothing, mask_history=True))
  data = pipeline.load_data(cfg.data)
  cfg = cfg.fit_data(data.num_items, data.max_len, data.item_counts)
  params = models.init_params(cfg, jax.random.key(0))
  opt, labels = state_lib.optimizer_for(cfg, params)
  sampler = next_item.sampler_for(cfg, data)
  out = {{}}
  for spec in meshes:
    sharder = Sharder(make_mesh(jax.devices()[:1] if spec == "one" else None,
                                "" if spec == "one" else spec))
    state = state_lib.init_state(params, opt)
    shardings = sharder.shardings(state)
    step = sharder.jit(loop.make_train_step(cfg, opt, labels, sampler),
                       in_shardings=(shardings, sharder.batch),
                       out_shardings=(shardings, sharder.replicated))
    state = jax.device_put(state, shardings)
    losses = []
    for s in range(2):
      batch = sharder.put_batch(sequences.train_batch(data.train, s, 16, 0))
      state, o = step(state, batch)
      losses.append(float(o["loss"]))
    p = state["params"]
    if tree:
      kernel = p["head"]["band_2"]["kernel"]
      out[spec] = {{"losses": losses, "kernel": np.asarray(kernel).tolist(),
                   "kernel_shard": list(kernel.addressable_shards[0]
                                        .data.shape)}}
      continue
    emb = p["item_embedding"]["embedding"]
    mu = [leaf for path, leaf in
          jax.tree_util.tree_leaves_with_path(state["opt_state"])
          if sharding.path_name(path).endswith("mu/head/kernel")][0]
    row = {{"losses": losses,
           "emb": np.asarray(emb).tolist(),
           "kernel": np.asarray(p["head"]["kernel"]).tolist(),
           "emb_spec": list(emb.sharding.spec),
           "emb_shard": list(emb.addressable_shards[0].data.shape),
           "mu_spec": list(mu.sharding.spec),
           "mu_shard": list(mu.addressable_shards[0].data.shape),
           "bias_shard": list(p["head"]["bias"].addressable_shards[0]
                              .data.shape)}}
    if evaluate:
      row["metrics"] = loop.evaluate_params(
          p, cfg, sharder, data.valid_inputs[:48], data.valid_targets[:48])
    out[spec] = row
  return out

result = {{"full": run("full", 0.1, ["one", "data=8", "data=4,model=2",
                                     "data=2,model=4"], True),
          "sampled": run("sampled", 0.0, ["one", "data=2,model=4"], False),
          "tree": run("full", 0.0, ["one", "data=2,model=4"], False, True)}}
try:
  Sharder(make_mesh(None, "data=4,model=2")).check_batch(6, "train.batch_size")
except JaxrecError as e:
  result["batch_error"] = str(e)
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def equivalence():
  proc = run_python(EQUIVALENCE.format(),
                    {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                     "JAX_PLATFORMS": "cpu"})
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh", ["data=8", "data=4,model=2",
                                  "data=2,model=4"])
def test_meshes_give_one_devices_losses_params_and_metrics(equivalence, mesh):
  ref, got = equivalence["full"]["one"], equivalence["full"][mesh]
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
  # Two Adam steps: equal gradients give equal updated tables.
  np.testing.assert_allclose(got["emb"], ref["emb"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got["kernel"], ref["kernel"], rtol=1e-4,
                             atol=1e-6)
  for name, value in ref["metrics"].items():
    assert got["metrics"][name] == pytest.approx(value, abs=1e-6), name
  assert ref["metrics"]["count"] == 48


@pytest.mark.parametrize("mesh,model", [("data=8", 1), ("data=4,model=2", 2),
                                        ("data=2,model=4", 4)])
def test_tables_and_moments_are_really_split_by_rows(equivalence, mesh,
                                                     model):
  got = equivalence["full"][mesh]
  want = [] if model == 1 else ["model", None]
  assert got["emb_spec"] == want and got["mu_spec"] == want
  assert got["emb_shard"] == [64 // model, 8]
  assert got["mu_shard"] == [64 // model, 8]
  assert got["bias_shard"] == [64 // model]


def test_sampled_softmax_is_correct_under_model_sharding(equivalence):
  ref, got = equivalence["sampled"]["one"], equivalence["sampled"][
      "data=2,model=4"]
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
  np.testing.assert_allclose(got["kernel"], ref["kernel"], rtol=1e-4,
                             atol=1e-6)
  assert got["emb_shard"] == [16, 8]


def test_batch_that_the_data_axis_cannot_split_names_the_mesh(equivalence):
  assert equivalence["batch_error"] == (
      "train.batch_size=6: must be a multiple of the 4 devices on --mesh's "
      "data axis")


def test_tree_softmax_is_correct_under_model_sharding(equivalence):
  ref, got = equivalence["tree"]["one"], equivalence["tree"]["data=2,model=4"]
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
  np.testing.assert_allclose(got["kernel"], ref["kernel"], rtol=1e-4,
                             atol=1e-6)
  assert got["kernel_shard"] == [32 // 4, 1]  # The 32-row tail band, split.


def test_train_with_a_mesh_the_devices_cannot_form_is_one_line(tmp_path,
                                                               capsys):
  line = run_error(capsys, ["train", "--out", str(tmp_path / "run"),
                            "--mesh", "data=2,model=2"] + TINY)
  assert line == (f"jaxrec: error: --mesh=data=2,model=2: data x model must "
                  f"equal the {jax.device_count()} devices")
  # Refused before the run directory was written: the retry starts afresh.
  assert not (tmp_path / "run" / "config.json").exists()
