"""`jaxrec train`: train a model and write DIR/metrics.json."""
from __future__ import annotations

import argparse
from typing import Any

from jaxrec import config as config_lib
from jaxrec.cli import flags
from jaxrec.errors import JaxrecError, first_line


def add_parser(sub: Any) -> argparse.ArgumentParser:
  p = sub.add_parser("train", help="train a model and write DIR/metrics.json",
                     description="Train a model (--model, default "
                     "nextitnet); writes DIR/config.json, DIR/metrics.json, "
                     "DIR/metrics.jsonl and Orbax checkpoints under "
                     "DIR/checkpoints.")
  p.add_argument("--out", required=True, metavar="DIR",
                 help="run directory")
  p.add_argument("--config", metavar="FILE",
                 help="YAML or JSON config (sections model, head, data, "
                      "train); flags override it")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in --out from its latest checkpoint")
  p.add_argument("--init-from", metavar="DIR",
                 help="start from the params of another run or a surgery's "
                      "checkpoint (its model and head config are used)")
  p.add_argument("--init-opt-state", action="store_true",
                 help="with --init-from: also take its optimizer state (e.g. "
                      "Adam moments grown by `jaxrec grow --map-opt-state`); "
                      "default: a fresh optimizer, as the paper")
  p.add_argument("--vanished", choices=("keep", "drop"), default="keep",
                 help="with --init-from on data lacking some of the "
                      "checkpoint's items: keep their rows and ids, or drop "
                      "them and close up the ids (default: keep)")
  add_distributed_flags(p)
  p.add_argument("--quiet", action="store_true", help="no progress bar")
  flags.add_config_flags(p)
  return p


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
  """Multi-host flags: one process per host, all given the same config."""
  g = p.add_argument_group("multi-host options")
  g.add_argument("--distributed", action="store_true",
                 help="call jax.distributed.initialize() (multi-host); with "
                      "no other flag it finds the cluster itself (SLURM, "
                      "Open MPI, TPU pods, or JAX_COORDINATOR_ADDRESS, "
                      "JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
  g.add_argument("--coordinator", metavar="HOST:PORT",
                 help="address of process 0's coordinator (implies "
                      "--distributed)")
  g.add_argument("--num-processes", type=int, metavar="N",
                 help="processes in the run, one per host (implies "
                      "--distributed)")
  g.add_argument("--process-id", type=int, metavar="I",
                 help="this process's index, 0..N-1 (implies "
                      "--distributed); process 0 writes the run directory")


def init_distributed(args: argparse.Namespace) -> None:
  """`jax.distributed.initialize` before any device is touched, if asked.

  It must come first: a process that has already listed its devices would
  see only its own and train alone on the whole batch."""
  given = {"coordinator_address": args.coordinator,
           "num_processes": args.num_processes,
           "process_id": args.process_id}
  given = {k: v for k, v in given.items() if v is not None}
  if not (args.distributed or given):
    return
  option = "--distributed" if not given else "--coordinator"
  n, i = args.num_processes, args.process_id
  if n is not None and n < 1:
    raise JaxrecError(f"--num-processes={n}: expected >= 1")
  if i is not None and not 0 <= i < (n if n is not None else i + 1):
    raise JaxrecError(f"--process-id={i}: expected 0..--num-processes-1")
  import jax  # pylint: disable=import-outside-toplevel
  try:
    jax.distributed.initialize(**given)
  except (ValueError, RuntimeError) as e:
    # Outside a cluster jax cannot find the coordinator or process count.
    detail = first_line(e)
    raise JaxrecError(f"{option}: jax.distributed.initialize() "
                      f"failed: {detail}") from None


def run(args: argparse.Namespace) -> None:
  cfg = flags.config_from_args(args).validate()
  init_distributed(args)
  from jaxrec.training import loop  # pylint: disable=import-outside-toplevel
  result = loop.train(cfg, args.out, resume=args.resume,
                      init_from=args.init_from,
                      init_opt_state=args.init_opt_state,
                      progress_bar=not args.quiet, vanished=args.vanished)
  if loop.is_primary():
    print(format_summary(result))


def format_summary(result: dict[str, Any]) -> str:
  """Test metrics of the model next to the popularity baseline (the best
  validation metrics when the run was told not to test)."""
  if result["test"] is None:
    return (f"best validation at step {result['best_step']} "
            f"({result['train_time_s']:.0f}s training; not tested: "
            "--final-test false): " + ", ".join(
                f"{k} {v:.4f}" for k, v in result["valid"].items()
                if k != "count"))
  rows = [f"{'metric':<10}{'model':>10}{'popularity':>12}"]
  for name in config_lib.METRIC_NAMES:
    rows.append(f"{name:<10}{result['test'][name]:>10.4f}"
                f"{result['popularity'][name]:>12.4f}")
  head = (f"test ({result['test']['count']} users, full ranking, "
          f"best step {result['best_step']}, "
          f"{result['train_time_s']:.0f}s training)")
  return "\n".join([head] + rows)
