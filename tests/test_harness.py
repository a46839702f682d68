"""experiments/harness.py: test is read once, after training and choosing
on validation; budgets are equal; a killed experiment resumes; the record."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..",
                                "experiments"))
import harness  # pylint: disable=wrong-import-position
from harness import Arm, HarnessError, Trial  # pylint: disable=wrong-import-position
from jaxrec import config  # pylint: disable=wrong-import-position
from jaxrec.models.nextitnet import NextItNetConfig  # pylint: disable=wrong-import-position

SEEDS = (0, 1, 2)


def read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def fake_arm(name, valid, test_value=None, steps=100, events=None, **kw):
  """An arm whose trial has validation `valid(seed)`; its test metrics
  (through `fake_test`) are `test_value` or the validation's."""

  def train(seed, work):
    if events is not None:
      events.append(("train", name, seed))
    value = valid(seed)
    with open(os.path.join(work, "test.json"), "w", encoding="utf-8") as f:
      json.dump({"ndcg@10": value if test_value is None else test_value}, f)
    return Trial(run_dir=work, steps=steps(seed) if callable(steps) else steps,
                 params=10,
                 valid={"ndcg@10": value, "hr@10": 2 * value},
                 train_time_s=1.0, curve=((1.0, value),))

  return Arm(name, train, **kw)


def fake_test(events=None):
  def test(trial):
    if events is not None:
      events.append(("test", os.path.basename(os.path.dirname(
          trial.run_dir)), None))
    with open(os.path.join(trial.run_dir, "test.json"), encoding="utf-8") as f:
      return json.load(f)
  return test


def run(tmp_path, arms, **kw):
  kw.setdefault("test", fake_test())
  return harness.run_experiment("toy", arms, SEEDS, str(tmp_path), "toy",
                                **kw)


def test_test_is_read_only_after_every_trial_and_only_for_chosen_arms(
    tmp_path):
  events = []
  arms = [fake_arm("base", lambda s: 0.1, events=events),
          fake_arm("m_a1", lambda s: 0.2, events=events, variant_of="m",
                   knobs={"a": 1}),
          fake_arm("m_a2", lambda s: 0.3, events=events, variant_of="m",
                   knobs={"a": 2})]
  run(tmp_path, arms, test=fake_test(events))
  kinds = [e[0] for e in events]
  assert kinds == ["train"] * 9 + ["test"] * 6
  assert {e[1] for e in events if e[0] == "test"} == {"base", "m_a2"}


def test_a_variant_is_chosen_by_validation_even_when_test_disagrees(
    tmp_path):
  arms = [fake_arm("m_a1", lambda s: 0.30, test_value=0.1, variant_of="m",
                   knobs={"a": 1}),
          fake_arm("m_a2", lambda s: 0.20, test_value=0.9, variant_of="m",
                   knobs={"a": 2})]
  out = run(tmp_path, arms)
  assert out["arms"]["m"]["selected"] == {"a": 1}
  assert out["arms"]["m"]["test"]["ndcg@10"]["mean"] == pytest.approx(0.1)
  assert set(out["arms"]["m"]["variants"]) == {"m_a1", "m_a2"}


def test_variants_are_chosen_by_their_mean_over_seeds(tmp_path):
  arms = [fake_arm("m_a1", lambda s: [0.5, 0.1, 0.1][s], variant_of="m",
                   knobs={"a": 1}),
          fake_arm("m_a2", lambda s: 0.3, variant_of="m", knobs={"a": 2})]
  assert run(tmp_path, arms)["arms"]["m"]["selected"] == {"a": 2}


def test_unequal_budgets_are_refused_naming_the_arms(tmp_path):
  arms = [fake_arm("scratch", lambda s: 0.1, steps=100),
          fake_arm("grown", lambda s: 0.1, steps=160)]
  with pytest.raises(HarnessError, match="unequal budgets.*scratch.*grown"):
    run(tmp_path, arms)


def test_an_arm_whose_budget_is_compared_says_so_and_is_marked(tmp_path):
  arms = [fake_arm("scratch", lambda s: 0.1, steps=100),
          fake_arm("early", lambda s: 0.1, steps=40, budget="own")]
  out = run(tmp_path, arms)
  assert out["arms"]["early"]["budget"] == "own"
  assert "early*" in harness.markdown_table(out)


def test_an_own_budget_stopping_at_other_steps_per_seed_lists_them(
    tmp_path):
  arms = [fake_arm("early", lambda s: 0.1, steps=lambda s: 40 + 10 * s,
                   budget="own")]
  out = run(tmp_path, arms)
  assert out["arms"]["early"]["steps"] == [40, 50, 60]
  assert "| early* | 10 | 40 / 50 / 60 |" in harness.markdown_table(out)


def test_a_killed_experiment_trains_only_what_is_missing(tmp_path):
  calls = []

  def flaky(seed, work):
    calls.append(seed)
    if seed == 1 and len(calls) == 2:
      raise KeyboardInterrupt  # Killed during the second trial.
    return fake_arm("b", lambda s: 0.2).train(seed, work)

  arms = [fake_arm("a", lambda s: 0.1), Arm("b", flaky)]
  with pytest.raises(KeyboardInterrupt):
    run(tmp_path, arms)
  assert os.path.exists(tmp_path / "runs" / "b" / "seed0" / "trial.json")
  calls.clear()
  out = run(tmp_path, arms)
  assert calls == [1, 2]
  assert out["arms"]["b"]["valid"]["ndcg@10"]["values"] == [0.2] * 3


def test_results_hold_the_schema_a_table_and_a_plot(tmp_path):
  out = run(tmp_path, [fake_arm("a", lambda s: 0.1 + s / 100),
                       fake_arm("b", lambda s: 0.2)])
  on_disk = read_json(tmp_path / "results.json")
  assert on_disk == json.loads(json.dumps(out))
  assert on_disk["selection"] == "valid" and on_disk["seeds"] == [0, 1, 2]
  a = on_disk["arms"]["a"]
  assert a["steps"] == 100 and a["params"] == 10
  assert a["valid"]["ndcg@10"]["values"] == pytest.approx([0.1, 0.11, 0.12])
  assert a["valid"]["ndcg@10"]["mean"] == pytest.approx(0.11)
  assert a["test"]["ndcg@10"]["std"] == pytest.approx(0.0081649, abs=1e-6)
  table = (tmp_path / "table.md").read_text()
  assert "| a | 10 | 100 | 0.1100 +- 0.0082" in table
  assert (tmp_path / "results.png").stat().st_size > 0


def test_inference_is_timed_in_rounds_interleaved_over_arms(tmp_path):
  calls = []

  def infer(name):
    return lambda run_dir: (lambda: calls.append(name))

  arms = [fake_arm("a", lambda s: 0.1, infer=infer("a")),
          fake_arm("b", lambda s: 0.1, infer=infer("b")),
          fake_arm("c", lambda s: 0.1)]
  out = run(tmp_path, arms, timing_rounds=3)
  assert calls == ["a", "b"] + ["a", "b"] * 3  # Warm-up, then rounds.
  assert len(out["arms"]["a"]["infer_ms"]["values"]) == 3
  assert "infer_ms" not in out["arms"]["c"]


def test_repeated_names_and_seeds_are_refused(tmp_path):
  with pytest.raises(HarnessError, match="repeat"):
    run(tmp_path, [fake_arm("a", lambda s: 0.1), fake_arm("a", lambda s: 0.1)])
  with pytest.raises(HarnessError, match="distinct seeds"):
    harness.run_experiment("toy", [fake_arm("a", lambda s: 0.1)], (0, 0),
                           str(tmp_path), "toy")


def test_a_name_that_cannot_be_a_checkpoint_directory_is_refused(tmp_path):
  with pytest.raises(HarnessError, match=r"nextitnet\[C=8\]"):
    run(tmp_path, [fake_arm("nextitnet[C=8]", lambda s: 0.1)])
  assert not (tmp_path / "runs").exists()  # Refused before any training.
  run(tmp_path, [fake_arm("adjacent/paper", lambda s: 0.1),
                 fake_arm("skip_l0.5", lambda s: 0.1)])


def test_a_harness_run_holds_no_test_numbers_until_the_harness_tests(
    tmp_path):
  cfg = config.Config(
      model=NextItNetConfig(num_blocks=2, embed_dim=8),
      data=config.DataConfig(source="synthetic:tiny"),
      train=config.TrainConfig(steps=6, eval_every=3, batch_size=8))
  trial = harness.train_run(cfg, str(tmp_path / "run"))
  metrics = read_json(tmp_path / "run" / "metrics.json")
  assert metrics["test"] is None and metrics["popularity"] is None
  assert trial.steps == 6 and trial.params > 0
  assert [p[1] for p in trial.curve] == pytest.approx(
      [r["valid"]["ndcg@10"] for r in map(  # The run's select_metric.
          json.loads, open(tmp_path / "run" / "metrics.jsonl",
                           encoding="utf-8")) if "valid" in r])
  tested = harness.tested_metrics(trial)
  assert 0.0 <= tested["ndcg@10"] <= 1.0 and "count" not in tested
