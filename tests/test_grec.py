"""GRec: the gap-filling objective, the encoder-decoder around it, and its
encoder taken out as a masked NextItNet for PeterRec. The contract (growth of both stacks, gates, checkpoints, freezing) is
tests/test_contract.py's."""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_helpers import run_error
from jaxrec import cli, models, tasks
from jaxrec.config import Config, DataConfig, TrainConfig
from jaxrec.data import transfer
from jaxrec.models import grec, nextitnet
from jaxrec.surgery import parts
from jaxrec.tasks import gap_filling, masked_item
from jaxrec.training import checkpoints, loop
from jaxrec.training import state as state_lib

V = 20


def model(**kw):
  options = dict(num_items=V, embed_dim=8, num_blocks=2, dropout=0.0,
                 residual="plain")
  options.update(kw)
  cfg = Config(model=grec.GRecConfig(**options))
  return cfg, models.init_params(cfg, jax.random.key(0))


def test_gaps_hide_each_chosen_target_from_the_encoder():
  rng = np.random.default_rng(0)
  inputs = np.array([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
  targets = np.array([[0, 3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7]])
  encoder_ids, kept = gap_filling.gap_rows(inputs, targets, rng, V)
  for row in range(2):
    chosen = np.flatnonzero(kept[row])
    assert len(chosen) == round(0.5 * np.count_nonzero(targets[row]))
    for t in chosen:
      assert kept[row, t] == targets[row, t]
      if t + 1 < inputs.shape[1]:
        assert encoder_ids[row, t + 1] == V  # The answer is a MASK.
    unchosen = [t for t in range(1, 6) if t - 1 not in chosen]
    np.testing.assert_array_equal(encoder_ids[row, unchosen],
                                  inputs[row, unchosen])
  assert not kept[0, 0]  # Padding targets are never chosen.


def test_a_gap_makes_the_output_blind_to_the_hidden_item():
  cfg, params = model()
  ids = jnp.array([[3, 7, 1, 9, 4, 2]], jnp.int32)
  changed = ids.at[0, 3].set(11)  # x_3, the target of position 2.
  gapped = ids.at[0, 3].set(V)
  h = lambda x, g: models.forward(  # pylint: disable=unnecessary-lambda-assignment
      params, cfg, x, extra={"encoder_ids": g})[0]
  np.testing.assert_allclose(h(ids, gapped)[0, 2], h(changed, gapped)[0, 2],
                             rtol=1e-6)
  # Without the gap the encoder reads x_3 from both sides.
  assert not np.allclose(h(ids, ids)[0, 2], h(changed, changed)[0, 2])


def test_the_encoder_is_nextitnet_s_bidirectional_block():
  cfg, params = model()
  encoder = cfg.model.stack(False)
  assert isinstance(encoder, nextitnet.NextItNetConfig) and not encoder.causal
  reference = nextitnet.init(encoder, jax.random.key(1))["blocks"]
  assert (jax.tree.structure(params["encoder_blocks"])
          == jax.tree.structure(reference))


def test_trains_by_gap_filling_and_the_batch_feeds_the_encoder():
  cfg, params = model()
  assert tasks.for_config(cfg) is gap_filling
  assert "causal" not in cfg.model.capabilities()
  rows = np.array([[0, 3, 7, 1, 9, 4, 2]] * 2, np.int32)
  data = type("Data", (), {"train": rows, "num_items": V})()
  batch = gap_filling.batch(data, 0, 2, seed=0)
  assert set(batch) == {"inputs", "encoder_ids", "targets"}
  arrays = {k: jnp.asarray(v) for k, v in batch.items()}
  with_gaps = gap_filling.loss(params, cfg, arrays, jax.random.key(0))
  without = gap_filling.loss(params, cfg, dict(
      arrays, encoder_ids=arrays["inputs"]), jax.random.key(0))
  assert np.isfinite(with_gaps) and with_gaps != without


def test_a_left_padded_history_reads_as_the_history_alone():
  cfg, params = model(residual="alpha")
  params = {**params, **{stack: {**params[stack], "alpha": jnp.full_like(
      params[stack]["alpha"], 0.7)} for stack in ("encoder_blocks", "blocks")}}
  run = jax.jit(lambda x: models.hidden_states(params, cfg, x))
  row = jnp.array([[3, 7, 1, 9, 4]], jnp.int32)
  padded = jnp.array([[0, 0, 0, 3, 7, 1, 9, 4]], jnp.int32)
  np.testing.assert_allclose(run(padded)[:, 3:], run(row), rtol=1e-5,
                             atol=1e-6)


# ----------------------------------------- the encoder as a model of its own


@pytest.fixture(scope="module")
def grec_run(tmp_path_factory):
  """A GRec pretrained on a tiny two-domain world's source, and the world."""
  root = tmp_path_factory.mktemp("grec_parts")
  paths = transfer.synthetic_world(str(root / "world"),
                                   transfer.WORLD_SIZES["tiny"])
  cfg = Config(
      model=grec.GRecConfig(embed_dim=8, num_blocks=2, dropout=0.0),
      data=DataConfig(source="csv:" + paths["source"], max_len=12,
                      min_item_count=2),
      train=TrainConfig(steps=8, eval_every=4, batch_size=16))
  loop.train(cfg, str(root / "grec"), progress_bar=False)
  return root, paths


def test_the_extracted_encoder_is_a_masked_nextitnet_computing_grec_s_encoder(
    grec_run):
  root, _ = grec_run
  out = str(root / "encoder")
  assert cli.main(["extract", "--from", str(root / "grec"), "--part",
                   "encoder", "--out", out]) == 0
  whole, whole_cfg, _ = state_lib.load_params(str(root / "grec"), "best")
  part, part_cfg, _ = state_lib.load_params(out)
  assert part_cfg.model.name == "nextitnet" and not part_cfg.model.causal
  assert tasks.for_config(part_cfg) is masked_item
  chex.assert_trees_all_equal(part["blocks"], whole["encoder_blocks"])
  ids = jnp.array([[0, 0, 5, 9, 2, whole_cfg.model.token_id("mask"), 4]])
  # GRec's encoder states, the ones its decoder adds to its input.
  enc_params, enc_cfg = grec.encoder(whole, whole_cfg.model)
  np.testing.assert_allclose(
      models.hidden_states(part, part_cfg, ids),
      nextitnet.apply(enc_params, enc_cfg, ids), rtol=1e-6)
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["model"]["name"] == "nextitnet"
  lineage = checkpoints.read_meta(out)[1]["lineage"]
  assert lineage[-1]["op"] == "extract" and lineage[-1]["part"] == "encoder"


def test_peterrec_fine_tunes_grec_s_encoder_and_leaves_it_frozen(grec_run):
  root, paths = grec_run
  encoder_dir = str(root / "encoder_for_peter")
  parts.extract_checkpoint(str(root / "grec"), encoder_dir, "encoder")
  out = str(root / "peter")
  assert cli.main(["finetune", "--from", encoder_dir, "--task", "profile",
                   "--data", paths["profile"], "--out", out, "--steps", "6",
                   "--eval-every", "3", "--batch-size", "16", "--quiet"]) == 0
  whole, _, _ = state_lib.load_params(str(root / "grec"), "best")
  tuned, _, _ = state_lib.load_params(out)
  for name in ("conv1", "conv2", "ln1"):
    chex.assert_trees_all_equal(tuned["blocks"][name],
                                whole["encoder_blocks"][name])
  assert "peterrec" in tuned  # The patches trained, inside the frozen encoder.


def test_extract_refuses_a_part_the_backbone_lacks_in_one_line(
    grec_run, trained_run, capsys, tmp_path):
  root, _ = grec_run
  line = run_error(capsys, ["extract", "--from", root / "grec", "--part",
                            "decoder", "--out", tmp_path / "d"])
  assert "--part='decoder'" in line and "['encoder']" in line
  line = run_error(capsys, ["extract", "--from", trained_run, "--part",
                            "encoder", "--out", tmp_path / "e"])
  assert "has no parts" in line
  assert not os.path.exists(tmp_path / "d")
  assert not os.path.exists(tmp_path / "e")
