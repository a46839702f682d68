"""SkipRec against full depth and the best static depth, at equal budgets.

  python experiments/skiprec.py --out results/skiprec         # 2 populations
  python experiments/skiprec.py --data movielens-100k --out results/skiprec_ml100k
  python experiments/skiprec.py --out runs/skiprec --scale    # GPU

Every arm of a seed starts from one `base`: a 16-block NextItNet+ (alpha
residual blocks, dilations 1,2,4,8 repeated) trained `base_steps`. Each arm
then trains `tune_steps` more, so every arm spends the same optimiser
steps (the harness refuses otherwise):

  full           the base at full depth, trained on (what SkipRec must match)
  skip_l{X}      the base plus a policy, trained jointly by straight-through
                 Gumbel with usage penalty lambda X (the paper's method)
  skip_rl        the same, the policy trained by self-critical REINFORCE
                 (reward hit@5 - rl_penalty x usage)
  static_{S}     the base's bottom k blocks, fine-tuned: k = round(usage x
                 16) with the usage skip_{S}'s policy has on validation, so
                 each static arm computes what its skip arm computes

The question the paper's claim needs answered: does a learned per-user
policy beat the best fixed depth of the same cost, trained as long? Every
checkpoint is chosen on validation; test is read once, by the harness,
after every arm trained. Inference (batch 256 of validation histories,
top 10 over all items) is timed with real skipping, the faster of a
per-block `lax.cond` and compaction, in rounds interleaved over the arms.

Data: `two_populations` (default) is 1,000 "short" users (mostly lag-1
rules) and 1,000 "long" users (mostly a lag-30 rule) over one 200-item
world: the bottom block sees 6 items back, the bottom three 42, so a
per-user depth could help here. `--data NAME` takes any data source
(MovieLens-100k: leave-one-out, min counts 1).

The policy's diversity is measured on validation histories: distinct masks
over users, the share of users on the most common mask, the mean entropy
of each user's keep probabilities, and usage per group (the two
populations; on other data, histories shorter than the window against
full windows).

Writes OUT/results.json (the harness's, plus `policy` per skip arm,
`static_depth` per static arm, `claims` and `settings`), table.md,
results.png, ndcg_vs_usage.png and summary.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # pylint: disable=wrong-import-position
from jaxrec import config as config_lib  # pylint: disable=wrong-import-position
from jaxrec import heads, models  # pylint: disable=wrong-import-position
from jaxrec.data import pipeline, synthetic  # pylint: disable=wrong-import-position
from jaxrec.data.sequences import Interactions  # pylint: disable=wrong-import-position
from jaxrec.methods.skiprec import policy, skipping  # pylint: disable=wrong-import-position
from jaxrec.methods.skiprec.config import SkipRecConfig  # pylint: disable=wrong-import-position
from jaxrec.surgery.checkpoint import save_start_checkpoint  # pylint: disable=wrong-import-position
from jaxrec.training.state import load_params  # pylint: disable=wrong-import-position

absl_logging.set_verbosity(absl_logging.ERROR)

TWO_POPULATIONS = "two_populations"
LONG_LAG = 30
# Conv dilations 1,2 / 2,4 / 4,8 / 8,16 repeated: the bottom block sees 6
# items back (enough for lag 1), the bottom three 42 (lag LONG_LAG).
DILATIONS = (1, 2, 4, 8)
CPU = dict(users=1000, items=200, embed_dim=32, num_blocks=16, max_len=40,
           batch_size=64, base_steps=1200, tune_steps=600, eval_every=200,
           lr=3e-3, lambdas=(0.5, 2.0), rl_penalty=0.1, infer_batch=256)
SCALE = dict(users=20000, items=2000, embed_dim=128, num_blocks=32,
             max_len=50, batch_size=256, base_steps=6000, tune_steps=2000,
             eval_every=1000, lr=1e-3, lambdas=(0.5, 1.0, 2.0),
             rl_penalty=0.1, infer_batch=256)
# The paper's claims (Chen et al., AAAI 2021; ../shared/SEEDS.md).
PAPER = {"accuracy": "comparable or better accuracy than the full model",
         "speed": "much less inference time (about 30-40% of blocks skipped "
                  "on ML-20M at no loss)",
         "per_user": "the policy chooses each user's depth"}


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


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every arm shares: settings, the base config, data and groups."""
  s: dict[str, Any]
  base: config_lib.Config
  data: Any
  groups: dict[str, np.ndarray]  # Name -> mask over validation rows.
  out: str

  def config(self, seed: int, steps: int) -> config_lib.Config:
    return self.base.replace(train=dataclasses.replace(
        self.base.train, steps=steps, seed=seed))


def make_setup(s: dict[str, Any], source: str, out: str,
               world_seed: int = 0) -> Setup:
  data_cfg = {"source": "synthetic" if source == TWO_POPULATIONS else source,
              "max_len": s["max_len"], "min_user_count": 1,
              "min_item_count": 1}
  base = config_lib.from_dict({
      "model": {"embed_dim": s["embed_dim"], "num_blocks": s["num_blocks"],
                "dilations": list(DILATIONS), "dropout": 0.1},
      "data": data_cfg,
      "train": {"batch_size": s["batch_size"], "eval_every": s["eval_every"],
                "learning_rate": s["lr"], "patience": 0,
                "select_metric": "ndcg@10"}}).validate()
  if source == TWO_POPULATIONS:
    inter, is_long = two_populations(s["users"], s["items"], world_seed)
    data = pipeline.build_sequences(inter, base.data,
                                    fingerprint=f"{inter.name}:{world_seed}")
    # Leave-one-out: validation rows are the users in id order.
    if data.meta["num_users"] != len(is_long):
      raise SystemExit(f"{inter.name}: users were filtered out")
    groups = {"short users": ~is_long, "long users": is_long}
  else:
    data = pipeline.load_data(base.data)
    full = (data.valid_inputs != 0).all(axis=1)
    groups = {"history < window": ~full, "full window": full}
  return Setup(s, base, data, groups, out)


# -------------------------------------------------------------------- arms


def trained_base(setup: Setup, seed: int) -> harness.Trial:
  """The seed's shared base (trained once, then read back)."""
  return harness.shared_stage(
      setup.out, "base", seed, lambda work: harness.train_run(
          setup.config(seed, setup.s["base_steps"]),
          os.path.join(work, "run"), setup.data))


def tuned_arm(setup: Setup, name: str,
              method: SkipRecConfig | None = None) -> harness.Arm:
  """The base trained `tune_steps` more: at full depth (`full`), or with a
  SkipRec policy added and trained jointly."""
  def train(seed: int, work: str) -> harness.Trial:
    base = trained_base(setup, seed)
    cfg = setup.config(seed, setup.s["tune_steps"])
    if method is not None:
      cfg = cfg.with_method(method)
    return harness.train_run(cfg, os.path.join(work, "run"), setup.data,
                             steps_before=base.steps, init_from=base.run_dir)
  return harness.Arm(name, train, infer=lambda d: serving(d, setup))


def static_arm(setup: Setup, skip_name: str) -> harness.Arm:
  """The base's bottom blocks, as many as `skip_name`'s policy keeps on
  validation, fine-tuned as long as the skip arm trained."""
  name = "static_" + skip_name.removeprefix("skip_")

  def train(seed: int, work: str) -> harness.Trial:
    base = trained_base(setup, seed)
    skip = harness.finished_trial(setup.out, skip_name, seed)
    if skip is None:  # Arms train in list order: the skip arm comes first.
      raise harness.HarnessError(f"{name}: {skip_name} has not trained")
    params, cfg, _ = load_params(skip.run_dir)
    usage = float(np.mean(policy.block_usage(params, cfg,
                                             setup.data.valid_inputs)))
    depth = max(1, int(round(usage * cfg.model.num_blocks)))
    start = os.path.join(work, "start")
    if not os.path.isdir(os.path.join(start, "checkpoints")):
      shallow, shallow_cfg = truncate(*load_params(base.run_dir)[:2], depth)
      save_start_checkpoint(start, shallow_cfg, shallow,
                            setup.data.fingerprint, [])
    harness.write_json(os.path.join(work, "static_depth.json"),
                       {"depth": depth, "valid_usage_of": skip_name,
                        "usage": usage})
    return harness.train_run(setup.config(seed, setup.s["tune_steps"]),
                             os.path.join(work, "run"), setup.data,
                             steps_before=base.steps, init_from=start)
  return harness.Arm(name, train, infer=lambda d: serving(d, setup))


def truncate(params: models.Params, cfg: config_lib.Config, depth: int):
  """The bottom `depth` blocks of a model (the rest dropped)."""
  blocks = jax.tree.map(lambda a: a[:depth], params["blocks"])
  model = dataclasses.replace(cfg.model, num_blocks=depth)
  return {**params, "blocks": blocks}, cfg.replace(model=model)


def arms_of(setup: Setup) -> list[harness.Arm]:
  arms = [tuned_arm(setup, "full")]
  skips = {f"skip_l{lam:g}": SkipRecConfig(mode="gumbel", lam=lam)
           for lam in setup.s["lambdas"]}
  if setup.s["rl_penalty"] is not None:  # None: no RL arm.
    skips["skip_rl"] = SkipRecConfig(mode="rl",
                                     rl_penalty=setup.s["rl_penalty"])
  for name, method in skips.items():
    arms += [tuned_arm(setup, name, method), static_arm(setup, name)]
  return arms


# ---------------------------------------------------------------- serving


def serving(run_dir: str, setup: Setup):
  """A call serving one batch (top 10 over every item) from the run's best
  checkpoint; a skip model skips for real, by the faster of `lax.cond`
  and compaction on this batch."""
  params, cfg, _ = load_params(run_dir)
  ids = jnp.asarray(np.resize(setup.data.valid_inputs,
                              (setup.s["infer_batch"],
                               setup.data.valid_inputs.shape[1])))
  head = heads.get(cfg.head.name)

  def make(mode: str | None):
    @jax.jit
    def serve(params, ids):
      if mode is None:
        h = models.hidden_states(params, cfg, ids)
      else:
        h = skipping.hidden_states(params, cfg, ids, mode,
                                   policy.inference_gates(params, cfg, ids))
      h = h[:, -1]
      ctx = head.prepare(params, cfg, h)
      scores = head.tile_scores(params, cfg, ctx, 0, cfg.model.num_items)
      return jax.lax.top_k(scores, 10)
    return lambda: jax.block_until_ready(serve(params, ids))

  if cfg.method(SkipRecConfig.NAME) is None:
    return make(None)
  calls = {mode: make(mode) for mode in ("cond", "compact")}
  return min(calls.values(), key=_fastest_of_three)


def _fastest_of_three(call) -> float:
  call()  # Compile.
  times = []
  for _ in range(3):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return min(times)


# ----------------------------------------------------------------- policy


def policy_stats(run_dir: str, setup: Setup) -> dict[str, Any]:
  """How the policy of a run spreads over validation users."""
  params, cfg, _ = load_params(run_dir)
  mcfg = cfg.method(SkipRecConfig.NAME)
  keep = jax.jit(lambda p, ids: jax.nn.softmax(policy.logits(
      p[SkipRecConfig.NAME], cfg.model, mcfg, ids), axis=-1)[..., policy.KEEP])
  inputs = setup.data.valid_inputs
  probs = np.concatenate([np.asarray(keep(params, inputs[i:i + 512]))
                          for i in range(0, len(inputs), 512)])  # [N, L]
  # Inference keeps a block where keep > skip, i.e. keep_p > 1/2.
  masks = probs > 0.5
  _, counts = np.unique(masks, axis=0, return_counts=True)
  p = np.clip(probs, 1e-7, 1 - 1e-7)
  entropy = -(p * np.log2(p) + (1 - p) * np.log2(1 - p)).mean(axis=1)
  usage = masks.mean(axis=1)
  return {"distinct_masks": int(len(counts)),
          "modal_mask_share": float(counts.max() / len(masks)),
          "entropy_bits_per_block": float(entropy.mean()),
          "usage": float(usage.mean()),
          "usage_by_group": {g: float(usage[m].mean())
                             for g, m in setup.groups.items()}}


def policies(results: dict[str, Any], setup: Setup) -> dict[str, Any]:
  """Per skip arm: each seed's policy statistics and their means."""
  out = {}
  for name, arm in results["arms"].items():
    if not name.startswith("skip"):
      continue
    per_seed = [policy_stats(d, setup) for d in arm["run_dirs"]]
    mean = {k: float(np.mean([p[k] for p in per_seed]))
            for k in ("distinct_masks", "modal_mask_share",
                      "entropy_bits_per_block", "usage")}
    mean["usage_by_group"] = {
        g: float(np.mean([p["usage_by_group"][g] for p in per_seed]))
        for g in setup.groups}
    out[name] = {"seeds": per_seed, "mean": mean}
  return out


def static_depths(results: dict[str, Any]) -> dict[str, Any]:
  out = {}
  for name, arm in results["arms"].items():
    if name.startswith("static"):
      records = []
      for run_dir in arm["run_dirs"]:
        path = os.path.join(os.path.dirname(run_dir), "static_depth.json")
        with open(path, encoding="utf-8") as f:
          records.append(json.load(f))
      out[name] = records
  return out


# ----------------------------------------------------------------- claims


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
  """Each skip arm against `full` and against its static depth, paired by
  seed; a difference under one validation user's worth is no difference."""
  arms = results["arms"]
  full = arms["full"]
  test = lambda a: np.array(a["test"]["ndcg@10"]["values"])  # pylint: disable=unnecessary-lambda-assignment
  rows = []
  for name, arm in arms.items():
    if not name.startswith("skip"):
      continue
    static = arms["static_" + name.removeprefix("skip_")]
    vs_static = test(arm) - test(static)
    ahead = int((vs_static > 0).sum())
    if ahead == len(vs_static):
      verdict = "beats it on every seed"
    elif ahead == 0:
      verdict = "loses to it on every seed"
    else:
      verdict = f"ahead on {ahead} of {len(vs_static)} seeds: no clear winner"
    pol = results["policy"][name]["mean"]
    rows.append({
        "arm": name, "usage": pol["usage"],
        "ndcg_vs_full": float(test(arm).mean() / test(full).mean()),
        "infer_vs_full": (arm["infer_ms"]["median"]
                          / full["infer_ms"]["median"])
        if "infer_ms" in arm and "infer_ms" in full else None,
        "minus_static": {"mean": float(vs_static.mean()),
                         "values": vs_static.tolist()},
        "vs_static": verdict,
        "distinct_masks": pol["distinct_masks"],
        "one_mask_for_all": pol["distinct_masks"] <= 1.0})
  return rows


def claims_table(rows: list[dict[str, Any]]) -> str:
  out = ["| skip arm | blocks used | NDCG@10 vs full | batch-256 time vs "
         "full | minus static depth (per seed) | vs static depth | "
         "distinct masks |", "| --- | ---: | ---: | ---: | --- | --- | ---: |"]
  for r in rows:
    infer = "-" if r["infer_vs_full"] is None else f"{r['infer_vs_full']:.2f}"
    out.append(
        f"| {r['arm']} | {r['usage']:.3f} | {r['ndcg_vs_full']:.3f} | "
        f"{infer} | {r['minus_static']['mean']:+.4f} ("
        + ", ".join(f"{v:+.4f}" for v in r["minus_static"]["values"])
        + f") | {r['vs_static']} | {r['distinct_masks']:.1f} |")
  return "\n".join(out)


def policy_table(pols: dict[str, Any]) -> str:
  groups = list(next(iter(pols.values()))["mean"]["usage_by_group"])
  out = ["| skip arm | usage | " + " | ".join(f"usage, {g}" for g in groups)
         + " | distinct masks | users on the commonest mask | keep "
         "entropy (bits/block) |", "|" + " --- |" * (5 + len(groups))]
  for name, pol in pols.items():
    m = pol["mean"]
    out.append(f"| {name} | {m['usage']:.3f} | " + " | ".join(
        f"{m['usage_by_group'][g]:.3f}" for g in groups)
               + f" | {m['distinct_masks']:.1f} | {m['modal_mask_share']:.3f}"
               f" | {m['entropy_bits_per_block']:.3f} |")
  return "\n".join(out)


def plot_usage(results: dict[str, Any], path: str) -> None:
  """Test NDCG@10 against the share of blocks computed, per arm."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6, 4))
  depth = {n: np.mean([r["depth"] for r in recs])
           for n, recs in results["static_depth"].items()}
  blocks = results["settings"]["num_blocks"]
  for name, arm in results["arms"].items():
    if name.startswith("skip"):
      x, marker = results["policy"][name]["mean"]["usage"], "o"
    elif name.startswith("static"):
      x, marker = depth[name] / blocks, "s"
    else:
      x, marker = 1.0, "*"
    ndcg = arm["test"]["ndcg@10"]
    ax.errorbar([x], [ndcg["mean"]], yerr=[ndcg["std"]], fmt=marker,
                capsize=4, label=name)
  ax.set_xlabel("share of blocks computed")
  ax.set_ylabel(f"test NDCG@10 (mean +- std, {len(results['seeds'])} seeds)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=__doc__)
  parser.add_argument("--out", required=True)
  parser.add_argument("--data", default=TWO_POPULATIONS,
                      help=f"{TWO_POPULATIONS} (default) or a data source")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--max-len", type=int, default=0,
                      help="the window (0: the settings')")
  parser.add_argument("--lambdas", default="",
                      help="usage penalties of the Gumbel arms, comma "
                           "separated (default: the settings')")
  parser.add_argument("--rl-penalty", default="",
                      help="the RL arm's penalty, or none for no RL arm "
                           "(default: the settings')")
  parser.add_argument("--scale", action="store_true",
                      help="GPU-sized data, model and steps")
  args = parser.parse_args()
  s = dict(SCALE if args.scale else CPU)
  if args.max_len:
    s["max_len"] = args.max_len
  if args.lambdas:
    s["lambdas"] = tuple(float(x) for x in args.lambdas.split(","))
  if args.rl_penalty:
    s["rl_penalty"] = (None if args.rl_penalty == "none"
                       else float(args.rl_penalty))
  seeds = tuple(int(x) for x in args.seeds.split(","))
  setup = make_setup(s, args.data, args.out)
  results = harness.run_experiment(
      "skiprec", arms_of(setup), seeds, args.out, args.data,
      test=harness.tested_on(setup.data))
  results["policy"] = policies(results, setup)
  results["static_depth"] = static_depths(results)
  results["settings"] = {**s, "dilations": list(DILATIONS),
                         "long_lag": LONG_LAG, "data": args.data}
  results["claims"] = claims(results)
  results["paper"] = PAPER
  harness.write_json(os.path.join(args.out, "results.json"), results)
  plot_usage(results, os.path.join(args.out, "ndcg_vs_usage.png"))
  with open(os.path.join(args.out, "table.md"), encoding="utf-8") as f:
    summary = [f.read().rstrip(), "", claims_table(results["claims"]), "",
               policy_table(results["policy"])]
  with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(summary) + "\n")
  print("\n".join(summary), flush=True)


if __name__ == "__main__":
  main()
