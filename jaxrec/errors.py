"""User-facing errors, and the one place library faults become them.

Anything a user can get wrong (a path, a malformed row, an option value, a
checkpoint of another model) raises `JaxrecError` with a one-line message that
names the file, line, field or option. The CLI prints it as
`jaxrec: error: <message>` and exits with status 2 -- never a traceback.

Faults outside the user's input (a damaged checkpoint, a full disk, an
unreadable file) come from Orbax, TensorStore, json or the OS as exceptions
of many types, some of them bare `Exception`s with pages of detail;
`reported_as` turns them into the same one line, naming what was being read
or written.
"""
from __future__ import annotations

import contextlib
import os
import re
from typing import Iterator


class JaxrecError(Exception):
  """A mistake in the user's input, reported as one line without traceback."""


class CheckpointDamaged(JaxrecError):
  """A checkpoint on disk that cannot be read back as it was written: a
  resume may fall back to an older one; anything else reports it."""


class Interrupted(Exception):
  """Ctrl-C, honoured at a step boundary once pending saves were settled;
  the CLI prints the message as one line and exits with 130."""


def first_line(error: BaseException) -> str:
  """The first line of an exception's message ("" if it has none): what a
  one-line `JaxrecError` quotes of a library's multi-line error."""
  text = str(error).strip()
  return text.splitlines()[0] if text else ""


def describe(error: BaseException) -> str:
  """A short, one-line account of a library or OS error."""
  if isinstance(error, OSError) and error.strerror:
    where = f" ({error.filename})" if error.filename else ""
    return f"{error.strerror}{where}"
  detail = first_line(error)
  # TensorStore reports an OS failure as a ValueError naming its errno.
  code = re.search(r"os_error_code='?(\d+)", detail)
  if code:
    return os.strerror(int(code.group(1)))
  # TensorStore appends a multi-kilobyte spec to the first line.
  detail = detail.split(" See full TensorStore details")[0]
  if len(detail) > 300:
    detail = detail[:300] + "..."
  return f"{type(error).__name__}: {detail}" if detail else type(error).__name__


@contextlib.contextmanager
def reported_as(origin: str, action: str,
                error_type: type[JaxrecError] = JaxrecError) -> Iterator[None]:
  """Within: any library or OS error becomes one `error_type` line,
  `ORIGIN: cannot ACTION: DETAIL`. Prevents the 30-450-line Orbax and
  TensorStore tracebacks that reading a damaged checkpoint or writing to a
  full disk gives. Our own errors and Ctrl-C pass through unchanged."""
  try:
    yield
  except (JaxrecError, Interrupted):
    raise
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise error_type(f"{origin}: cannot {action}: {describe(e)}") from None
