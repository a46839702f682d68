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


# A CLI train whose process sends itself `signal` after step `at`:
# argv[1] signal name, argv[2] step, the rest the command line.
SIGNALLED_AT = """
import functools, os, signal, sys
from jaxrec import cli
from jaxrec.training import loop
name, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def inject(step):
  if step == at:
    os.kill(os.getpid(), getattr(signal, name))

loop.train = functools.partial(loop.train, step_callback=inject)
sys.argv = ["jaxrec", *argv]
sys.exit(cli.main())
"""


def _two_processes(out, cache, extra=(), signalled=None):
  """Two processes of one run; `signalled` (process, signal, step) runs
  that process under SIGNALLED_AT."""
  port = free_port()
  procs = []
  for i in range(2):
    argv = ["train", "--out", str(out), *ARGS, *extra, "--coordinator",
            f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
            str(i)]
    if signalled and signalled[0] == i:
      cmd = ["-c", SIGNALLED_AT, signalled[1], str(signalled[2]), *argv]
    else:
      cmd = ["-m", "jaxrec.cli", *argv]
    procs.append(subprocess.Popen([sys.executable, *cmd],
                                  env=_env(4, cache), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return [(p, *p.communicate(timeout=300)) for p in procs]


@pytest.fixture(scope="module")
def straight_nine_steps(tmp_path_factory):
  """The metrics of a two-process run of 9 steps never stopped."""
  root = tmp_path_factory.mktemp("straight")
  for p, _, err in _two_processes(root / "run", root / "cache",
                                  ["--steps", "9"]):
    assert p.returncode == 0, err[-3000:]
  return _metrics(root / "run")


@pytest.mark.slow
@pytest.mark.parametrize("process, signal_name", [(1, "SIGTERM"),
                                                  (0, "SIGINT")],
                         ids=["preemption-notice", "ctrl-c"])
def test_one_signalled_process_stops_every_process_at_one_saved_step(
    tmp_path, straight_nine_steps, process, signal_name):
  cache = tmp_path / "cache"
  longer = ["--steps", "9"]
  run = tmp_path / "run"
  ended = _two_processes(run, cache, longer, (process, signal_name, 4))
  lines = [err.strip().splitlines()[-1] for _, _, err in ended]
  assert [p.returncode for p, _, _ in ended] == [130, 130], lines
  # Both stopped at one step after the signal, and saved it.
  stopped = {int(line.split("saved at step ")[1].split(";")[0])
             for line in lines}
  assert len(stopped) == 1, lines
  (step,) = stopped
  assert 4 <= step < 9
  assert str(step) in os.listdir(run / "checkpoints" / "latest")
  # Resumed, the run ends as one that was never stopped.
  for p, _, err in _two_processes(run, cache, [*longer, "--resume"]):
    assert p.returncode == 0, err[-3000:]
  got, want = _metrics(run), straight_nine_steps
  assert got["steps"] == want["steps"] == 9
  for name in config.METRIC_NAMES:
    assert got["test"][name] == pytest.approx(want["test"][name], abs=1e-6)
