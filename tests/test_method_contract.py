"""The plug-in contract, held by plug-ins this file alone defines.

A toy method (`blockgate`: a learned scalar gate per block on the residual
branch, with an L1 penalty) and a toy backbone (`meanmlp`: residual MLP
blocks over a causal running mean of the item embeddings, not a gated
causal convolution or attention stack) register from here. Both must
train, checkpoint, resume, evaluate, grow, predict and export through the
unchanged core: nothing under jaxrec/ names them.
"""
import dataclasses
import json
import os
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import config as config_lib
from jaxrec import method_api, models, serving
from jaxrec.config import BackboneConfig, MethodConfig, option
from jaxrec.errors import JaxrecError
from jaxrec.evaluation import evaluate_checkpoint
from jaxrec.models.backbone import Backbone, SurgeryRules
from jaxrec.nn import embedding
from jaxrec.nn.stack import scan_blocks
from jaxrec.methods.stackrec import growth
from jaxrec.training import loop
from jaxrec.training import state as state_lib

# ------------------------------------------------------ the toy backbone


@dataclasses.dataclass(frozen=True)
class MeanMLPConfig(BackboneConfig):
  name: str = option("meanmlp", "backbone")
  num_blocks: int = option(2, "residual MLP blocks")
  hidden_dim: int = option(16, "MLP width")

  def capabilities(self) -> frozenset[str]:
    return frozenset({"block_stack", "own_blocks", "causal", "slot:branch",
                      "residual_gate", "row_local_blocks"})


class MLPBlock(nn.Module):
  cfg: MeanMLPConfig

  @nn.compact
  def __call__(self, x, slot=None):
    h = nn.Dense(self.cfg.embed_dim)(jax.nn.gelu(
        nn.Dense(self.cfg.hidden_dim)(x)))
    h = self.param("alpha", nn.initializers.zeros, ()) * h
    return x + (h if slot is None else slot("branch", x, h))


def meanmlp_init(cfg, rng):
  k_emb, k_blocks = jax.random.split(rng)
  dummy = jnp.zeros((1, 1, cfg.embed_dim))
  blocks = jax.vmap(lambda k: MLPBlock(cfg).init(k, dummy)["params"])(
      jax.random.split(k_blocks, cfg.num_blocks))
  return {"item_embedding": embedding.init(cfg, k_emb), "blocks": blocks}


def meanmlp_apply(params, cfg, ids, *, train=False, rng=None,
                  plan=method_api.BlockPlan(), unroll=False):
  del train, rng  # No dropout.
  real = (ids != 0)[..., None]
  x = embedding.lookup(params, cfg, ids) * real
  x = jnp.cumsum(x, 1) / jnp.maximum(jnp.cumsum(real, 1), 1)  # Causal mean.

  def block(p, x, static, inputs):
    del static
    return MLPBlock(cfg).apply(
        {"params": p}, x,
        lambda name, a, b: plan.at(name, a, b, inputs["side"]))

  if plan.wrap is not None:
    block = plan.wrap(block)
  return scan_blocks(block, plan.run_blocks(params), x,
                     statics=(None,) * cfg.num_blocks,
                     xs={"side": plan.side}, unroll=unroll)


MEANMLP = models.register(Backbone(
    name="meanmlp", config=MeanMLPConfig, init=meanmlp_init,
    apply=meanmlp_apply,
    surgery=SurgeryRules(stacks=("blocks",), gates=("alpha",))))

# -------------------------------------------------------- the toy method


@dataclasses.dataclass(frozen=True)
class BlockGateConfig(MethodConfig):
  NAME = "blockgate"
  PHASE = 35
  l1: float = option(0.01, "L1 penalty on the gates")

  def requires(self, cfg: Any) -> frozenset[str]:
    return frozenset({"block_stack", "slot:branch"})


def blockgate_init(params, cfg, rng):
  del rng
  return {**params, "blockgate": {"gate": jnp.ones(cfg.model.num_blocks)}}


def blockgate_side(params, cfg, ids, *, train, rng):
  del cfg, ids, train, rng
  return params["blockgate"]["gate"], {"gate": params["blockgate"]["gate"]}


BLOCKGATE = method_api.register(method_api.Method(
    name="blockgate", config=BlockGateConfig, init=blockgate_init,
    stacks=lambda cfg: ("blockgate",), side_inputs=blockgate_side,
    slots=lambda cfg: {"branch": lambda x_in, h, g: g * h},
    loss_terms=lambda params, cfg, aux, batch: {
        "l1": cfg.method("blockgate").l1 * jnp.abs(aux["gate"]).sum()},
    report=lambda params, cfg, data: {
        "mean_gate": float(np.mean(params["blockgate"]["gate"]))}))

# ---------------------------------------------------------------- a run

TINY_DATA = config_lib.DataConfig(source="synthetic:tiny", max_len=12)


def config(backbone="meanmlp", methods=(BlockGateConfig(),), steps=6):
  return config_lib.Config(
      model=config_lib.model_config_class(backbone)(embed_dim=8,
                                                    num_blocks=2),
      methods=methods, data=TINY_DATA,
      train=config_lib.TrainConfig(steps=steps, eval_every=3,
                                   batch_size=16))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("plugins") / "run")
  metrics = loop.train(config(), out, progress_bar=False)
  return out, metrics


def test_a_config_with_an_outside_method_round_trips_through_its_dict():
  cfg = config()
  assert config_lib.from_dict(cfg.to_dict()) == cfg
  assert cfg.to_dict()["methods"] == {"blockgate": {"l1": 0.01,
                                                    "version": 1}}


def test_the_method_adds_its_own_block_axis_subtree_and_a_loss_term():
  cfg = config().fit_data(20, 12)
  params = models.init_params(cfg, jax.random.key(0))
  chex.assert_shape(params["blockgate"]["gate"], (2,))
  chex.assert_trees_all_equal_structs(params, models.abstract_params(cfg))
  ids = jnp.ones((3, 12), jnp.int32)
  _, aux = models.forward(params, cfg, ids)
  terms = method_api.loss_terms(params, cfg, aux, {})
  np.testing.assert_allclose(terms["blockgate/l1"], 0.02)


def test_a_zero_gate_makes_the_toy_backbone_skip_that_block():
  cfg = config().fit_data(20, 12)
  params = models.init_params(cfg, jax.random.key(0))
  params["blocks"]["alpha"] = jnp.ones(2)
  ids = jnp.arange(1, 13)[None] % 19 + 1
  off = dict(params, blockgate={"gate": jnp.array([0.0, 1.0])})
  top = dict(params, blocks=jax.tree.map(lambda a: a[1:], params["blocks"]),
             blockgate={"gate": jnp.ones(1)})
  top_cfg = cfg.replace(model=dataclasses.replace(cfg.model, num_blocks=1))
  chex.assert_trees_all_close(models.hidden_states(off, cfg, ids),
                              models.hidden_states(top, top_cfg, ids),
                              atol=1e-6)


def test_an_outside_backbone_and_method_train_and_report(run):
  _, metrics = run
  assert metrics["backbone"] == "meanmlp" and metrics["steps"] == 6
  assert metrics["test"]["ndcg@10"] > 0
  assert metrics["mean_gate"] != 1.0  # The gates trained.


def test_the_loop_logs_each_loss_term_of_the_method(run):
  out, _ = run
  with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
    logged = [json.loads(line) for line in f]
  terms = [r["loss/blockgate/l1"] for r in logged if "loss" in r]
  assert terms and all(0 < t < 0.03 for t in terms)  # 0.01 * sum(|gate|)


def test_they_resume_exactly_after_an_interruption(run, tmp_path):
  straight, _ = run
  killed = str(tmp_path / "killed")

  def stop(step):
    if step == 3:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    loop.train(config(), killed, progress_bar=False, step_callback=stop)
  loop.train(config(), killed, resume=True, progress_bar=False)
  a, _, _ = state_lib.load_params(straight, "latest")
  b, _, _ = state_lib.load_params(killed, "latest")
  chex.assert_trees_all_equal(a, b)


def test_they_evaluate_from_the_checkpoint_to_the_recorded_metrics(run):
  out, metrics = run
  evaluated = evaluate_checkpoint(out, split="test")
  assert evaluated["test"] == pytest.approx(metrics["test"], abs=1e-6)
  assert evaluated["mean_gate"] == metrics["mean_gate"]


def test_they_grow_with_the_method_rows_following_the_index_map(run):
  out, _ = run
  params, cfg, _ = state_lib.load_params(out)
  deep, deep_cfg = growth.stack(params, cfg, "adjacent", "preserve",
                                rng=jax.random.key(1))
  assert deep_cfg.model.num_blocks == 4
  chex.assert_trees_all_equal(deep["blockgate"]["gate"],
                              params["blockgate"]["gate"][
                                  np.array([0, 0, 1, 1])])
  ids = jnp.arange(1, 13)[None] % 19 + 1
  chex.assert_trees_all_close(models.hidden_states(deep, deep_cfg, ids),
                              models.hidden_states(params, cfg, ids),
                              atol=1e-5)


def test_they_predict_and_export_the_same_top_k(run, tmp_path):
  out, _ = run
  predictor = serving.Predictor(out)
  history = list(predictor.vocab.items[1:6])
  [pred] = predictor.topk([history], k=5)
  path = str(tmp_path / "model.zip")
  serving.export_topk(out, path, k=5)
  fn, vocab, spec = serving.load_exported(path)
  ids = np.zeros((1, spec["max_len"]), np.int32)
  ids[0, -5:] = vocab.encode_items(history)[0]
  got, _ = fn.call(ids)
  assert [str(vocab.items[i]) for i in np.asarray(got)[0]] == pred.items


def test_a_method_needing_what_a_backbone_lacks_is_one_line():
  no_branch = dataclasses.replace(
      BlockGateConfig(), l1=0.0)
  cfg = config(methods=(no_branch,))
  cfg.validate()  # meanmlp has the branch slot.

  class NoSlots(MeanMLPConfig):
    def capabilities(self):
      return frozenset({"block_stack"})

  bad = cfg.replace(model=NoSlots(embed_dim=8))
  with pytest.raises(JaxrecError, match="methods.blockgate: backbone "
                     "'meanmlp' .*lacks slot:branch"):
    bad.validate()
