"""A config that cannot fit is refused before anything is allocated, and
the estimate that refuses it is a lower bound of what a train step uses."""
import os

import jax
import pytest

from jaxrec import config, models
from jaxrec.data import pipeline
from jaxrec.errors import JaxrecError
from jaxrec.models.nextitnet import NextItNetConfig
from jaxrec.models.sasrec import SASRecConfig
from jaxrec.tasks import next_item
from jaxrec.training import budget, loop
from jaxrec.training import state as state_lib

from cli_helpers import TINY, run_error


def fitted(model, **train):
  cfg = config.Config(
      model=model, data=config.DataConfig(source="synthetic:tiny",
                                          max_len=40),
      train=config.TrainConfig(**{"batch_size": 64, **train}))
  data = pipeline.load_data(cfg.data)
  return cfg.fit_data(data.num_items, data.max_len, data.item_counts), data


@pytest.mark.parametrize("model", [
    NextItNetConfig(num_blocks=8, embed_dim=64),
    SASRecConfig(num_blocks=4, embed_dim=64, num_positions=40),
], ids=["nextitnet", "sasrec"])
def test_the_estimate_is_at_most_what_the_compiled_train_step_uses(model):
  cfg, data = fitted(model)
  params = models.init_params(cfg, jax.random.key(0))
  opt, labels = state_lib.optimizer_for(cfg, params)
  state = state_lib.init_state(params, opt)
  step = loop.make_train_step(cfg, opt, labels,
                              next_item.sampler_for(cfg, data))
  batch = next_item.batch(data, 0, cfg.train.batch_size, 0)
  used = jax.jit(step).lower(state, batch).compile().memory_analysis()
  estimate = budget.training_estimate(cfg, params)
  # Params and Adam's state go in and come out; activations and logits
  # live in the step's temporaries.
  assert (estimate.params + estimate.optimizer
          <= used.argument_size_in_bytes + used.output_size_in_bytes)
  assert estimate.activations + estimate.logits <= used.temp_size_in_bytes
  assert estimate.activations > 0 and estimate.logits > 0


def test_a_split_table_counts_only_this_devices_rows():
  cfg, _ = fitted(NextItNetConfig(num_blocks=2, embed_dim=32))
  params = models.abstract_params(cfg)
  whole = budget.training_estimate(cfg, params)
  split = budget.training_estimate(cfg, params, data_size=2, model_size=2)
  assert split.params < whole.params
  assert split.activations * 2 == whole.activations


def test_frozen_params_need_no_optimizer_state():
  cfg, _ = fitted(NextItNetConfig(num_blocks=2, embed_dim=32))
  params = models.abstract_params(cfg)
  frozen = cfg.replace(train=config.TrainConfig(
      batch_size=64, freeze=("blocks/.*",)))
  assert (budget.training_estimate(frozen, params).optimizer
          < budget.training_estimate(cfg, params).optimizer)


def test_check_fits_names_the_estimate_and_the_limit():
  cfg, _ = fitted(NextItNetConfig(num_blocks=2, embed_dim=32))
  params = models.abstract_params(cfg)
  need = budget.training_estimate(cfg, params).total
  budget.check_fits(cfg, params, limit=(need, "a small device's memory"))
  with pytest.raises(JaxrecError, match=r"needs at least .* more than a "
                     r"small device's memory"):
    budget.check_fits(cfg, params, limit=(need - 1,
                                          "a small device's memory"))


def test_a_model_beyond_memory_is_refused_before_the_run_is_written(
    tmp_path, capsys):
  # About 6 TiB of conv kernels: it used to allocate until killed.
  out = tmp_path / "run"
  line = run_error(capsys, ["train", "--out", out] + TINY
                   + ["--embed-dim", "65536", "--num-blocks", "64"])
  assert "model.embed_dim=65536" in line and "GiB" in line
  assert "this machine's memory" in line
  assert not os.path.exists(out / "config.json")
