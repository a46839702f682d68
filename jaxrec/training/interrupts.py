"""Ctrl-C: immediate while nothing is being written, deferred while it is.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main
thread happens to be: inside jax's or XLA's start-up (a segfault on the
way out), inside Orbax's async save (a 12-line traceback and a save left
half-awaited), or inside a library that swallows it (an ignored Ctrl-C).
Instead:

- `install_immediate()` (the CLI, first thing): Ctrl-C prints one line and
  ends the process at once with 130. Nothing of a run is being written
  then (config and metrics files are replaced atomically), so there is
  nothing to settle.
- `deferred()` (the training loop): Ctrl-C is only recorded; the loop asks
  `requested()` at each step boundary, settles its saves and raises
  `Interrupted`. A second Ctrl-C abandons the pending saves and ends the
  process as SIGKILL would: Orbax commits a checkpoint by renaming it, so
  the previous one stays complete and `--resume` goes on from it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

EXIT_CODE = 130
_state = {"deferring": 0, "requested": False}


def _exit_now(message: str) -> None:
  try:
    sys.stderr.write(f"jaxrec: {message}\n")
    sys.stderr.flush()
  finally:
    os._exit(EXIT_CODE)  # pylint: disable=protected-access


def _handler(signum, frame) -> None:  # pylint: disable=unused-argument
  if _state["deferring"] and not _state["requested"]:
    _state["requested"] = True
    return
  if _state["deferring"]:
    _exit_now("interrupted twice; pending checkpoint saves abandoned "
              "(--resume continues from the last complete one)")
  _exit_now("interrupted")


def install_immediate() -> None:
  """Ctrl-C ends the process at once with one line and status 130."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _handler)


def requested() -> bool:
  """Whether Ctrl-C came during `deferred()`."""
  return _state["requested"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Within: Ctrl-C is recorded for the loop to honour at a step boundary
  (outside the main thread, signals cannot be handled: nothing changes)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGINT, _handler)
  _state["deferring"] += 1
  _state["requested"] = False
  try:
    yield
  finally:
    _state["deferring"] -= 1
    _state["requested"] = False
    signal.signal(signal.SIGINT, previous)
