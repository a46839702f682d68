"""Checkpoint formats: the current one names its backbone; jaxrec 0.1's
NextItNet checkpoints load through the converter or are refused in one line."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import pytest

from jaxrec import cli, evaluation, models
from jaxrec.config import Config, DataConfig, TrainConfig
from jaxrec.data import pipeline
from jaxrec.errors import JaxrecError
from jaxrec.models.nextitnet import NextItNetConfig
from jaxrec.training import checkpoints, loop
from jaxrec.training import orbax_io

DATA = DataConfig(source="synthetic:tiny", max_len=12)
TRAIN = TrainConfig(steps=2, eval_every=2, batch_size=8, eval_batch_size=8)


def v1_config(num_items):
  """A config as jaxrec 0.1 wrote it: no model name, tie_embeddings in
  the model section, no head section."""
  return {"version": 1,
          "model": {"num_items": num_items, "embed_dim": 8, "num_blocks": 2,
                    "kernel_size": 3, "dilations": [1, 4],
                    "residual": "alpha", "tie_embeddings": False,
                    "dtype": "float32", "layer_norm_eps": 1e-8},
          "data": {"source": DATA.source, "max_len": DATA.max_len},
          "train": {"steps": 2, "eval_every": 2, "batch_size": 8,
                    "eval_batch_size": 8}}


def write_v1_run(run_dir, num_items, fingerprint):
  """A best checkpoint in the jaxrec.nextitnet/1 layout (output layer under
  `softmax`), written with Orbax as jaxrec 0.1 did."""
  cfg = Config(model=NextItNetConfig(num_items=num_items, embed_dim=8,
                                     num_blocks=2))
  params = models.init_params(cfg, jax.random.key(4))
  params = jax.tree.map(lambda a: a + 0.25, params)
  old = {k: v for k, v in params.items() if k != "head"}
  old["softmax"] = params["head"]
  meta = {"format": "jaxrec.nextitnet/1", "config": v1_config(num_items),
          "step": 2, "data_fingerprint": fingerprint, "lineage": [],
          "progress": {"best_metric": 0.1, "best_step": 2,
                       "evals_since_best": 0, "train_time_s": 1.0,
                       "best_valid": None}}
  for kind, state in (("best", {"params": old}),
                      ("latest", {"params": old, "step": jnp.asarray(2)})):
    mngr = orbax_io.manager(str(run_dir), kind)
    orbax_io.save(mngr, 2, state, meta)
    mngr.wait_until_finished()
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump(v1_config(num_items), f)
  return params


@pytest.fixture(scope="module")
def data():
  return pipeline.load_data(DATA)


@pytest.fixture()
def v1_run(tmp_path, data):
  run = tmp_path / "v1"
  params = write_v1_run(run, data.num_items, data.fingerprint)
  return str(run), params


def test_current_checkpoints_name_backbone_head_and_format(tmp_path, data):
  cfg = Config(model=NextItNetConfig(embed_dim=8, num_blocks=2), data=DATA,
               train=TRAIN)
  loop.train(cfg, str(tmp_path), data, progress_bar=False)
  _, meta = checkpoints.read_meta(str(tmp_path))
  assert meta["format"] == "jaxrec/2"
  assert (meta["backbone"], meta["head"]) == ("nextitnet", "softmax")
  assert meta["config"]["model"]["name"] == "nextitnet"


def test_a_version_1_checkpoint_loads_through_the_converter(v1_run):
  run, expected = v1_run
  params, cfg, _ = evaluation.load_params(run)
  assert cfg.model.name == "nextitnet" and cfg.head.tie_embeddings is False
  assert "softmax" not in params
  chex.assert_trees_all_equal(params, expected)


def test_a_version_1_checkpoint_can_start_a_new_run(v1_run, tmp_path, data):
  run, expected = v1_run
  cfg = Config(data=DATA, train=TrainConfig(steps=1, eval_every=1,
                                            batch_size=8, eval_batch_size=8))
  loop.train(cfg, str(tmp_path / "new"), data, init_from=run,
             progress_bar=False)
  _, meta = checkpoints.read_meta(str(tmp_path / "new"))
  assert meta["format"] == "jaxrec/2"
  assert meta["lineage"][-1]["op"] == "init_from"


def test_resuming_a_version_1_run_is_refused_in_one_line(v1_run, data):
  run, _ = v1_run
  cfg = Config(model=NextItNetConfig(embed_dim=8, num_blocks=2), data=DATA,
               train=TRAIN)
  with pytest.raises(JaxrecError) as e:
    loop.train(cfg, run, data, resume=True, progress_bar=False)
  message = str(e.value)
  assert "'jaxrec.nextitnet/1'" in message and "'jaxrec/2'" in message
  assert "--init-from" in message and "\n" not in message


def test_inspect_of_a_version_1_checkpoint_shows_the_converted_tree(
    v1_run, capsys):
  run, _ = v1_run
  assert cli.main(["inspect", run]) == 0
  out = capsys.readouterr().out
  assert "head/kernel" in out and "softmax/" not in out
  assert "format jaxrec.nextitnet/1, converted" in out


def test_an_unknown_format_names_the_one_found_and_the_ones_read(tmp_path,
                                                                capsys):
  mngr = orbax_io.manager(str(tmp_path), "best")
  orbax_io.save(mngr, 1, {"params": {"w": jnp.zeros(3)}},
                {"format": "jaxrec/9", "config": {}})
  mngr.wait_until_finished()
  assert cli.main(["inspect", str(tmp_path)]) == 2
  line = capsys.readouterr().err.strip()
  assert line.count("\n") == 0
  assert "checkpoint format 'jaxrec/9'" in line
  assert "'jaxrec/2'" in line and "'jaxrec.nextitnet/1'" in line


def test_a_manager_keeps_its_newest_steps_by_orbax_preservation_policy(
    tmp_path):
  import warnings
  from orbax.checkpoint.checkpoint_managers import preservation_policy
  with warnings.catch_warnings():
    warnings.simplefilter("error", DeprecationWarning)
    mngr = orbax_io.manager(str(tmp_path), "latest", keep=2)
  assert mngr._options.max_to_keep is None  # pylint: disable=protected-access
  assert isinstance(mngr._options.preservation_policy,  # pylint: disable=protected-access
                    preservation_policy.LatestN)
  for step in (3, 6, 9):
    orbax_io.save(mngr, step, {"w": jnp.zeros(2)}, {"step": step})
    orbax_io.wait(mngr, step, None)
  assert sorted(mngr.all_steps()) == [6, 9]
  mngr.close()
