"""SkipRec: a per-user policy skips residual blocks of a deep NextItNet+.

  python experiments/skiprec.py --out runs/skiprec            # CPU, minutes
  python experiments/skiprec.py --out runs/skiprec --scale    # GPU

Data: two user populations over one item world (the embedded generator's
rules): `short` users follow mostly lag-1 successor rules, `long` users
mostly a lag-LONG_LAG rule. The backbone's blocks all have dilation 1, so
each block widens the receptive field by 6 items: a long user needs about
LONG_LAG / 6 blocks, a short one a single block. Users who need long-range
context should keep more blocks.

Arms (all on the same data; full-ranking metrics over all items):

  full          the NextItNet+ backbone (alpha blocks) at full depth
  skiprec/l=X   the backbone plus a policy, trained jointly (straight-through
                Gumbel, usage penalty lambda X) from `full`
  random_skip/l=X  `full` with each block kept at random with the usage of
                skiprec/l=X (no training)
  truncated/l=X  `full`'s bottom k blocks, k = round(usage x L), fine-tuned
                for as many steps as skiprec/l=X trains (truncated_untuned/l=X:
                the same blocks without fine-tuning)

Each arm records valid/test metrics, block_usage, infer_ms_per_user at
batch 1 and 256 (compile excluded, synchronised, median of repeats; skipping
arms run the faster of lax.cond and compaction, both recorded), and
train_time_s. Writes OUT/results.json, OUT/ndcg_vs_usage.png,
OUT/usage_by_group.png and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

from jaxrec import config as config_lib
from jaxrec import heads
from jaxrec import models
from jaxrec.data import pipeline, synthetic
from jaxrec.data.sequences import Interactions
from jaxrec.methods.skiprec import policy, skipping
from jaxrec.methods.skiprec.config import SkipRecConfig
from jaxrec import ranking
from jaxrec.surgery.checkpoint import save_start_checkpoint
from jaxrec.training import loop, state

absl_logging.set_verbosity(absl_logging.ERROR)

LONG_LAG = 30
# Conv dilations 1,2 / 2,4 / 4,8 / 8,16 repeated: the bottom block sees 6
# items back (enough for lag 1), the bottom three 42 (lag LONG_LAG).
DILATIONS = (1, 2, 4, 8)
CPU = dict(users=1000, items=200, embed_dim=32, num_blocks=16, max_len=40,
           batch_size=64, full_steps=1200, skip_steps=600, eval_every=200,
           lr=3e-3, lambdas=[0.0, 0.5, 2.0], repeats=5, batch1_users=32)
SCALE = dict(users=20000, items=2000, embed_dim=128, num_blocks=32,
             max_len=50, batch_size=256, full_steps=6000, skip_steps=2000,
             eval_every=1000, lr=1e-3, lambdas=[0.0, 0.5, 1.0, 2.0],
             repeats=20, batch1_users=64)
SETTINGS = CPU
SHOWN = ("ndcg@10", "hr@10", "mrr@5")
BATCHES = (1, 256)


# -------------------------------------------------------------------- data


def two_populations(users: int, items: int, seed: int
                    ) -> tuple[Interactions, np.ndarray]:
  """Events of `short` users (ids 1..U) then `long` users (U+1..2U) drawn
  over one item world; returns (interactions, is_long per user in id order)."""
  base = dict(users=users, items=items, topics=8, min_len=50, max_len=90,
              mean_len=70.0, len_sigma=0.2, lags=(1, LONG_LAG))
  short = synthetic.SyntheticSpec(name="skiprec_short", seed=seed,
                                  lag_probs=(0.6, 0.0), interest_prob=0.25,
                                  popularity_prob=0.15, **base)
  long = synthetic.SyntheticSpec(name="skiprec_long", seed=seed + 1,
                                 lag_probs=(0.1, 0.6), interest_prob=0.15,
                                 popularity_prob=0.15, **base)
  world = synthetic.make_world(short)
  # The long users' own mixtures and lengths over the same items and rules.
  long_world = dataclasses.replace(
      synthetic.make_world(long), popularity=world.popularity,
      topic_of=world.topic_of, succ=world.succ)
  parts = []
  for i, (spec, w) in enumerate(((short, world), (long, long_world))):
    events = synthetic._simulate(spec, w)  # pylint: disable=protected-access
    user_ids = np.repeat(np.arange(1, users + 1) + i * users, w.lengths)
    times = synthetic._timestamps(spec, w.lengths)  # pylint: disable=protected-access
    parts.append((user_ids, events, times))
  inter = Interactions(*(np.concatenate(a) for a in zip(*parts)),
                       name=f"skiprec_two_populations:{users}x2,{items},{seed}")
  return inter, np.r_[np.zeros(users, bool), np.ones(users, bool)]


# ----------------------------------------------------------------- configs


def base_config(s: dict[str, Any], seed: int) -> config_lib.Config:
  return config_lib.from_dict({
      "model": {"embed_dim": s["embed_dim"], "num_blocks": s["num_blocks"],
                "dilations": list(DILATIONS), "dropout": 0.1},
      "data": {"source": "synthetic", "max_len": s["max_len"],
               "min_user_count": 1, "min_item_count": 1},
      "train": {"batch_size": s["batch_size"], "steps": s["full_steps"],
                "eval_every": s["eval_every"], "learning_rate": s["lr"],
                "patience": 0, "seed": seed,
                # The loop's default until 2026-12-07, as in the records.
                "select_metric": "mrr@5"}})


def skip_config(cfg: config_lib.Config, s: dict[str, Any],
                lam: float) -> config_lib.Config:
  train = dataclasses.replace(cfg.train, steps=s["skip_steps"])
  return cfg.with_method(SkipRecConfig(mode="gumbel", lam=lam)).replace(
      train=train)


def gated_hidden(params, cfg: config_lib.Config, ids, gates,
                 mode: str = "masked"):
  """Hidden states under `gates` [L, B] (None: every block), skipping by
  `mode`; a model without a policy runs SkipRec's gate slot with them."""
  if gates is None:
    return models.hidden_states(params, cfg, ids)
  if cfg.method(SkipRecConfig.NAME) is None:
    cfg = cfg.with_method(SkipRecConfig())
  return skipping.hidden_states(params, cfg, ids, mode, gates)


# ----------------------------------------------------------------- timing


def scorer(cfg: config_lib.Config, mode: str):
  """(params, ids, gates) -> scores [B, V] of the next item: the inference
  a recommender serves (skipping `mode` when gates are given)."""
  head = heads.get(cfg.head.name)

  def score(params, ids, gates):
    h = gated_hidden(params, cfg, ids, gates, mode)[:, -1]
    ctx = head.prepare(params, cfg, h)
    return head.tile_scores(params, cfg, ctx, 0, cfg.model.num_items)

  return jax.jit(score)


def gate_fn(kind: str, cfg: config_lib.Config, usage: float, seed: int):
  """ids -> gates [L, B] for an arm (None: no gates)."""
  if kind == "skiprec":
    return lambda params, ids: policy.inference_gates(params, cfg, ids)
  if kind == "random_skip":
    def random_gates(params, ids):
      del params
      key = jax.random.fold_in(jax.random.key(seed), ids.sum())
      return jax.random.bernoulli(
          key, usage, (cfg.model.num_blocks, ids.shape[0])).astype(
              jnp.float32)
    return random_gates
  return lambda params, ids: None


def infer_ms(params, cfg, kind: str, mode: str, inputs: np.ndarray,
             s: dict[str, Any], usage: float = 1.0, seed: int = 0
             ) -> dict[str, float]:
  """Median ms per user of scoring, gates included, at batch 1 and 256."""
  gates_of = gate_fn(kind, cfg, usage, seed)
  score = scorer(cfg, mode if kind != "full" else "masked")

  @jax.jit
  def serve(params, ids):
    return score(params, ids, gates_of(params, ids))

  out = {}
  for b in BATCHES:
    if b == 1:
      batches = [inputs[i:i + 1] for i in range(s["batch1_users"])]
    else:
      batches = [np.resize(inputs, (b, inputs.shape[1]))]
    batches = [jnp.asarray(x) for x in batches]
    serve(params, batches[0]).block_until_ready()  # Compile.
    times = []
    for _ in range(s["repeats"]):
      t0 = time.perf_counter()
      for x in batches:
        serve(params, x).block_until_ready()
      times.append((time.perf_counter() - t0) / (len(batches) * b))
    out[str(b)] = float(np.median(times) * 1e3)
  return out


# ------------------------------------------------------------- evaluation


def metrics(params, cfg, kind: str, data, usage: float, seed: int
            ) -> tuple[dict[str, Any], dict[str, np.ndarray],
                       dict[str, np.ndarray]]:
  """valid/test full-ranking metrics and per-user usage under an arm's gates."""
  gates_of = gate_fn(kind, cfg, usage, seed)
  head = heads.get(cfg.head.name)

  @jax.jit
  def ranks_and_usage(params, inputs, targets):
    gates = gates_of(params, inputs)
    h = gated_hidden(params, cfg, inputs, gates)[:, -1]
    ctx = head.prepare(params, cfg, h)
    ranks = ranking.target_ranks(
        lambda start, size: head.tile_scores(params, cfg, ctx, start, size),
        cfg.model.num_items, targets, tile=cfg.train.loss_chunk)
    used = (jnp.ones(inputs.shape[0]) if gates is None else gates.mean(0))
    return ranks, used

  out, usage_by_split, ranks_by_split = {}, {}, {}
  for split in ("valid", "test"):
    inputs = getattr(data, f"{split}_inputs")
    targets = getattr(data, f"{split}_targets")
    all_ranks, all_used = [], []
    step = 256
    for start in range(0, len(targets), step):
      x, y = inputs[start:start + step], targets[start:start + step]
      pad = step - len(y)
      if pad:
        x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
        y = np.concatenate([y, np.ones(pad, y.dtype)])
      r, u = ranks_and_usage(params, x, y)
      all_ranks.append(np.asarray(r)[:step - pad])
      all_used.append(np.asarray(u)[:step - pad])
    ranks_by_split[split] = np.concatenate(all_ranks)
    out[split] = ranking.metrics_from_ranks(ranks_by_split[split])
    usage_by_split[split] = np.concatenate(all_used)
  return out, usage_by_split, ranks_by_split


def truncate(params, cfg, depth: int):
  """The bottom `depth` blocks of a model (the rest dropped)."""
  blocks = jax.tree.map(lambda a: a[:depth], params["blocks"])
  model = dataclasses.replace(cfg.model, num_blocks=depth)
  return {**params, "blocks": blocks}, cfg.replace(model=model)


# -------------------------------------------------------------------- arms


def arm_entry(params, cfg, kind, data, s, is_long, usage=1.0, seed=0,
              train_time=0.0) -> dict[str, Any]:
  result, used, ranks = metrics(params, cfg, kind, data, usage, seed)
  entry = {**result, "block_usage": float(np.mean(used["test"])),
           "train_time_s": train_time}
  if kind == "full":
    entry["infer_ms_per_user"] = infer_ms(params, cfg, "full", "masked",
                                          data.test_inputs, s)
  else:
    by_mode = {m: infer_ms(params, cfg, kind, m, data.test_inputs, s, usage,
                           seed) for m in ("cond", "compact", "masked")}
    entry["infer_ms_by_mode"] = by_mode
    entry["infer_ms_per_user"] = {
        b: min(by_mode["cond"][b], by_mode["compact"][b]) for b in by_mode[
            "cond"]}
    entry["faster_mode"] = {
        b: min(("cond", "compact"), key=lambda m: by_mode[m][b])
        for b in by_mode["cond"]}
  entry["usage_by_group"] = {
      "short": float(np.mean(used["test"][~is_long])),
      "long": float(np.mean(used["test"][is_long]))}
  entry["test_ndcg10_by_group"] = {
      "short": ranking.metrics_from_ranks(ranks["test"][~is_long])["ndcg@10"],
      "long": ranking.metrics_from_ranks(ranks["test"][is_long])["ndcg@10"]}
  entry["usage_hist"] = {
      g: np.histogram(used["test"][mask], bins=10, range=(0, 1))[0].tolist()
      for g, mask in (("short", ~is_long), ("long", is_long))}
  return entry


def run(out_dir: str, s: dict[str, Any], seed: int) -> dict[str, Any]:
  inter, is_long_user = two_populations(s["users"], s["items"], seed)
  cfg = base_config(s, seed)
  data = pipeline.build_sequences(inter, cfg.data,
                                  fingerprint=f"{inter.name}:{seed}")
  assert data.meta["num_users"] == len(is_long_user)  # No user filtered.
  is_long = is_long_user  # loo: valid/test rows are users in id order.
  arms: dict[str, Any] = {}

  full_dir = os.path.join(out_dir, "full")
  res = loop.train(cfg, full_dir, data=data, progress_bar=False)
  params, full_cfg, _ = state.load_params(full_dir)
  arms["full"] = arm_entry(params, full_cfg, "full", data, s, is_long,
                           train_time=res["train_time_s"])
  print(f"full: test ndcg@10 {arms['full']['test']['ndcg@10']:.4f}",
        flush=True)

  for lam in s["lambdas"]:
    tag = f"l={lam:g}"
    run_dir = os.path.join(out_dir, f"skiprec_{tag}")
    res = loop.train(skip_config(cfg, s, lam), run_dir, data=data,
                     init_from=full_dir, progress_bar=False)
    sp, scfg, _ = state.load_params(run_dir)
    entry = arm_entry(sp, scfg, "skiprec", data, s, is_long,
                      train_time=arms["full"]["train_time_s"]
                      + res["train_time_s"])
    entry["lambda"] = lam
    arms[f"skiprec/{tag}"] = entry
    u = entry["block_usage"]
    arms[f"random_skip/{tag}"] = arm_entry(params, full_cfg, "random_skip",
                                           data, s, is_long, usage=u,
                                           seed=seed)
    depth = max(1, int(round(u * full_cfg.model.num_blocks)))
    tp, tcfg = truncate(params, full_cfg, depth)
    arms[f"truncated_untuned/{tag}"] = arm_entry(tp, tcfg, "full", data, s,
                                                 is_long)
    start = os.path.join(out_dir, f"truncated_{tag}_start")
    save_start_checkpoint(start, tcfg, tp, data.fingerprint, [])
    ft_dir = os.path.join(out_dir, f"truncated_{tag}")
    res = loop.train(tcfg.replace(train=dataclasses.replace(
        tcfg.train, steps=s["skip_steps"])), ft_dir, data=data,
                     init_from=start, progress_bar=False)
    ftp, ftcfg, _ = state.load_params(ft_dir)
    arms[f"truncated/{tag}"] = arm_entry(
        ftp, ftcfg, "full", data, s, is_long,
        train_time=arms["full"]["train_time_s"] + res["train_time_s"])
    for name in (f"truncated_untuned/{tag}", f"truncated/{tag}"):
      arms[name]["block_usage"] = depth / cfg.model.num_blocks
      arms[name]["usage_by_group"] = {g: depth / cfg.model.num_blocks
                                      for g in ("short", "long")}
    print(f"skiprec {tag}: usage {u:.3f} (short "
          f"{entry['usage_by_group']['short']:.3f}, long "
          f"{entry['usage_by_group']['long']:.3f}), test ndcg@10 "
          f"{entry['test']['ndcg@10']:.4f}", flush=True)
  return arms


# ----------------------------------------------------------------- report


def targets(arms: dict[str, Any]) -> dict[str, Any]:
  """The issue's targets, checked for every skiprec arm using <= 60% of
  the blocks against `full` and the baselines at its usage; met if some
  arm meets all four (each arm's checks are recorded)."""
  full = arms["full"]
  ndcg = lambda a: a["test"]["ndcg@10"]  # pylint: disable=unnecessary-lambda-assignment
  per_arm = {}
  for name, arm in arms.items():
    if not name.startswith("skiprec/") or arm["block_usage"] > 0.6:
      continue
    tag = name.split("/", 1)[1]
    checks = {
        "keeps_97pct_of_full_ndcg10": ndcg(arm) >= 0.97 * ndcg(full),
        "beats_random_skip": ndcg(arm) > ndcg(arms[f"random_skip/{tag}"]),
        "beats_truncated": ndcg(arm) > ndcg(arms[f"truncated/{tag}"]),
        "batch256_time_at_most_75pct": arm["infer_ms_per_user"]["256"]
        <= 0.75 * full["infer_ms_per_user"]["256"]}
    per_arm[name] = {**checks, "met": all(checks.values())}
  met = [k for k, v in per_arm.items() if v["met"]]
  return {"per_arm": per_arm, "met": bool(met), "arms_meeting": met}


def table(arms: dict[str, Any]) -> str:
  rows = ["| arm | usage | usage short/long | " + " | ".join(
      f"test {m}" for m in SHOWN) + " | ndcg@10 short/long | ms/user b1 | "
          "ms/user b256 | train s |",
          "|" + " --- |" * (9 + len(SHOWN) - 2)]
  for name, a in arms.items():
    g, n = a["usage_by_group"], a["test_ndcg10_by_group"]
    rows.append(
        f"| {name} | {a['block_usage']:.3f} | {g['short']:.2f}/{g['long']:.2f}"
        f" | " + " | ".join(f"{a['test'][m]:.4f}" for m in SHOWN)
        + f" | {n['short']:.3f}/{n['long']:.3f}"
        + f" | {a['infer_ms_per_user']['1']:.3f} | "
        f"{a['infer_ms_per_user']['256']:.4f} | {a['train_time_s']:.0f} |")
  return "\n".join(rows)


def plot(arms: dict[str, Any], out_dir: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for kind, marker in (("full", "*"), ("skiprec", "o"),
                       ("random_skip", "x"), ("truncated", "s"),
                       ("truncated_untuned", "v")):
    pts = [a for k, a in arms.items() if k.split("/")[0] == kind]
    ys = [a["test"]["ndcg@10"] for a in pts]
    axes[0].scatter([a["block_usage"] for a in pts], ys, marker=marker,
                    label=kind)
    axes[1].scatter([a["infer_ms_per_user"]["256"] for a in pts], ys,
                    marker=marker, label=kind)
  axes[0].set_xlabel("block usage (blocks computed / (blocks x users))")
  axes[1].set_xlabel("inference ms per user, batch 256")
  for ax in axes:
    ax.set_ylabel("test NDCG@10")
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "ndcg_vs_usage.png"), dpi=120)
  plt.close(fig)
  skip_arms = [k for k in arms if k.startswith("skiprec/")]
  fig, axes = plt.subplots(1, len(skip_arms), figsize=(4 * len(skip_arms), 3),
                           squeeze=False)
  edges = np.linspace(0, 1, 11)
  for ax, name in zip(axes[0], skip_arms):
    for group in ("short", "long"):
      ax.stairs(arms[name]["usage_hist"][group], edges, label=group)
    ax.set_title(name)
    ax.set_xlabel("per-user block usage")
    ax.legend()
  axes[0][0].set_ylabel("test users")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "usage_by_group.png"), dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--scale", action="store_true",
                      help="GPU-sized data, model and steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--from-results", action="store_true",
                      help="recompute targets, table and plots from "
                           "OUT/results.json (no training or timing)")
  args = parser.parse_args()
  s = dict(SCALE if args.scale else SETTINGS)
  os.makedirs(args.out, exist_ok=True)
  if args.from_results:
    with open(os.path.join(args.out, "results.json"), encoding="utf-8") as f:
      results = json.load(f)
    arms = results["arms"]
    results["targets"] = targets(arms)
  else:
    t0 = time.time()
    arms = run(args.out, s, args.seed)
    results = {"arms": arms, "targets": targets(arms), "settings": s,
               "long_lag": LONG_LAG, "dilations": list(DILATIONS),
               "device": jax.devices()[0].device_kind,
               "platform": platform.platform(), "jax": jax.__version__,
               "wall_s": time.time() - t0}
  with open(os.path.join(args.out, "results.json"), "w",
            encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  plot(arms, args.out)
  print(table(arms))
  print("targets:", json.dumps(results["targets"]))


if __name__ == "__main__":
  main()
