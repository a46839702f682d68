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

In a multi-process run (`jax.distributed`) a process that stops alone
leaves the others waiting in a collective for ever. There the loop asks
`stop_before(step)` instead: it is true at one step for every process,
jax's preemption sync point. A SIGTERM (a scheduler's preemption notice)
reaches every process through the coordination service, and Ctrl-C is
forwarded as one; the processes then save that step together and stop.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator

EXIT_CODE = 130
_state = {"deferring": 0, "requested": False, "forwarded": False,
          "preempted": False}


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
  """Whether Ctrl-C came during `deferred()`, or the processes of a
  multi-process run agreed to stop (`stop_before`)."""
  return _state["requested"] or _state["preempted"]


def preempted() -> bool:
  """Whether a multi-process run stopped at its agreed step (saved there)."""
  return _state["preempted"]


def stop_before(step: int,
                agreed: Callable[[int], bool] | None = None) -> bool:
  """Whether the loop stops before running step `step` (steps done so
  far). One process (`agreed` None): when Ctrl-C came. Several: when
  `agreed(step)`, jax's preemption sync point
  (`multihost_utils.reached_preemption_sync_point`), is true: the same
  step on every process (call it at every step). This module imports no
  jax: the CLI installs its Ctrl-C handler before jax's slow import, and a
  Ctrl-C during that import was swallowed by jax's gc callback."""
  if agreed is None:
    return _state["requested"]
  if _state["requested"] and not _state["forwarded"]:
    _state["forwarded"] = True  # Ctrl-C becomes the notice all receive.
    os.kill(os.getpid(), signal.SIGTERM)
  if agreed(step):
    _state["preempted"] = True
  return _state["preempted"]


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Within: Ctrl-C is recorded for the loop to honour at a step boundary
  (outside the main thread, signals cannot be handled: nothing changes)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = signal.signal(signal.SIGINT, _handler)
  _state["deferring"] += 1
  _state.update(requested=False, forwarded=False, preempted=False)
  try:
    yield
  finally:
    _state["deferring"] -= 1
    _state.update(requested=False, forwarded=False, preempted=False)
    signal.signal(signal.SIGINT, previous)
