"""SASRec: the block against a plain-numpy oracle, causality, padding,
identity growth, gates, dropout, the param tree, bf16 and the config."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import config, models
from jaxrec.errors import JaxrecError
from jaxrec.heads.softmax import SoftmaxConfig
from jaxrec.models.sasrec import SASRecBlock, SASRecConfig
from plan_helpers import gate_plan
from jaxrec.nn.attention import (CausalSelfAttention,
                                 ConcatHeadsSelfAttention)

# Left-padded: two padding slots in the first row, none in the second.
IDS = np.array([[0, 0, 3, 7, 1, 9, 4, 12, 5, 8],
                [2, 11, 6, 6, 13, 1, 25, 4, 17, 29]], np.int32)


def make_config(**kw):
  base = dict(num_items=30, embed_dim=8, num_blocks=2, num_heads=2,
              num_positions=12, dropout=0.0)
  base.update(kw)
  return config.Config(model=SASRecConfig(**base), head=SoftmaxConfig())


def perturbed(params, seed=1, scale=0.5):
  """Every leaf moved off its init (LN scale/bias, alphas, biases), so a
  dropped or misplaced term changes the output."""
  rng = np.random.default_rng(seed)  # numpy: no compile per leaf shape.
  return jax.tree.map(lambda a: a + scale * rng.normal(size=a.shape).astype(
      np.float32), params)


# Jitted: one compile per config is far cheaper than eager dispatch.
@functools.partial(jax.jit, static_argnums=0)
def init(cfg, key):
  return models.init_params(cfg, key)


@functools.partial(jax.jit, static_argnames=("cfg", "train"))
def _hidden(params, ids, gates, rng, *, cfg, train):
  if gates is None:
    return models.hidden_states(params, cfg, ids, train=train, rng=rng)
  return models.get(cfg.model.name).apply(params, cfg.model, ids, train=train,
                                          rng=rng, plan=gate_plan(gates))


def hidden(params, cfg, ids=IDS, *, gates=None, rng=None, train=False):
  return np.asarray(_hidden(params, jnp.asarray(ids), gates, rng, cfg=cfg,
                            train=train))


# --------------------------------------------------------- numpy oracle


def np_ln(v, p, eps=1e-8):
  mu = v.mean(-1, keepdims=True)
  var = np.square(v - mu).mean(-1, keepdims=True)
  return (v - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_attention(p, q, kv, real):
  def proj(x, name):
    return np.einsum("btc,chd->bthd", x, p[name]["kernel"]) + p[name]["bias"]
  qh, kh, vh = proj(q, "query"), proj(kv, "key"), proj(kv, "value")
  logits = np.einsum("bqhd,bkhd->bhqk", qh, kh) / np.sqrt(qh.shape[-1])
  t = q.shape[1]
  visible = np.tril(np.ones((t, t), bool))[None, None] & real[:, None, None]
  logits = np.where(visible, logits, -np.inf)
  with np.errstate(invalid="ignore"):  # Padding queries see no key.
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = np.where(visible.any(-1, keepdims=True),
                 w / w.sum(-1, keepdims=True), 0.0)
  heads = np.einsum("bhqk,bkhd->bqhd", w, vh)
  return np.einsum("bqhd,hdc->bqc", heads, p["out"]["kernel"]) + \
      p["out"]["bias"]


def np_block(p, x, real, residual):
  def ffn(f):
    h = np.maximum(f @ p["ffn_in"]["kernel"] + p["ffn_in"]["bias"], 0.0)
    return h @ p["ffn_out"]["kernel"] + p["ffn_out"]["bias"]
  q = np_ln(x, p["ln_attn"])
  a = np_attention(p["attention"], q, x, real)
  if residual == "official":
    f = np_ln(q + a, p["ln_ffn"])
    out = f + ffn(f)
  else:
    x1 = x + p["alpha_attn"] * a
    out = x1 + p["alpha_ffn"] * ffn(np_ln(x1, p["ln_ffn"]))
  return out * real[..., None]


def np_input(params, ids):
  """Embedding * sqrt(C) + right-aligned position, padding zeroed."""
  emb = params["item_embedding"]["embedding"]
  x = emb[ids] * np.sqrt(emb.shape[1])
  pos = params["position_embedding"]["embedding"]
  x = x + pos[pos.shape[0] - ids.shape[1]:]
  return x * (ids != 0)[..., None]


def np_model(params, cfg, ids):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  real = ids != 0
  x = np_input(p, ids)
  for i in range(cfg.model.num_blocks):
    x = np_block(jax.tree.map(lambda a: a[i], p["blocks"]), x, real,
                 cfg.model.residual)
  return np_ln(x, p["final_norm"])


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("residual", ["official", "alpha"])
def test_model_equals_numpy_oracle(residual):
  cfg = make_config(residual=residual)
  params = perturbed(init(cfg, jax.random.key(0)))
  if residual == "alpha":
    assert np.all(np.abs(params["blocks"]["alpha_attn"]) > 1e-3)
  np.testing.assert_allclose(hidden(params, cfg), np_model(params, cfg, IDS),
                             rtol=1e-4, atol=1e-4)


def test_output_at_t_ignores_items_after_t():
  cfg = make_config()
  params = perturbed(init(cfg, jax.random.key(0)))
  changed = IDS.copy()
  changed[:, 6:] = [20, 21, 22, 23]
  h, h2 = hidden(params, cfg), hidden(params, cfg, changed)
  np.testing.assert_allclose(h[:, :6], h2[:, :6], rtol=1e-6, atol=1e-6)
  assert not np.allclose(h[:, 6:], h2[:, 6:], atol=1e-3)


def test_padding_never_reaches_real_positions():
  cfg = make_config()
  params = perturbed(init(cfg, jax.random.key(0)))
  # Padding's embedding row and the position rows of row 0's padded slots.
  garbage = jax.tree.map(lambda a: a, params)
  garbage["item_embedding"]["embedding"] = \
      params["item_embedding"]["embedding"].at[0].set(100.0)
  garbage["position_embedding"]["embedding"] = \
      params["position_embedding"]["embedding"].at[:4].set(-50.0)
  h, h2 = hidden(params, cfg), hidden(garbage, cfg)
  np.testing.assert_allclose(h[0, 2:], h2[0, 2:], rtol=1e-6, atol=1e-6)


def test_more_left_padding_changes_no_real_position():
  """Slots are right-aligned: the last item always reads position row P-1,
  so a shorter input (e.g. evaluation windows) sees the same model."""
  cfg = make_config()
  params = perturbed(init(cfg, jax.random.key(0)))
  longer = np.concatenate([np.zeros((2, 2), np.int32), IDS], axis=1)
  h = models.hidden_states(params, cfg, jnp.asarray(IDS))
  h_longer = models.hidden_states(params, cfg, jnp.asarray(longer))
  np.testing.assert_allclose(h[0, 2:], h_longer[0, 4:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h[1], h_longer[1, 2:], rtol=1e-5, atol=1e-5)


def test_attention_masks_padding_keys_and_never_nans():
  attn = CausalSelfAttention(num_heads=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 8)),
                  jnp.float32)
  real = jnp.array([[False, False, True, True, False, True]])
  variables = perturbed(jax.jit(functools.partial(
      attn.init, deterministic=True))(jax.random.key(1), x, x, real))

  @jax.jit
  def run(v, kv):
    return attn.apply(v, x, kv, real, deterministic=True)
  out = run(variables, x)
  garbage = x.at[:, jnp.array([0, 1, 4])].set(1e3)
  np.testing.assert_allclose(out[:, 2:], run(variables, garbage)[:, 2:],
                             rtol=1e-6, atol=1e-6)
  # Queries 0 and 1 see no real key: zeros, not NaN, values and gradients.
  np.testing.assert_array_equal(out[:, :2], 0.0)
  grads = jax.jit(jax.grad(lambda v: run(v, x).sum()))(variables)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_dropout_acts_inside_each_branch():
  """With one branch's alpha at 0, any randomness comes from the other:
  the attention weights' dropout, or the feed-forward's."""
  cfg = make_config(residual="alpha", dropout=0.5)
  params = init(make_config(residual="alpha"), jax.random.key(0))
  block = perturbed(jax.tree.map(lambda a: a[0], params["blocks"]))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 8)),
                  jnp.float32)

  @jax.jit
  def run(p, key):
    return SASRecBlock(cfg.model).apply(
        {"params": p}, x, jnp.ones((2, 6), bool), deterministic=False,
        rngs={"dropout": key})
  for on, off in [("alpha_attn", "alpha_ffn"), ("alpha_ffn", "alpha_attn")]:
    p = {**block, on: jnp.float32(1.0), off: jnp.float32(0.0)}
    a = run(p, jax.random.key(0))
    assert not np.allclose(a, run(p, jax.random.key(1))), on
    np.testing.assert_array_equal(a, run(p, jax.random.key(0)))


def test_fresh_alpha_model_is_identity_up_to_final_norm():
  cfg = make_config(residual="alpha")
  params = init(cfg, jax.random.key(0))
  params["final_norm"] = perturbed(params["final_norm"])
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  expected = np_ln(np_input(p, IDS), p["final_norm"])
  np.testing.assert_allclose(hidden(params, cfg), expected, rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize("residual", ["official", "alpha"])
def test_gates_of_one_equal_no_gates(residual):
  cfg = make_config(residual=residual)
  params = perturbed(init(cfg, jax.random.key(0)))
  np.testing.assert_allclose(hidden(params, cfg, gates=jnp.ones((2, 2))),
                             hidden(params, cfg), rtol=1e-5, atol=1e-5)


def test_gate_zero_skips_the_block_per_sequence():
  cfg = make_config(residual="alpha")
  params = perturbed(init(cfg, jax.random.key(0)))
  # Sequence 0 skips block 0; sequence 1 runs both.
  gated = hidden(params, cfg, gates=jnp.array([[0.0, 1.0], [1.0, 1.0]]))
  top_only = dataclasses.replace(cfg.model, num_blocks=1)
  top = dict(params, blocks=jax.tree.map(lambda a: a[1:], params["blocks"]))
  skipped = hidden(top, cfg.replace(model=top_only))
  np.testing.assert_allclose(gated[0], skipped[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gated[1], hidden(params, cfg)[1], rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(gated[0], hidden(params, cfg)[0], atol=1e-3)


def test_dropout_needs_train_and_a_key():
  # Fresh alpha blocks are the identity, so keys can only differ through
  # the input's dropout (the blocks' is tested above).
  cfg = make_config(residual="alpha", dropout=0.3)
  params = init(make_config(residual="alpha"), jax.random.key(0))
  np.testing.assert_array_equal(hidden(params, cfg), hidden(params, cfg))
  a = hidden(params, cfg, train=True, rng=jax.random.key(1))
  b = hidden(params, cfg, train=True, rng=jax.random.key(2))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(
      a, hidden(params, cfg, train=True, rng=jax.random.key(1)))
  with pytest.raises(ValueError, match="rng"):
    hidden(params, cfg, train=True)


def test_param_tree_shapes_and_block_axis():
  cfg = make_config(num_blocks=3, residual="alpha", ffn_dim=16)
  params = models.abstract_params(cfg)  # The tree init_params builds.
  assert set(params) == {"item_embedding", "position_embedding", "blocks",
                         "final_norm", "head"}
  assert params["item_embedding"]["embedding"].shape == (30, 8)
  assert params["position_embedding"]["embedding"].shape == (12, 8)
  assert params["final_norm"]["scale"].shape == (8,)
  blocks = params["blocks"]
  assert blocks["alpha_attn"].shape == blocks["alpha_ffn"].shape == (3,)
  assert blocks["ffn_in"]["kernel"].shape == (3, 8, 16)
  assert blocks["attention"]["query"]["kernel"].shape == (3, 8, 2, 4)
  assert all(a.shape[0] == 3 for a in jax.tree.leaves(blocks))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(params))

  def plain(tree):
    return type(tree) is dict and all(  # pylint: disable=unidiomatic-typecheck
        plain(v) for v in tree.values() if not hasattr(v, "shape"))
  assert plain(params)
  assert "alpha_attn" not in models.abstract_params(make_config())["blocks"]


def dot_generals(jaxpr):
  """Every dot_general in a jaxpr, nested jaxprs (scan, pjit) included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          yield from dot_generals(sub)


def test_bfloat16_compute_with_float32_output():
  cfg = make_config()
  bf16 = cfg.replace(model=dataclasses.replace(cfg.model, dtype="bfloat16"))
  # Small moves: large logits would test bf16's rounding, not our code.
  params = perturbed(init(cfg, jax.random.key(0)), scale=0.1)
  out = models.hidden_states(params, bf16, jnp.asarray(IDS))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, hidden(params, cfg), atol=0.1)
  # The attention matmuls (batched over sequence and head) ran in bf16.
  jaxpr = jax.make_jaxpr(
      lambda p: models.hidden_states(p, bf16, jnp.asarray(IDS)))(params)
  attention = [e for e in dot_generals(jaxpr.jaxpr)
               if e.params["dimension_numbers"][1][0]]
  assert attention and all(v.aval.dtype == jnp.bfloat16
                           for e in attention for v in e.invars)


@pytest.mark.parametrize("field,value", [("num_heads", 3),
                                         ("dropout", 1.0),
                                         ("dropout", -0.1),
                                         ("residual", "plain")])
def test_bad_option_names_itself(field, value):
  option = "model.embed_dim" if field == "num_heads" else f"model.{field}"
  with pytest.raises(JaxrecError, match=option.replace(".", r"\.")):
    SASRecConfig(embed_dim=8, **{field: value}).validate()


def test_fit_data_takes_num_positions_from_max_len():
  fitted = SASRecConfig().fit_data(num_items=50, max_len=20)
  assert (fitted.num_items, fitted.num_positions) == (50, 20)
  kept = SASRecConfig(num_positions=64).fit_data(num_items=50, max_len=20)
  assert kept.num_positions == 64
  with pytest.raises(JaxrecError, match=r"model\.num_positions"):
    SASRecConfig(num_positions=10).fit_data(num_items=50, max_len=20)


def test_sequence_longer_than_num_positions_raises():
  cfg = make_config()
  params = init(cfg, jax.random.key(0))
  hidden(params, cfg, np.ones((1, 12), np.int32))
  with pytest.raises(ValueError, match="num_positions=12"):
    hidden(params, cfg, np.ones((1, 13), np.int32))


def test_registered_and_read_from_a_config_dict():
  cfg = config.from_dict({"model": {"name": "sasrec", "num_heads": "2"}})
  assert isinstance(cfg.model, SASRecConfig) and cfg.model.num_heads == 2
  assert models.get("sasrec").config is SASRecConfig


def test_concatenated_heads_equal_an_identity_output_projection():
  """The paper's attention (no W^O) is flax's with W^O = I and no bias."""
  c, h = 8, 2
  x = jax.random.normal(jax.random.key(0), (2, 5, c))
  real = jnp.array([[False, True, True, True, True]] * 2)
  plain = ConcatHeadsSelfAttention(num_heads=h)
  params = plain.init(jax.random.key(1), x, x, real, deterministic=True)
  flax_params = jax.tree.map(lambda a: a, params)
  flax_params["params"]["out"] = {
      "kernel": jnp.eye(c).reshape(h, c // h, c), "bias": jnp.zeros(c)}
  np.testing.assert_allclose(
      plain.apply(params, x, x, real, deterministic=True),
      CausalSelfAttention(num_heads=h).apply(flax_params, x, x, real,
                                             deterministic=True),
      rtol=1e-5, atol=1e-6)


def test_paper_preset_has_no_attention_out_and_ties_the_output_layer():
  path = os.path.join(os.path.dirname(__file__), "..", "experiments",
                      "configs", "sasrec_paper.yaml")
  cfg = config.from_dict(config.load_file(path), path)
  cfg = cfg.replace(model=cfg.model.fit_data(50, 10))
  params = models.init_params(cfg, jax.random.key(0))
  assert "out" not in params["blocks"]["attention"]
  assert "kernel" not in params["head"]  # The item table scores the items.
  limit = (6 / (50 + cfg.model.embed_dim)) ** 0.5  # Glorot uniform.
  table = np.asarray(params["item_embedding"]["embedding"])
  assert np.abs(table).max() <= limit and np.abs(table).max() > 0.5 * limit
  h = models.hidden_states(params, cfg, jnp.ones((1, 10), jnp.int32))
  assert h.shape == (1, 10, cfg.model.embed_dim)
