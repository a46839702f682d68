"""Fault injection: what jaxrec promises when things go wrong (README,
"Guarantees"). Each test injects a fault for real -- a second process, a
truncated file, SIGINT or SIGKILL at a chosen step, a read-only or full
file system -- and checks the exit status, the single line and that nothing
on disk was lost or changed. The classes follow issue 11.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import numpy as np
import pytest

from jaxrec import cli, config
from jaxrec import evaluation
from jaxrec.training import orbax_io

from cli_helpers import TINY, run_error
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ helpers


def env():
  """The child's environment: this checkout's jaxrec, the test cache."""
  path = os.environ.get("PYTHONPATH", "")
  return dict(os.environ, PYTHONPATH=REPO + (os.pathsep + path if path else ""))


def jaxrec(*argv, timeout=300):
  """Runs the `jaxrec` command in a fresh process."""
  return subprocess.run([sys.executable, "-m", "jaxrec.cli", *map(str, argv)],
                        capture_output=True, text=True, env=env(),
                        timeout=timeout)


def python(code, *args, timeout=300, prefix=()):
  """Runs a harness script (a CLI run with a fault injected at a chosen
  point) in a fresh process, optionally under `prefix` (e.g. unshare)."""
  return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code),
                         *map(str, args)], capture_output=True, text=True,
                        env=env(), timeout=timeout)


def one_line(proc, status=2):
  """The whole of stderr, which must be one line; the exit status."""
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == status, proc.stderr[-3000:]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  return lines[0]


def tree_files(root):
  """Every file under root with its bytes: what must not change."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      if name == ".lock":  # The holder's note, rewritten by every writer.
        continue
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def steps_of(run_dir, kind):
  return sorted(orbax_io.manager(str(run_dir), kind,
                                 read_only=True).all_steps())


def latest_params(run_dir):
  params, _, _ = evaluation.load_params(str(run_dir), "latest")
  return jax.tree.map(np.asarray, params)


def records(run_dir):
  """metrics.jsonl without timings: what a resume must reproduce."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [(r["step"], r.get("loss"), r.get("valid")) for r in rows]


def read_json(path):
  with open(path) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny run (latest 3 and 6, best at its recorded step)."""
  out = str(tmp_path_factory.mktemp("trained") / "run")
  assert cli.main(["train", "--out", out] + TINY) == 0
  return out


def copy_run(src, tmp_path, name="run"):
  dest = str(tmp_path / name)
  shutil.copytree(src, dest)
  return dest


# A CLI run whose `loop.train` gets a step callback that injects a fault:
# argv[1] is the fault, argv[2] the step, the rest the command line.
CLI_WITH_FAULT = """
import functools, os, signal, sys, time
from jaxrec import cli, config
from jaxrec.training import loop
fault, at, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

def inject(step):
  if step != at:
    return
  if fault == "sigint":
    os.kill(os.getpid(), signal.SIGINT)
  elif fault == "sigkill":
    os.kill(os.getpid(), signal.SIGKILL)
  elif fault == "pause":  # Holds the run until the test creates DIR/go.
    out = argv[argv.index("--out") + 1]
    open(os.path.join(out, "ready"), "w").close()
    while not os.path.exists(os.path.join(out, "go")):
      time.sleep(0.1)
  elif fault == "fill":  # Leaves 16 KiB: a log line fits, a checkpoint not.
    out = argv[argv.index("--out") + 1]
    latest = os.path.join(out, "checkpoints", "latest")
    while not any(n.isdigit() for n in os.listdir(latest)):
      time.sleep(0.05)  # The async save before the fault has completed.
    filler = os.path.join(os.path.dirname(out), "filler")
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
      while os.write(fd, b"x" * 4096):
        pass
    except OSError:  # ENOSPC: the disk is full.
      pass
    os.ftruncate(fd, os.fstat(fd).st_size - 16384)
    os.close(fd)

loop.train = functools.partial(loop.train, step_callback=inject)
sys.argv = ["jaxrec", *argv]  # main() as the `jaxrec` command runs it.
sys.exit(cli.main())
"""


def cli_with_fault(fault, at, *argv, prefix=()):
  return python(CLI_WITH_FAULT, fault, at, *argv, prefix=prefix)


def popen_cli_with_fault(fault, at, *argv):
  return subprocess.Popen(
      [sys.executable, "-c", textwrap.dedent(CLI_WITH_FAULT), fault, str(at),
       *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env=env())


def wait_for(path, proc, timeout=120):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, f"{path} never appeared"
    time.sleep(0.1)


def namespaces_work():
  """`unshare -rm` gives a private mount namespace to mount a small tmpfs
  in (a full or read-only file system) without privileges."""
  if shutil.which("unshare") is None:
    return False
  return subprocess.run(["unshare", "-rm", "true"],
                        capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(
    not namespaces_work(), reason="needs `unshare -rm` (user and mount "
    "namespaces) to mount a small tmpfs")


def on_tmpfs(mount, options):
  """A prefix that runs a command with a fresh tmpfs mounted at `mount`."""
  script = ('mount -t tmpfs -o "$1" jaxrec-test "$2" && shift 2 && '
            'exec "$@"')
  return ("unshare", "-rm", "sh", "-c", script, "sh", options, str(mount))


# ------------------------------------- 1. one writer per run directory


def test_a_second_training_into_a_running_run_is_refused_naming_the_holder(
    tmp_path):
  out = str(tmp_path / "run")
  first = popen_cli_with_fault("pause", 4, "train", "--out", out, *TINY)
  try:
    wait_for(os.path.join(out, "ready"), first)
    line = one_line(jaxrec("train", "--out", out, *TINY))
    assert f"{out}: in use by another writer (pid {first.pid}" in line
    line = one_line(jaxrec("train", "--out", out, "--resume", *TINY))
    assert f"pid {first.pid}" in line
  finally:
    open(os.path.join(out, "go"), "w").close()
    _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  # The first run lost nothing: every log record, its own best tested.
  assert [r[0] for r in records(out)] == [3, 3, 6, 6]
  metrics = read_json(os.path.join(out, "metrics.json"))
  assert steps_of(out, "best") == [metrics["best_step"]]


HOLD_LOCK = """
import sys, time
from jaxrec.training import lock
with lock.hold(sys.argv[1], "train"):
  print("held", flush=True)
  time.sleep(120)
"""


def test_grow_into_a_directory_in_use_is_refused(trained, tmp_path):
  out = str(tmp_path / "grown")
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, out],
                            stdout=subprocess.PIPE, text=True, env=env())
  try:
    assert holder.stdout.readline().strip() == "held"
    line = one_line(jaxrec("grow", "--from", trained, "--out", out,
                           "--method", "cross"))
    assert f"in use by another writer (pid {holder.pid}" in line
  finally:
    holder.kill()
    holder.wait()
  assert not os.path.exists(os.path.join(out, "checkpoints"))


def test_the_lock_of_a_killed_writer_does_not_block_a_resume(trained,
                                                            tmp_path):
  run = copy_run(trained, tmp_path)
  holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, run],
                            stdout=subprocess.PIPE, text=True, env=env())
  assert holder.stdout.readline().strip() == "held"
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with open(os.path.join(run, ".lock")) as f:  # Its note is still there.
    assert f"pid {holder.pid}" in f.read()
  resumed = jaxrec("train", "--out", run, "--resume", *TINY)
  assert resumed.returncode == 0, resumed.stderr[-3000:]


# --------------------------------- 2. the record and the best files agree


# Kills the run right after its best checkpoint at step 6 is on disk and
# before the `latest` one recording it is: the moment the two disagree.
KILL_AFTER_BEST_SAVE = """
import os, signal, sys
from jaxrec import cli, config
from jaxrec.training import orbax_io
wait = orbax_io.wait
def wait_then_kill(mngr, step, last_complete):
  wait(mngr, step, last_complete)
  if str(mngr.directory).endswith("best") and step == 6:
    os.kill(os.getpid(), signal.SIGKILL)
orbax_io.wait = wait_then_kill
sys.argv = ["jaxrec", *sys.argv[1:]]
sys.exit(cli.main())
"""


def test_the_final_test_loads_the_recorded_best_not_the_newest_file(
    tmp_path):
  out = str(tmp_path / "run")
  # A learning rate that improves every validation: 6 is a new best.
  args = [*TINY, "--steps", "9", "--learning-rate", "0.01"]
  killed = python(KILL_AFTER_BEST_SAVE, "train", "--out", out, *args)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert 6 in steps_of(out, "best") and steps_of(out, "latest") == [3]
  # Resumed to end at step 5, the run never reaches the best/6 on disk.
  resumed = jaxrec("train", "--out", out, "--resume", *args, "--steps", "5")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  metrics = read_json(os.path.join(out, "metrics.json"))
  assert metrics["best_step"] in (3, 5)
  assert steps_of(out, "best") == [metrics["best_step"]]
  evaluated = json.loads(jaxrec("eval", "--ckpt", out, "--split",
                                "test").stdout)
  assert evaluated["checkpoint_step"] == metrics["best_step"]
  assert evaluated["test"] == metrics["test"]


def test_eval_names_a_recorded_best_step_that_is_missing(trained, tmp_path):
  run = copy_run(trained, tmp_path)
  best = read_json(os.path.join(run, "metrics.json"))["best_step"]
  other = 3 if best == 6 else 6
  os.rename(os.path.join(run, "checkpoints", "best", str(best)),
            os.path.join(run, "checkpoints", "best", str(other)))
  line = one_line(jaxrec("eval", "--ckpt", run))
  assert f"checkpoints/best/{best}: missing" in line


# ------------------------------------------------ 3. damaged checkpoints


def truncate_largest_array(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"),
                    recursive=True)
  largest = max(files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 2)


def delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def garbage_metadata(step_dir):
  with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
    f.write("{not json")


def empty_step_dir(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


DAMAGE = [truncate_largest_array, delete_manifest, garbage_metadata,
          empty_step_dir]
# Each resume trains: one damage in the quick run, the others marked slow.
DAMAGE_RESUMED = [DAMAGE[0]] + [pytest.param(f, marks=pytest.mark.slow)
                                for f in DAMAGE[1:]]


@pytest.mark.parametrize("damage", DAMAGE_RESUMED,
                         ids=lambda f: getattr(f, "__name__", None))
def test_resume_falls_back_from_a_damaged_newest_checkpoint_exactly(
    trained, tmp_path, damage):
  run = copy_run(trained, tmp_path)
  damage(os.path.join(run, "checkpoints", "latest", "6"))
  proc = jaxrec("train", "--out", run, "--resume", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  warnings = [l for l in proc.stderr.splitlines() if l.startswith("jaxrec:")]
  assert any("checkpoints/latest/6" in l and "older checkpoint at step 3"
             in l for l in warnings), proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  # Step 6 was redone from step 3: the same params and log as before.
  chex.assert_trees_all_equal(latest_params(run),
               latest_params(trained))
  assert records(run) == records(trained)
  assert os.listdir(os.path.join(run, "checkpoints", "damaged")) == [
      "latest-6"]


def test_resume_with_every_checkpoint_damaged_is_one_line_moving_nothing(
    trained, tmp_path):
  run = copy_run(trained, tmp_path)
  for step in ("3", "6"):
    truncate_largest_array(os.path.join(run, "checkpoints", "latest", step))
  before = tree_files(run)
  line = one_line(jaxrec("train", "--out", run, "--resume", *TINY))
  assert "no intact checkpoint to resume from (2 damaged" in line
  assert "checkpoints/latest/6: cannot read the checkpoint" in line
  assert tree_files(run) == before


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__)
def test_eval_of_a_damaged_best_checkpoint_is_one_line_naming_it(
    trained, tmp_path, damage):
  run = copy_run(trained, tmp_path)
  best = read_json(os.path.join(run, "metrics.json"))["best_step"]
  damage(os.path.join(run, "checkpoints", "best", str(best)))
  before = tree_files(run)
  line = one_line(jaxrec("eval", "--ckpt", run))
  assert f"{run}/checkpoints/best/{best}" in line
  assert tree_files(run) == before


def test_eval_reads_the_best_when_the_newest_record_is_damaged(trained,
                                                               tmp_path):
  run = copy_run(trained, tmp_path)
  garbage_metadata(os.path.join(run, "checkpoints", "latest", "6"))
  proc = jaxrec("eval", "--ckpt", run, "--split", "test")
  assert proc.returncode == 0, proc.stderr[-3000:]
  metrics = read_json(os.path.join(run, "metrics.json"))
  assert json.loads(proc.stdout)["test"] == metrics["test"]


@pytest.mark.parametrize("verb", ["inspect", "grow"])
def test_inspect_and_grow_of_a_damaged_checkpoint_are_one_line(
    trained, tmp_path, verb):
  run = copy_run(trained, tmp_path)
  best = read_json(os.path.join(run, "metrics.json"))["best_step"]
  step_dir = os.path.join(run, "checkpoints", "best", str(best))
  if verb == "inspect":  # It reads the array metadata, never an array.
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
      f.write("{not json")
  else:
    truncate_largest_array(step_dir)
  argv = ([verb, run] if verb == "inspect" else
          [verb, "--from", run, "--out", tmp_path / "g", "--method", "cross"])
  line = one_line(jaxrec(*argv))
  assert f"{run}/checkpoints/best/{best}" in line


def test_metadata_naming_another_shape_is_the_another_model_error(
    trained, tmp_path):
  run = copy_run(trained, tmp_path)
  best = read_json(os.path.join(run, "metrics.json"))["best_step"]
  path = os.path.join(run, "checkpoints", "best", str(best), "meta",
                      "metadata")
  meta = read_json(path)
  meta["config"]["model"]["embed_dim"] = 16
  with open(path, "w") as f:
    json.dump(meta, f)
  line = one_line(jaxrec("eval", "--ckpt", run))
  assert f"checkpoints/best/{best}: a checkpoint of another model" in line


# ------------------------------------------------------------ 4. OS faults


def test_an_out_that_is_a_file_is_one_line(tmp_path, capsys):
  path = tmp_path / "file"
  path.write_text("not a directory")
  line = run_error(capsys, ["train", "--out", path] + TINY)
  assert f"--out {path}: exists and is not a directory" in line
  assert path.read_text() == "not a directory"


def write_csv(path):
  rows = ["user_id,item_id,timestamp"]
  rows += [f"{u},{i},{i}" for u in range(8) for i in range(8)]
  path.write_text("\n".join(rows) + "\n")


def test_an_unreadable_data_file_is_one_line_naming_it(tmp_path):
  data = tmp_path / "events.csv"
  write_csv(data)
  os.chmod(data, 0)
  prefix = ()
  if os.geteuid() == 0:
    # Root reads anything, but not, inside a user namespace, a file whose
    # owner is outside the namespace's map.
    if not namespaces_work():
      pytest.skip("as root, needs `unshare -rm` to make a file unreadable")
    os.chown(data, 12345, 12345)
    prefix = ("unshare", "-rm")
  proc = subprocess.run(
      [*prefix, sys.executable, "-m", "jaxrec.cli", "train",
       "--out", str(tmp_path / "run"), *TINY, "--data", f"csv:{data}"],
      capture_output=True, text=True, env=env(), timeout=300)
  line = one_line(proc)
  assert "Permission denied" in line and str(data) in line


@needs_namespaces
def test_a_read_only_file_system_is_one_line(tmp_path):
  mount = tmp_path / "ro"
  mount.mkdir()
  proc = subprocess.run(
      [*on_tmpfs(mount, "size=4m,ro"), sys.executable, "-m", "jaxrec.cli",
       "train", "--out", str(mount / "run"), *TINY],
      capture_output=True, text=True, env=env(), timeout=300)
  assert "Read-only file system" in one_line(proc)


# Step 6 a new best: its `best` save (awaited at once) fails; with a flat
# learning rate it is not, and the async `latest` save fails when awaited.
@pytest.mark.slow
@needs_namespaces
@pytest.mark.parametrize("extra,failed", [
    ([], "best/6"), (["--learning-rate", "1e-12"], "latest/6")])
def test_a_full_disk_names_the_failed_save_and_the_last_complete_one(
    tmp_path, extra, failed):
  mount = tmp_path / "small"
  mount.mkdir()
  out = mount / "run"
  args = " ".join(TINY + extra)
  # Inside one namespace: fill the disk at step 4, then free it and resume.
  script = textwrap.dedent(f"""
    {sys.executable} -c "$1" fill 4 train --out {out} {args} \\
        2> {tmp_path}/err; echo $? > {tmp_path}/rc
    ls {out}/checkpoints/latest > {tmp_path}/kept
    rm {mount}/filler
    {sys.executable} -m jaxrec.cli train --out {out} --resume \\
        {args} > /dev/null 2> {tmp_path}/err2
    echo $? > {tmp_path}/rc2
  """)
  proc = subprocess.run(
      [*on_tmpfs(mount, "size=8m"), "sh", "-c", script, "sh",
       textwrap.dedent(CLI_WITH_FAULT)],
      capture_output=True, text=True, env=env(), timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = (tmp_path / "err").read_text().strip().splitlines()
  assert (tmp_path / "rc").read_text().strip() == "2", err
  assert len(err) == 1 and "Traceback" not in err[0], err
  assert (f"checkpoints/{failed}: cannot save the checkpoint: No space left "
          "on device") in err[0]
  assert "the last complete checkpoint is step 3" in err[0]
  # Step 3 complete; of step 6 at most Orbax's tmp directory, which the
  # resume's manager cleans up.
  kept = (tmp_path / "kept").read_text().split()
  assert [n for n in kept if n.isdigit()] == ["3"], kept
  assert (tmp_path / "rc2").read_text().strip() == "0", (
      tmp_path / "err2").read_text()[-3000:]


# -------------------------------------------------------------- 5. Ctrl-C


# 3: while step 3's save is pending; 5: between checkpoints.
@pytest.mark.parametrize("at", [3, pytest.param(5, marks=pytest.mark.slow)])
def test_ctrl_c_stops_at_a_step_boundary_and_the_run_resumes_exactly(
    trained, tmp_path, at):
  out = str(tmp_path / "run")
  line = one_line(cli_with_fault("sigint", at, "train", "--out", out, *TINY),
                  status=130)
  assert line == (f"jaxrec: interrupted at step {at}; --resume continues "
                  "from step 3")
  assert steps_of(out, "latest") == [3]
  resumed = jaxrec("train", "--out", out, "--resume", *TINY)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  chex.assert_trees_all_equal(latest_params(out),
               latest_params(trained))
  assert records(out) == records(trained)


@pytest.mark.parametrize("delay", [0.5, 1.5, 3.0])
def test_ctrl_c_during_start_up_exits_130_in_one_line(tmp_path, delay):
  proc = subprocess.Popen(
      [sys.executable, "-m", "jaxrec.cli", "train", "--out",
       str(tmp_path / "run"), *TINY, "--steps", "2000"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
  time.sleep(delay)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxrec: interrupted"), err


# ------------------------------------------------------- 6. the resume guard


def test_resume_without_config_json_refuses_another_config_and_writes_nothing(
    trained, tmp_path):
  run = copy_run(trained, tmp_path)
  os.remove(os.path.join(run, "config.json"))
  before = tree_files(run)
  line = one_line(jaxrec("train", "--out", run, "--resume", *TINY,
                         "--embed-dim", "16"))
  assert "model.embed_dim: 8 -> 16" in line
  assert tree_files(run) == before  # No config.json, no checkpoint moved.


def test_resume_with_another_seed_is_refused(trained, tmp_path, capsys):
  run = copy_run(trained, tmp_path)
  os.remove(os.path.join(run, "config.json"))
  line = run_error(capsys, ["train", "--out", run, "--resume"] + TINY
                   + ["--seed", "7"])
  assert "train.seed: 0 -> 7" in line


def test_a_resume_may_move_the_cache_and_keep_more_checkpoints(
    trained, tmp_path, capsys):
  # A preempted run continues on a machine whose cache sits elsewhere:
  # options that change no result do not block --resume, and the run
  # ends as one that was never moved.
  longer = [a if a != "6" else "9" for a in TINY]  # --steps 9.
  straight = str(tmp_path / "straight")
  assert cli.main(["train", "--out", straight] + longer) == 0
  moved = copy_run(trained, tmp_path, "moved")
  assert cli.main(["train", "--out", moved, "--resume"] + longer
                  + ["--cache-dir", str(tmp_path / "other_cache"),
                     "--keep-checkpoints", "3"]) == 0
  capsys.readouterr()
  assert os.listdir(tmp_path / "other_cache")  # The data was cached there.
  chex.assert_trees_all_equal(latest_params(moved), latest_params(straight))
  assert records(moved) == records(straight)
  assert read_json(os.path.join(moved, "config.json"))["train"][
      "keep_checkpoints"] == 3


def test_every_option_a_resume_may_change_says_why():
  # The list is declared beside each option (config.option), not kept
  # in the resume check; an option that changes results is not on it.
  may_change = config.resume_may_change()
  assert {"data.cache_dir", "train.keep_checkpoints", "train.tensorboard",
          "train.mesh", "train.steps", "train.epochs",
          "train.final_test"} == set(may_change)
  assert all(why for why in may_change.values())


def test_resume_of_a_directory_without_a_run_is_refused(tmp_path, capsys):
  line = run_error(capsys, ["train", "--out", tmp_path / "none", "--resume"]
                   + TINY)
  assert "no run to resume here" in line
  assert not os.path.exists(tmp_path / "none" / "checkpoints")


# ------------------------------------ 7. values refused up front, in a line


@pytest.mark.parametrize("flag,value,names", [
    ("--learning-rate", "inf", "train.learning_rate=inf"),
    ("--learning-rate", "nan", "train.learning_rate=nan"),
    ("--layer-norm-eps", "0", "model.layer_norm_eps=0.0"),
    ("--layer-norm-eps", "-1e-8", "model.layer_norm_eps=-1e-08"),
    ("--max-len", str(10**12), "data.max_len too large"),
    ("--num-items", "7", "model.num_items=7"),
])
def test_a_bad_option_value_is_refused_naming_it(tmp_path, capsys, flag,
                                                  value, names):
  out = tmp_path / "run"
  line = run_error(capsys, ["train", "--out", out] + TINY + [f"{flag}={value}"])
  assert names in line
  assert not os.path.exists(out / "checkpoints")


@pytest.mark.parametrize("sampled", [-1, 49, 10**6])
def test_eval_sampled_outside_the_catalogue_is_refused(trained, capsys,
                                                       sampled):
  line = run_error(capsys, ["eval", "--ckpt", trained, "--sampled", sampled])
  assert f"--sampled={sampled}" in line


# A `jaxrec grow` that SIGKILLs itself when the named function is first
# called: argv[1] is "module:attribute", the rest the command line.
GROW_KILLED_AT = """
import importlib, os, signal, sys
from jaxrec import cli
where, argv = sys.argv[1], sys.argv[2:]
module, _, name = where.partition(":")
owner, _, attr = name.rpartition(".")
obj = importlib.import_module(module)
for part in filter(None, owner.split(".")):
  obj = getattr(obj, part)

def killed(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGKILL)

setattr(obj, attr, killed)
sys.argv = ["jaxrec", *argv]
sys.exit(cli.main())
"""


@pytest.mark.parametrize("where", [
    "jaxrec.data.vocabulary:Vocabulary.save",  # Before the checkpoint.
    "jaxrec.training.orbax_io:wait",  # While Orbax writes it.
    "jaxrec.training.checkpoints:write_json",  # Before config.json.
    "jaxrec.surgery.checkpoint:commit_staged",  # All written, not renamed.
], ids=["vocabulary", "checkpoint", "config", "commit"])
def test_a_grow_killed_at_any_point_is_completed_by_the_same_command(
    trained, tmp_path, where):
  argv = ["grow", "--from", trained, "--method", "cross"]
  out = str(tmp_path / "grown")
  killed = python(GROW_KILLED_AT, where, *argv, "--out", out)
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert not os.path.exists(out)  # Nothing half-made under the name.
  done = jaxrec(*argv, "--out", out)
  assert done.returncode == 0, done.stderr[-3000:]
  assert not os.path.exists(out + ".partial")
  straight = str(tmp_path / "straight")
  assert jaxrec(*argv, "--out", straight).returncode == 0
  chex.assert_trees_all_equal(latest_params(out), latest_params(straight))
  assert sorted(os.listdir(out)) == sorted(os.listdir(straight))


def test_a_refused_grow_leaves_no_directory_behind(trained, tmp_path,
                                                   capsys):
  out = tmp_path / "grown"
  line = run_error(capsys, ["grow", "--from", trained, "--out", out,
                            "--method", "cross", "--map-opt-state",
                            "--source", "best"])
  assert "--source latest" in line
  assert os.listdir(tmp_path) == []


def test_grow_never_writes_beside_another_runs_files(trained, tmp_path,
                                                     capsys):
  # A run whose checkpoints are gone still holds its config and log.
  run = copy_run(trained, tmp_path)
  shutil.rmtree(os.path.join(run, "checkpoints"))
  before = tree_files(run)
  line = run_error(capsys, ["grow", "--from", trained, "--out", run,
                            "--method", "cross"])
  assert "already holds files (config.json" in line
  assert tree_files(run) == before


@pytest.mark.parametrize("left", ["metrics.jsonl", "vocabulary.json"])
def test_train_never_writes_beside_another_runs_files(trained, tmp_path,
                                                      capsys, left):
  run = copy_run(trained, tmp_path)
  for name in os.listdir(run):
    if name not in (left, ".lock"):
      path = os.path.join(run, name)
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
  before = tree_files(run)
  line = run_error(capsys, ["train", "--out", run] + TINY)
  assert f"holds another run's files ({left})" in line
  assert tree_files(run) == before


def test_grow_times_beyond_memory_is_refused(trained, tmp_path, capsys):
  out = tmp_path / "grown"
  line = run_error(capsys, ["grow", "--from", trained, "--out", out,
                            "--method", "cross", "--times", "40"])
  assert "--times=40" in line and "memory" in line
  assert not os.path.exists(out / "checkpoints")


@pytest.mark.parametrize("text,names", [
    (b"version: 4\n", "config version 4"),
    (b"model:\n  num_blocks: 2  # caf\xe9\n", "c.yaml:2: not UTF-8"),
])
def test_an_unreadable_config_file_is_refused_naming_it(tmp_path, capsys,
                                                        text, names):
  path = tmp_path / "c.yaml"
  path.write_bytes(text)
  line = run_error(capsys, ["train", "--out", tmp_path / "run", "--config",
                            path] + TINY)
  assert names in line


def test_undecodable_ids_are_refused_naming_the_line(tmp_path, capsys):
  path = tmp_path / "events.csv"
  write_csv(path)
  with open(path, "ab") as f:  # Two ids that decode to the same text.
    f.write(b"1,a\xff,100\n1,a\xfe,101\n")
  line = run_error(capsys, ["train", "--out", tmp_path / "run"] + TINY
                   + ["--data", f"csv:{path}"])
  assert "events.csv:66: item id b'a\\xff' is not UTF-8" in line


def test_a_nan_before_the_first_checkpoint_claims_none_was_kept(tmp_path,
                                                                capsys):
  line = run_error(capsys, ["train", "--out", tmp_path / "run"] + TINY
                   + ["--learning-rate", "1e30"])
  assert "NaN/inf at step" in line and "no checkpoint was written" in line


# ----------------------------------------------- 8. tidy after a late kill


def test_resume_tidies_latest_checkpoints_beyond_keep(trained, tmp_path):
  run = copy_run(trained, tmp_path)
  # What a kill during the final test can leave: one `latest` too many.
  latest = os.path.join(run, "checkpoints", "latest")
  shutil.copytree(os.path.join(latest, "3"), os.path.join(latest, "2"))
  assert steps_of(run, "latest") == [2, 3, 6]
  proc = jaxrec("train", "--out", run, "--resume", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert steps_of(run, "latest") == [3, 6]
  chex.assert_trees_all_equal(latest_params(run),
               latest_params(trained))
