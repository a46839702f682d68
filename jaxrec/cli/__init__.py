"""The `jaxrec` command: train, eval, inspect, grow, extract, finetune,
predict, export, data; one module per verb.

A user mistake or a fault (a damaged checkpoint, a full disk, an unreadable
file) prints one line, `jaxrec: error: ...`, and exits with status 2; Ctrl-C
prints one line and exits with 130 (during training at the next step
boundary, once pending saves are settled).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Sequence

from jaxrec.errors import Interrupted, JaxrecError, describe
from jaxrec.training import interrupts


class Parser(argparse.ArgumentParser):
  """argparse that raises JaxrecError instead of printing usage and exiting."""

  def error(self, message: str):
    raise JaxrecError(f"{self.prog}: {message}")


def verbs():
  """The verb modules, each with `add_parser(subparsers)` and `run(args)`."""
  # pylint: disable=import-outside-toplevel
  from jaxrec.cli import eval as eval_verb
  from jaxrec.cli import (data, export, extract, finetune, grow, inspect,
                          predict, train)
  return {"train": train, "eval": eval_verb, "inspect": inspect,
          "grow": grow, "extract": extract, "finetune": finetune,
          "predict": predict, "export": export, "data": data}


def build_parser() -> Parser:
  parser = Parser(prog="jaxrec", description="Very deep sequential "
                  "recommenders in JAX: train, evaluate, inspect, grow, predict, "
                  "export.")
  sub = parser.add_subparsers(dest="command", required=True,
                              parser_class=Parser)
  for module in verbs().values():
    module.add_parser(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one verb; every failure is one line on stderr (see module doc)."""
  # An in-process caller (tests, a notebook) gets its own handlers back;
  # the command's process ends after main, noise of dying threads included.
  saved = (signal.getsignal(signal.SIGINT), sys.unraisablehook,
           threading.excepthook, sys.excepthook)
  try:
    status = _main(argv)
  finally:
    if argv is not None:
      signal.signal(signal.SIGINT, saved[0])
      sys.unraisablehook, threading.excepthook = saved[1], saved[2]
      sys.excepthook = saved[3]
  if argv is None and status != 0:
    # The failure is reported; end before TensorStore's threads, still
    # finishing reads the error abandoned, print into a closed event loop.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # pylint: disable=protected-access
  return status


def _main(argv: Sequence[str] | None) -> int:
  interrupts.install_immediate()  # First: start-up is most of a short run.
  _quiet_library_noise()
  try:
    args = build_parser().parse_args(argv)
    verbs()[args.command].run(args)
  except JaxrecError as e:
    return _fail(str(e))
  except Interrupted as e:
    print(f"jaxrec: {e}", file=sys.stderr)
    return interrupts.EXIT_CODE
  except KeyboardInterrupt:  # Ctrl-C outside the CLI's own handler.
    print("jaxrec: interrupted", file=sys.stderr)
    return interrupts.EXIT_CODE
  except OSError as e:  # What no guard named: still the file and the cause.
    if os.environ.get("JAXREC_DEBUG"):
      raise
    return _fail(describe(e))
  except MemoryError:
    return _fail("out of memory (a smaller --batch-size, --max-len or model "
                 "needs less)")
  return 0


def _fail(message: str) -> int:
  print(f"jaxrec: error: {message.splitlines()[0] if message else ''}",
        file=sys.stderr)
  return 2


def _quiet_library_noise() -> None:
  """After an error, Orbax's and TensorStore's abandoned async reads print
  dozens of 'Exception ignored' and 'Event loop is closed' tracebacks from
  their threads; the error itself has been reported in one line. Set
  JAXREC_DEBUG=1 to see them."""
  # Orbax logs every read-only open through absl; keep the terminal clean.
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.ERROR)
  if os.environ.get("JAXREC_DEBUG"):
    return
  absl_logging.set_verbosity(absl_logging.FATAL)
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None
  logging.getLogger("asyncio").setLevel(logging.CRITICAL)
  default_hook = sys.excepthook

  def main_thread_only(*exc_info):  # Others are TensorStore's callbacks.
    if threading.current_thread() is threading.main_thread():
      default_hook(*exc_info)

  sys.excepthook = main_thread_only


if __name__ == "__main__":
  sys.exit(main())
