"""Checkpoints of config version 2 (methods' options as `model.*` fields)
load through the upgrade step and re-evaluate to their recorded metrics."""
import json
import os

import pytest

from jaxrec.evaluation import evaluate_checkpoint

RUNS = os.path.join(os.path.dirname(__file__), "fixtures", "v2_runs")


def recorded(name):
  with open(os.path.join(RUNS, name, "metrics.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("name", ["skiprec", "cprec"])
def test_a_version_2_run_re_evaluates_to_its_recorded_test_metrics(name):
  out = evaluate_checkpoint(os.path.join(RUNS, name), split="test")
  want = recorded(name)["test"]
  assert out["test"] == pytest.approx(want, abs=1e-6)


def test_a_version_2_skiprec_run_keeps_its_block_usage():
  out = evaluate_checkpoint(os.path.join(RUNS, "skiprec"), split="test")
  assert out["block_usage"]["test"] == recorded("skiprec")["block_usage"][
      "test"]


def test_a_version_2_patched_finetuning_re_evaluates_to_its_test_metrics():
  source = "profile:" + os.path.join(RUNS, "peterrec_profile.txt")
  out = evaluate_checkpoint(os.path.join(RUNS, "peterrec"), source=source,
                            split="test")
  assert out["test"] == pytest.approx(recorded("peterrec")["test"], abs=1e-6)

