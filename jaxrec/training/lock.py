"""One writer per run directory: an advisory lock on DIR/.lock.

Two trainings (or a training and a `grow`) writing one directory interleave
their checkpoints and `metrics.jsonl` and test each other's best model. Every
writer holds `fcntl.flock` on DIR/.lock for as long as it writes; a second
one is refused in one line naming the holder. The kernel releases the lock
when its holder dies, however it dies, so a SIGKILLed run never blocks its
own `--resume`; the file's text (the holder's pid and command) is only
information for the refusal.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from typing import Iterator

from jaxrec.errors import JaxrecError, describe

LOCK_NAME = ".lock"


def make_run_dir(run_dir: str, option: str = "--out") -> None:
  """Creates DIR; an existing file or an unwritable parent is one line."""
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    raise JaxrecError(f"{option} {run_dir}: exists and is not a directory")
  try:
    os.makedirs(run_dir, exist_ok=True)
  except OSError as e:
    raise JaxrecError(f"{option} {run_dir}: cannot create the run "
                      f"directory: {describe(e)}") from None


@contextlib.contextmanager
def hold(run_dir: str, verb: str, option: str = "--out") -> Iterator[None]:
  """Holds DIR's writer lock within; refuses if another process holds it."""
  make_run_dir(run_dir, option)
  path = os.path.join(run_dir, LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise JaxrecError(f"{option} {run_dir}: cannot write the run directory: "
                      f"{describe(e)}") from None
  try:
    _lock_or_refuse(fd, fcntl.LOCK_EX, run_dir, option)
    _write_holder(fd, verb)
    yield
  finally:
    os.close(fd)  # Releases the lock.


def refuse_if_held(run_dir: str, option: str = "--out") -> None:
  """Refuses, as `hold` would, if a live process holds DIR's lock (without
  taking it; nothing is created)."""
  path = os.path.join(run_dir, LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return  # No lock file (or unreadable): nobody to wait for.
  try:
    _lock_or_refuse(fd, fcntl.LOCK_SH, run_dir, option)
  finally:
    os.close(fd)


def _lock_or_refuse(fd: int, mode: int, run_dir: str, option: str) -> None:
  """flock without waiting; a held lock is one line naming its holder."""
  try:
    fcntl.flock(fd, mode | fcntl.LOCK_NB)
  except BlockingIOError:
    raise JaxrecError(f"{run_dir}: in use by another writer ({_holder(fd)});"
                      f" wait for it to end or choose another {option}"
                      ) from None


def _write_holder(fd: int, verb: str) -> None:
  text = (f"pid {os.getpid()} on {socket.gethostname()}, jaxrec {verb} "
          f"since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
          f"{' '.join(sys.argv)}")[:500]
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode("utf-8", "replace") + b"\n", 0)
  except OSError:  # A full disk must not stop a run over an info line.
    pass


def _holder(fd: int) -> str:
  try:
    text = os.pread(fd, 1000, 0).decode("utf-8", "replace").strip()
  except OSError:
    text = ""
  return text.splitlines()[0] if text else "holder unknown"
