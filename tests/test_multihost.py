"""Several hosts, simulated: two processes x 4 CPU devices on localhost.

They join through `jax.distributed` (the coordinator on 127.0.0.1, gloo CPU
collectives) on a data=4,model=2 mesh and must end where one process with 8
devices on the same mesh ends: the same metrics, the same best params; only
process 0 writes the run directory and the summary; the multi-host
checkpoint restores in this single-device process with the same metrics,
and the run resumes there on another mesh.
"""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxrec import config, evaluation
from jaxrec.training import loop

from test_cli import free_port

ARGS = ["--data", "synthetic:tiny,items=63", "--max-len", "12",
        "--num-blocks", "1", "--embed-dim", "8", "--steps", "6",
        "--eval-every", "3", "--batch-size", "16", "--eval-batch-size", "16",
        "--loss-chunk", "5", "--mesh", "data=4,model=2", "--quiet"]


def _env(devices, cache):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "JAX_", "TPU_"))
         and "_proxy" not in k.lower()}
  env.update({"JAX_PLATFORMS": "cpu", "JAXREC_CACHE": str(cache),
              "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
  return env


def _train(out, devices, cache, extra=()):
  return subprocess.Popen(
      [sys.executable, "-m", "jaxrec.cli", "train", "--out", str(out), *ARGS,
       *extra], env=_env(devices, cache), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _finish(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return out


def _metrics(run_dir):
  with open(os.path.join(run_dir, "metrics.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.mark.slow
def test_two_processes_match_one_and_restore_on_one_device(tmp_path):
  cache = tmp_path / "cache"
  port = free_port()
  multi = tmp_path / "multi"
  procs = [_train(multi, 4, cache, ["--coordinator", f"127.0.0.1:{port}",
                                    "--num-processes", "2",
                                    "--process-id", str(i)])
           for i in range(2)]
  stdout = [_finish(p) for p in procs]
  one = tmp_path / "one"
  _finish(_train(one, 8, cache))

  got, want = _metrics(multi), _metrics(one)
  assert got["steps"] == want["steps"] == 6
  assert got["best_step"] == want["best_step"]
  for split in ("valid", "test"):
    for name in config.METRIC_NAMES:
      assert got[split][name] == pytest.approx(want[split][name], abs=1e-6)
  # Process 0 alone reports and writes: one summary, one log per step.
  assert "full ranking" in stdout[0] and "full ranking" not in stdout[1]
  def steps(run_dir):
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
      return [json.loads(line)["step"] for line in f]
  assert steps(multi) == steps(one) == [3, 3, 6, 6]  # Loss, then valid.

  # Trained on 8 devices over 2 processes, opened on this one device.
  assert jax.device_count() == 1
  params, cfg, _ = evaluation.load_params(str(multi), "best")
  assert cfg.train.mesh == "data=4,model=2"
  ref, _, _ = evaluation.load_params(str(one), "best")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), params, ref)
  emb = params["item_embedding"]["embedding"]
  assert emb.shape == (64, 8) and len(emb.devices()) == 1
  result = evaluation.evaluate_checkpoint(str(multi), split="test")
  for name in config.METRIC_NAMES:
    assert result["test"][name] == pytest.approx(got["test"][name],
                                                  abs=1e-6)

  # --resume on another mesh (one device here): the latest state reshards.
  _, cfg, _ = evaluation.load_params(str(multi), "latest")
  cfg = cfg.replace(train=dataclasses.replace(cfg.train, steps=9, mesh=""))
  resumed = loop.train(cfg, str(multi), resume=True, progress_bar=False)
  assert resumed["steps"] == 9
