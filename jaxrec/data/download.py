"""Fetching a file over HTTP(S) into place: atomic, checksummed, with a
progress bar, and one line on any failure.

A download is written to a temporary file beside its destination and
renamed into place only once its size and SHA-256 match, so a killed
process, a dropped connection or a wrong mirror leaves the destination as
it was (absent) and no partial file behind.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import tempfile
import urllib.error
import urllib.request
from typing import Callable

from tqdm import tqdm

from jaxrec.errors import JaxrecError

CHUNK = 1 << 20
TIMEOUT_S = 60.0


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(CHUNK << 4):
      h.update(chunk)
  return h.hexdigest()


class Unreachable(JaxrecError):
  """The server could not be reached at all (no network, DNS, refused):
  the case where a fallback or a manual step helps, unlike a wrong file."""


def fetch_url(url: str, dest: str, sha256: str, *,
              size: int | None = None, progress: bool = True,
              timeout: float = TIMEOUT_S,
              check: Callable[[str], None] | None = None) -> str:
  """Downloads `url` to `dest` unless a file with `sha256` is already there.

  Raises `Unreachable` when no connection could be made, and `JaxrecError`
  (one line naming the URL) for an HTTP error, a cut-off transfer or a
  checksum mismatch; in every case nothing is left at `dest` or beside it.
  `check(path)` may refuse the downloaded file (raising) before it is moved
  into place: a zip that does not open, say.
  """
  if os.path.isfile(dest) and (size is None or os.path.getsize(dest) == size):
    if sha256_file(dest) == sha256:
      return dest
  directory = os.path.dirname(os.path.abspath(dest))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".part-",
                             suffix=os.path.basename(dest))
  try:
    with os.fdopen(fd, "wb") as out:
      digest, got, announced = _stream(url, out, size, progress, timeout)
      out.flush()
      os.fsync(out.fileno())
    if announced is not None and got < announced:
      raise JaxrecError(f"{url}: download interrupted after {got:,} of "
                        f"{announced:,} bytes; run the command again")
    if size is not None and got != size:
      raise JaxrecError(f"{url}: got {got:,} bytes, expected {size:,}; the "
                        "server sent another file")
    if digest != sha256:
      raise JaxrecError(f"{url}: SHA-256 mismatch: expected {sha256}, got "
                        f"{digest}; the server sent another file (a wrong "
                        "mirror, or a proxy's error page)")
    if check is not None:
      check(tmp)
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dest


def _stream(url: str, out, size: int | None, progress: bool,
            timeout: float) -> tuple[str, int, int | None]:
  """Copies the response body into `out`; returns (SHA-256, bytes got,
  bytes announced by Content-Length)."""
  h = hashlib.sha256()
  got = 0
  try:
    response = urllib.request.urlopen(url, timeout=timeout)  # pylint: disable=consider-using-with
  except urllib.error.HTTPError as e:
    raise JaxrecError(f"{url}: HTTP {e.code} {e.reason}") from None
  except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
    reason = getattr(e, "reason", e)
    raise Unreachable(f"{url}: unreachable ({reason})") from None
  announced = _length(response)
  with response, _progress_bar(url, size or announced, progress) as bar:
    try:
      while chunk := response.read(CHUNK):
        out.write(chunk)
        h.update(chunk)
        got += len(chunk)
        bar.update(len(chunk))
    except (http.client.IncompleteRead, OSError) as e:
      # A dropped connection mid-body: IncompleteRead (not an OSError),
      # a reset, or a read timeout.
      raise JaxrecError(f"{url}: download interrupted after {got:,} bytes "
                        f"({type(e).__name__}); run the command again"
                        ) from None
  return h.hexdigest(), got, announced


def _length(response) -> int | None:
  value = response.headers.get("Content-Length")
  return int(value) if value and value.isdigit() else None


def _progress_bar(url: str, total: int | None, enabled: bool) -> tqdm:
  return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
              desc=url.rsplit("/", 1)[-1], disable=not enabled, leave=False)
