"""experiments/tune.py: deterministic trials, selection on validation only,
a best.yaml that `jaxrec train --config` reads, resumable."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "experiments"))
import tune  # pylint: disable=wrong-import-position
from jaxrec import cli  # pylint: disable=wrong-import-position
from jaxrec.cli import flags  # pylint: disable=wrong-import-position


class ValidOnly(dict):
  """A trial record whose every field but `valid` is off limits."""

  def __getitem__(self, key):
    if key != "valid":
      raise AssertionError(f"selection read {key!r}")
    return super().__getitem__(key)


def test_selection_reads_only_validation_metrics():
  trials = [ValidOnly(valid={"ndcg@10": v}, test_for_the_record={
      "ndcg@10": 1 - v}) for v in (0.2, 0.5, 0.3)]
  assert tune.select_best(trials, "ndcg@10") is trials[1]


def test_trial_values_are_a_pure_function_of_seed_and_trial():
  assert tune.sample(0, 3, "nextitnet") == tune.sample(0, 3, "nextitnet")
  assert tune.sample(0, 3, "nextitnet") != tune.sample(1, 3, "nextitnet")
  values = [tune.sample(0, i, "sasrec") for i in range(20)]
  assert all(2e-4 <= v["learning_rate"] <= 5e-3 for v in values)
  assert {v["num_blocks"] for v in values} <= {1, 2, 3}


@pytest.mark.slow
def test_a_search_writes_trials_best_yaml_and_a_plot_and_resumes(
    tmp_path, monkeypatch, capsys):
  base = tmp_path / "base.yaml"
  base.write_text("data:\n  max_len: 12\ntrain:\n  steps: 4\n"
                  "  eval_every: 2\n  eval_batch_size: 64\n")
  out = tmp_path / "tune"
  argv = ["tune.py", "--data", "synthetic:tiny", "--model", "nextitnet",
          "--out", str(out), "--trials", "2", "--config", str(base)]
  monkeypatch.setattr(sys, "argv", argv)
  tune.main()
  with open(out / "trials.jsonl") as f:
    trials = [json.loads(line) for line in f]
  assert [t["trial"] for t in trials] == [0, 1]
  best = max(trials, key=lambda t: t["valid"]["ndcg@10"])
  assert f"best: trial {best['trial']}" in capsys.readouterr().out
  assert os.path.getsize(out / "tune.png") > 0
  args = cli.build_parser().parse_args(
      ["train", "--out", "x", "--config", str(out / "best.yaml")])
  cfg = flags.config_from_args(args)
  assert cfg.model.embed_dim == best["values"]["embed_dim"]
  assert cfg.train.learning_rate == best["values"]["learning_rate"]
  assert cfg.model.num_items == 0 and cfg.train.steps == 4
  # A rerun with the same options finds both trials done.
  monkeypatch.setattr(sys, "argv", argv)
  tune.main()
  with open(out / "trials.jsonl") as f:
    assert len(f.readlines()) == 2


def stat(*values):
  return {"mean": float(np.mean(values)), "std": float(np.std(values)),
          "values": list(values)}


def test_accuracy_table_shows_seeds_tuned_and_popularity_rows():
  import accuracy  # pylint: disable=import-outside-toplevel
  metrics = {"ndcg@10": 0.3, "hr@10": 0.5, "mrr@5": 0.2}
  results = {"models": {"sasrec": {
      "default": {"seeds": [0, 1],
                  "test": {m: stat(v - 0.01, v + 0.01)
                           for m, v in metrics.items()},
                  "valid": {"ndcg@10": stat(0.31, 0.31)},
                  "train_time_s": stat(10.0, 14.0),
                  "time_to_95_s": stat(5.0, 7.0),
                  "steps_to_95": stat(40, 60), "popularity": metrics},
      "tuned": {"test": {**metrics, "ndcg@10": 0.4},
                "valid": {"ndcg@10": 0.41}, "train_time_s": 30.0,
                "trials": 10}}}}
  table = accuracy.markdown(results).splitlines()
  assert table[2] == ("| sasrec | default (2 seeds) | 0.3000 ± 0.0100 | "
                      "0.5000 ± 0.0100 | 0.2000 ± 0.0100 | 0.3100 ± 0.0000 "
                      "| 12 | 6 | 50 |")
  assert table[3].startswith("| sasrec | tuned (best of 10) | 0.4000 |")
  assert table[4].startswith("| popularity | | 0.3000 |")


def test_time_to_quality_is_the_first_validation_at_95_percent_of_best():
  import accuracy  # pylint: disable=import-outside-toplevel
  points = [(1.0, 0.10), (2.0, 0.30), (3.0, 0.39), (4.0, 0.40), (5.0, 0.38)]
  assert accuracy.time_to_quality(points) == 3.0  # 0.39 >= 0.95 * 0.40
  assert accuracy.time_to_quality([]) is None


def test_accuracy_keeps_earlier_rows_only_under_the_same_protocol(tmp_path):
  import accuracy  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "results.json")
  assert accuracy.earlier_rows(path, "movielens-100k", 1, [0, 1, 2]) == {}
  with open(path, "w") as f:
    json.dump({"data": "movielens-100k", "min_count": 1, "seeds": [0, 1, 2],
               "models": {"sasrec": {"default": {}}}}, f)
  assert list(accuracy.earlier_rows(path, "movielens-100k", 1,
                                    [0, 1, 2])) == ["sasrec"]
  assert accuracy.earlier_rows(path, "movielens-100k", 5, [0, 1, 2]) == {}
  assert accuracy.earlier_rows(path, "movielens-100k", 1, [0]) == {}


@pytest.mark.slow
def test_accuracy_runs_every_seed_and_writes_curves_and_plot(
    tmp_path, monkeypatch):
  import accuracy  # pylint: disable=import-outside-toplevel
  base = accuracy.default_config

  def tiny(source, model, min_count, seed):
    cfg = base(source, model, min_count, seed)
    return cfg.replace(
        model=dataclasses.replace(cfg.model, embed_dim=8, num_blocks=1),
        data=dataclasses.replace(cfg.data, max_len=10),
        train=dataclasses.replace(cfg.train, steps=4, eval_every=2,
                                  batch_size=16))

  monkeypatch.setattr(accuracy, "default_config", tiny)
  monkeypatch.setattr(sys, "argv", [
      "accuracy.py", "--data", "synthetic:tiny", "--models", "gru4rec",
      "--seeds", "0,1", "--trials", "0", "--out", str(tmp_path)])
  accuracy.main()
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  d = results["models"]["gru4rec"]["default"]
  assert results["selection"] == "valid" and d["seeds"] == [0, 1]
  assert len(d["test"]["ndcg@10"]["values"]) == 2
  assert [len(c) for c in d["curves"]] == [2, 2]
  assert set(d["steps_to_95"]["values"]) <= {2, 4}
  assert (tmp_path / "time_to_quality.png").exists()
  # Run again over the same OUT: the finished runs are read back, not
  # retrained, and test the same.
  accuracy.main()
  with open(tmp_path / "results.json") as f:
    again = json.load(f)["models"]["gru4rec"]["default"]
  assert again["test"] == d["test"] and again["steps"] == d["steps"]
  assert again["curves"] == d["curves"]
