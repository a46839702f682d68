"""The training loop: determinism, resume, sharding, stopping, learnability."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrec import config
from jaxrec import evaluation
from jaxrec import models
from jaxrec.data import pipeline
from jaxrec.errors import JaxrecError
from jaxrec.heads.softmax import SoftmaxConfig
from jaxrec.models.nextitnet import NextItNetConfig
from jaxrec.models.bert4rec import BERT4RecConfig
from jaxrec.models.grec import GRecConfig
from jaxrec.models.gru4rec import GRU4RecConfig
from jaxrec.models.hstu import HSTUConfig
from jaxrec.models.sasrec import SASRecConfig
from jaxrec.models.ssept import SsePTConfig
from jaxrec.tasks import next_item
from jaxrec.training import checkpoints
from jaxrec.training import checkpoint_meta
from jaxrec.training import orbax_io
from jaxrec.training import loop as train
from jaxrec.training import state as state_lib


def tiny_config(**train_kw):
  tkw = dict(steps=12, eval_every=6, batch_size=16, eval_batch_size=64,
             keep_checkpoints=2)
  tkw.update(train_kw)
  return config.Config(
      model=NextItNetConfig(num_blocks=2, embed_dim=8),
      data=config.DataConfig(source="synthetic:tiny", max_len=20),
      train=config.TrainConfig(**tkw))


def latest_params(run_dir):
  params, _, _ = evaluation.load_params(run_dir, "latest")
  return jax.tree.map(np.asarray, params)


def run_python(code, env_extra=None, check=True):
  env = dict(os.environ, **(env_extra or {}))
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                        capture_output=True, text=True, env=env, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(proc.stderr[-3000:])
  return proc


def test_same_seed_gives_same_params(tmp_path):
  cfg = tiny_config(steps=6)
  train.train(cfg, str(tmp_path / "a"), progress_bar=False)
  train.train(cfg, str(tmp_path / "b"), progress_bar=False)
  chex.assert_trees_all_equal(latest_params(tmp_path / "a"),
               latest_params(tmp_path / "b"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A 12-step run validated at 6 and 12: (dir, returned result, wall s)."""
  out = tmp_path_factory.mktemp("tiny_run")
  start = time.time()
  result = train.train(tiny_config(), str(out), progress_bar=False)
  return out, result, time.time() - start


def read_metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.json")) as f:
    return json.load(f)


def test_metrics_json_has_valid_test_and_popularity(tiny_run):
  out, result, _ = tiny_run
  saved = read_metrics(out)
  assert saved["steps"] == 12 and saved["train_time_s"] > 0
  for split in ("valid", "test", "popularity"):
    for k in (5, 10, 20):
      for m in ("mrr", "hr", "ndcg"):
        assert 0.0 <= saved[split][f"{m}@{k}"] <= 1.0
  assert saved["test"] == result["test"]
  assert saved["ranking"] == "full" and saved["mask_history"] is False


def brute_force_metrics(scores, targets):
  """MRR/HR/NDCG@k from scores [B, V] over ids 0..V-1 by counting, for each
  target, the real items (not padding 0, not the target) scoring >= it."""
  ids = np.arange(scores.shape[1])
  target_score = scores[np.arange(len(targets)), targets]
  ahead = ((scores >= target_score[:, None]) & (ids[None, :] != 0)
           & (ids[None, :] != targets[:, None]))
  ranks = ahead.sum(axis=1)
  out = {}
  for k in (5, 10, 20):
    hit = ranks < k
    out[f"mrr@{k}"] = np.mean(np.where(hit, 1.0 / (ranks + 1), 0.0))
    out[f"hr@{k}"] = np.mean(hit)
    out[f"ndcg@{k}"] = np.mean(np.where(hit, 1.0 / np.log2(ranks + 2), 0.0))
  return out


def test_popularity_in_metrics_json_matches_a_brute_force_ranking(tiny_run):
  out, _, _ = tiny_run
  data = pipeline.load_data(tiny_config().data)
  # Popularity = how often an item occurs in the training rows.
  counts = np.bincount(data.train.ravel(), minlength=data.num_items)
  counts[0] = 0
  scores = np.broadcast_to(counts, (len(data.test_targets), data.num_items))
  expected = brute_force_metrics(scores, data.test_targets)
  popularity = read_metrics(out)["popularity"]
  assert popularity["count"] == len(data.test_targets)
  for name, value in expected.items():
    assert popularity[name] == pytest.approx(value, rel=1e-12), name


def test_metrics_json_valid_is_the_best_logged_validation(tiny_run):
  out, _, _ = tiny_run
  saved = read_metrics(out)
  with open(out / "metrics.jsonl") as f:
    validations = {r["step"]: r["valid"] for r in map(json.loads, f)
                   if "valid" in r}
  assert sorted(validations) == [6, 12]
  best = max(validations, key=lambda s: validations[s]["ndcg@10"])
  assert saved["best_step"] == best
  assert saved["valid"] == validations[best]


def test_train_time_is_the_clock_at_the_last_validation(tiny_run):
  out, _, wall_s = tiny_run
  saved = read_metrics(out)
  with open(out / "metrics.jsonl") as f:
    clocks = [r["train_time_s"] for r in map(json.loads, f) if "valid" in r]
  assert saved["train_time_s"] == clocks[-1]
  assert 0 < clocks[0] < clocks[-1] <= wall_s


def test_keeps_n_latest_and_the_best_checkpoint(tmp_path):
  train.train(tiny_config(steps=24, eval_every=6), str(tmp_path),
              progress_bar=False)
  latest = sorted(os.listdir(tmp_path / "checkpoints" / "latest"))
  assert latest == ["18", "24"]
  assert len(os.listdir(tmp_path / "checkpoints" / "best")) == 1


KILL_AND_RESUME = """
import os, signal, json
from jaxrec import config
from jaxrec.training import loop as train
cfg = config.from_dict(json.loads({cfg!r}))
def kill(step):
  if step == {kill_at}:
    os.kill(os.getpid(), signal.SIGKILL)
train.train(cfg, {out!r}, progress_bar=False, step_callback=kill)
"""


def complete_steps(run_dir, kind="latest"):
  """The steps of the complete checkpoints of a kind, as Orbax sees them."""
  return list(orbax_io.manager(str(run_dir), kind,
                               read_only=True).all_steps())


@pytest.mark.parametrize("kill_at", [13, 12])  # 12: during the async save.
def test_resume_after_sigkill_ends_with_identical_params(tmp_path, kill_at):
  cfg = tiny_config(steps=20, eval_every=6)
  train.train(cfg, str(tmp_path / "straight"), progress_bar=False)
  killed = str(tmp_path / "killed")
  proc = run_python(KILL_AND_RESUME.format(cfg=json.dumps(cfg.to_dict()),
                                           kill_at=kill_at, out=killed),
                    check=False)
  assert proc.returncode == -9, proc.stderr[-2000:]
  on_disk = sorted(complete_steps(killed))
  assert on_disk, "the killed run left no checkpoint to resume from"
  if kill_at == 12:
    # Killed while step 12 was being written: Orbax's tmp directory of it
    # is there, it never became a checkpoint, so step 6 is the one resumed.
    assert on_disk == [6]
    entries = os.listdir(os.path.join(killed, "checkpoints", "latest"))
    assert "12" not in entries, entries
    assert any(e.startswith("12.") and "tmp" in e for e in entries), entries
  else:
    assert on_disk[-1] in (6, 12)
  steps = []
  train.train(cfg, killed, resume=True, progress_bar=False,
              step_callback=steps.append)
  # The resumed run starts right after the restored step.
  assert steps == list(range(on_disk[-1] + 1, 21))
  chex.assert_trees_all_equal(
               latest_params(tmp_path / "straight"), latest_params(killed))
  assert log_records(killed) == log_records(tmp_path / "straight")


def log_records(run_dir):
  """metrics.jsonl without its timings: what a resume must reproduce."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r.get("loss"), r.get("valid")) for r in rows]


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(
    tmp_path):
  cfg = tiny_config(steps=30, eval_every=10)
  data = pipeline.load_data(cfg.data)
  # An extra item id that no real row contains marks the poisoned batches.
  mark = data.num_items
  data = dataclasses.replace(data, num_items=mark + 1,
                             item_counts=np.append(data.item_counts, 0))

  def batch(data, step, batch_size, seed):
    out = next_item.batch(data, step, batch_size, seed)
    if step >= 14:
      out["targets"] = out["targets"].copy()
      out["targets"][0, -1] = mark
    return out

  def loss_parts(params, cfg, arrays, rng, sampler):
    value, terms = next_item.loss_parts(params, cfg, arrays, rng, sampler)
    return jnp.where(jnp.any(arrays["targets"] == mark), jnp.nan,
                     value), terms

  # The loop knows only its task: a task whose loss turns NaN at step 14.
  poisoned = types.SimpleNamespace(batch=batch, loss_parts=loss_parts,
                                   rank_fn=next_item.rank_fn)
  with pytest.raises(JaxrecError, match="at step 14"):
    train.train(cfg, str(tmp_path), data, progress_bar=False, task=poisoned)
  assert os.listdir(tmp_path / "checkpoints" / "latest") == ["10"]
  params = latest_params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_early_stopping_after_patience_validations(tmp_path):
  # A learning rate this small leaves the metric flat, so validations after
  # the first never improve it.
  cfg = tiny_config(steps=60, eval_every=6, patience=2, learning_rate=1e-12)
  result = train.train(cfg, str(tmp_path), progress_bar=False)
  assert result["steps"] == 18 and result["best_step"] == 6


def test_resume_refuses_a_different_config(tmp_path):
  train.train(tiny_config(steps=6), str(tmp_path), progress_bar=False)
  other = tiny_config(steps=6).replace(
      model=NextItNetConfig(num_blocks=3, embed_dim=8))
  with pytest.raises(JaxrecError, match="num_blocks"):
    train.train(other, str(tmp_path), resume=True, progress_bar=False)


def test_fresh_run_refuses_a_directory_holding_a_run(tmp_path):
  train.train(tiny_config(steps=6), str(tmp_path), progress_bar=False)
  with pytest.raises(JaxrecError, match="already holds a run"):
    train.train(tiny_config(steps=6), str(tmp_path), progress_bar=False)


EIGHT_DEVICES = """
import json, jax, numpy as np
from jaxrec import config, models
from jaxrec.data import pipeline, sequences
from jaxrec.training import loop, state as state_lib
from jaxrec.training.mesh import Sharder, make_mesh
cfg = config.from_dict(json.loads({cfg!r}))
data = pipeline.load_data(cfg.data)
cfg = cfg.fit_data(data.num_items, data.max_len, data.item_counts)
params = models.init_params(cfg, jax.random.key(0))
opt, labels = state_lib.optimizer_for(cfg, params)
out = {{}}
for n in (1, 8):
  sharder = Sharder(make_mesh(jax.devices()[:n]))
  step = jax.jit(loop.make_train_step(cfg, opt, labels, None),
                 in_shardings=(sharder.replicated, sharder.batch),
                 out_shardings=(sharder.replicated, sharder.replicated))
  state = sharder.replicate(state_lib.init_state(params, opt))
  losses = []
  for s in range(3):
    batch = sharder.put_batch(sequences.train_batch(data.train, s, 16, 0))
    state, o = step(state, batch)
    losses.append(float(o["loss"]))
  out[n] = {{"devices": len(state["params"]["blocks"]["alpha"].devices()),
             "losses": losses,
             "emb": np.asarray(state["params"]["item_embedding"]["embedding"]).tolist()}}
print(json.dumps(out))
"""


def test_eight_fake_devices_give_the_same_loss_as_one(tmp_path):
  proc = run_python(
      EIGHT_DEVICES.format(cfg=json.dumps(tiny_config().to_dict())),
      {"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
       "JAX_PLATFORMS": "cpu"})
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["1"]["devices"] == 1 and out["8"]["devices"] == 8
  np.testing.assert_allclose(out["8"]["losses"], out["1"]["losses"],
                             rtol=1e-5)
  np.testing.assert_allclose(out["8"]["emb"], out["1"]["emb"], rtol=1e-4,
                             atol=1e-6)


@pytest.mark.parametrize("model,learning_rate,times", [
    (NextItNetConfig(num_blocks=2, embed_dim=32), 1e-3, 2.0),
    (SASRecConfig(num_blocks=2, embed_dim=32, num_heads=2), 1e-3, 2.0),
    (HSTUConfig(num_blocks=2, embed_dim=32, num_heads=2), 1e-3, 2.0),
    # A GRU learns more slowly per step: 1e-3 reaches 1.4x popularity here.
    (GRU4RecConfig(num_blocks=1, embed_dim=32), 3e-3, 2.0),
    # Cloze training has a target at 30% of the positions, not all: 1.7x
    # popularity after 400 steps, 1.8x after 800 (README).
    (BERT4RecConfig(num_blocks=2, embed_dim=32), 3e-3, 1.5),
    # Half of the targets train per row: 1.2x popularity at 1e-3, 2.5x here.
    (GRecConfig(num_blocks=2, embed_dim=32), 3e-3, 2.0),
    (SsePTConfig(num_blocks=2, embed_dim=32, num_heads=2), 1e-3, 2.0),
], ids=["nextitnet", "sasrec", "hstu", "gru4rec", "bert4rec", "grec",
        "ssept"])
def test_trained_model_beats_popularity_on_synthetic(
    tmp_path, model, learning_rate, times):
  cfg = config.Config(
      model=model,
      data=config.DataConfig(source="synthetic:small,users=1000"),
      train=config.TrainConfig(steps=400, eval_every=400, batch_size=64,
                               learning_rate=learning_rate))
  result = train.train(cfg, str(tmp_path), progress_bar=False)
  assert result["backbone"] == model.name
  assert result["test"]["ndcg@10"] >= (
      times * result["popularity"]["ndcg@10"])


def test_tensorboard_events_are_written_when_asked(tmp_path):
  train.train(tiny_config(steps=6, tensorboard=True), str(tmp_path),
              progress_bar=False)
  events = os.listdir(tmp_path / "tb")
  assert any(name.startswith("events.out.tfevents") for name in events)


def checkpoint_files(run_dir):
  """Every directory and file under DIR/checkpoints, files with their bytes."""
  root = os.path.join(run_dir, "checkpoints")
  out = {}
  for dirpath, _, files in os.walk(root):
    out[os.path.relpath(dirpath, root)] = None
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_resuming_a_finished_run_changes_nothing(tmp_path):
  cfg = tiny_config(steps=6)
  first = train.train(cfg, str(tmp_path), progress_bar=False)
  before = checkpoint_files(tmp_path)
  assert "latest/6" in before and "best/6" in before
  steps = []
  again = train.train(cfg, str(tmp_path), resume=True, progress_bar=False,
                      step_callback=steps.append)
  assert steps == []  # No step ran...
  assert checkpoint_files(tmp_path) == before  # ...and no checkpoint moved.
  assert again["steps"] == first["steps"] == 6
  assert again["test"] == first["test"]


# ------------------------------------------- optimizer options, end to end


def two_step_run(root, name, model=None, head=None, **train_kw):
  """2 steps, validated and checkpointed after each: (dir, result)."""
  cfg = tiny_config(steps=2, eval_every=1, keep_checkpoints=2,
                    learning_rate=1e-2, **train_kw)
  if model is not None:
    cfg = cfg.replace(model=model)
  if head is not None:
    cfg = cfg.replace(head=head)
  out = str(root / name)
  return out, train.train(cfg, out, progress_bar=False)


def params_at(run_dir, step):
  """The params of DIR's `latest` checkpoint at `step`, as numpy."""
  _, meta = checkpoints.read_meta(run_dir, "latest")
  cfg = checkpoint_meta.config_from_meta(meta, run_dir)
  state, _ = orbax_io.restore(
      orbax_io.open_existing(run_dir, "latest"), step,
      target=state_lib.abstract_state(cfg, "latest"))
  return jax.tree.map(np.asarray, state["params"])


def init_params_of(run_dir):
  """The params the run started from (init from its fitted config)."""
  _, meta = checkpoints.read_meta(run_dir, "latest")
  cfg = checkpoint_meta.config_from_meta(meta, run_dir)
  return jax.tree.map(np.asarray, models.init_params(
      cfg, jax.random.key(cfg.train.seed)))


def assert_finite_metrics(result):
  for split in ("valid", "test"):
    assert all(np.isfinite(v) for v in result[split].values()), result[split]


@pytest.fixture(scope="module")
def constant_run(tmp_path_factory):
  return two_step_run(tmp_path_factory.mktemp("constant"), "run")


def test_cosine_schedule_halves_the_last_of_two_steps(tmp_path, constant_run):
  const, _ = constant_run
  cos, result = two_step_run(tmp_path, "cos", schedule="cosine")
  assert_finite_metrics(result)
  # Step 1 at the full rate, as the constant run; step 2 (of 2) at half:
  # same gradient and moments, so half the constant run's second move.
  tree_close = lambda a, b: jax.tree.map(  # pylint: disable=unnecessary-lambda-assignment
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6),
      a, b)
  tree_close(params_at(cos, 1), params_at(const, 1))
  move = lambda run: jax.tree.map(  # pylint: disable=unnecessary-lambda-assignment
      lambda b, a: b - a, params_at(run, 2), params_at(run, 1))
  tree_close(move(cos), jax.tree.map(lambda d: 0.5 * d, move(const)))


def test_warmup_cosine_first_step_moves_nothing(tmp_path):
  run, result = two_step_run(tmp_path, "warm", schedule="warmup_cosine",
                             warmup_steps=1)
  assert_finite_metrics(result)
  # The learning rate warms up from 0: step 1 changes no parameter.
  chex.assert_trees_all_equal(params_at(run, 1),
               init_params_of(run))
  moved = jax.tree.leaves(jax.tree.map(
      lambda a, b: bool(np.any(a != b)), params_at(run, 2),
      params_at(run, 1)))
  assert any(moved)


def test_weight_decay_adds_the_decay_term_to_the_first_step(tmp_path,
                                                            constant_run):
  const, _ = constant_run
  decay = 0.5
  run, result = two_step_run(tmp_path, "wd", weight_decay=decay)
  assert_finite_metrics(result)
  # AdamW's first step is Adam's plus -lr * decay * params on kernels and
  # embeddings; biases, LayerNorms and alphas are not decayed.
  def check(path, wd, plain, p0):
    name = "/".join(str(k.key) for k in path)
    decayed = name.rsplit("/", 1)[-1] in ("kernel", "embedding")
    np.testing.assert_allclose(wd - plain,
                               -1e-2 * decay * p0 if decayed else 0 * p0,
                               rtol=1e-3, atol=1e-7, err_msg=name)
    return decayed

  decayed = jax.tree_util.tree_map_with_path(
      check, params_at(run, 1), params_at(const, 1), init_params_of(run))
  assert any(jax.tree.leaves(decayed)) and not all(jax.tree.leaves(decayed))


def test_tied_embeddings_train_with_no_head_kernel(tmp_path):
  run, result = two_step_run(tmp_path, "tied",
                             head=SoftmaxConfig(tie_embeddings=True))
  assert_finite_metrics(result)
  params, cfg, _ = evaluation.load_params(run)
  assert cfg.head.tie_embeddings is True
  assert set(params["head"]) == {"bias"}  # Scores read the item embedding.
