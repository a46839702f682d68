"""GRec: the gap-filling objective and the encoder-decoder around it. The
contract (growth of both stacks, gates, checkpoints, freezing) is
tests/test_contract.py's."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxrec import models, tasks
from jaxrec.config import Config
from jaxrec.models import grec, nextitnet
from jaxrec.tasks import gap_filling

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
