"""`jaxrec data`: the registered data sets: list, fetch, and PeterRec
profile tasks built from their user features."""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any


def add_parser(sub: Any) -> argparse.ArgumentParser:
  p = sub.add_parser(
      "data", help="list and fetch public data sets (`--data NAME` reads "
      "them)",
      description="Registered data sets are fetched once from their "
      "publisher, SHA-256 checked, into $JAXREC_DATA (default "
      "~/.cache/jaxrec/datasets); `train --data NAME` then reads them.")
  actions = p.add_subparsers(dest="action", required=True,
                             parser_class=type(p))
  actions.add_parser("list", help="the data sets and whether each is here")
  fetch = actions.add_parser("fetch", help="download a data set")
  fetch.add_argument("name", metavar="NAME")
  profile = actions.add_parser(
      "profile", help="write a PeterRec profile task (a user's items, then "
      "a label from the user features) for `jaxrec finetune --task profile`")
  profile.add_argument("name", metavar="NAME")
  profile.add_argument("--label", required=True,
                       choices=("age", "gender", "occupation"))
  profile.add_argument("--out", required=True, metavar="FILE")
  return p


def run(args: argparse.Namespace) -> None:
  # pylint: disable=import-outside-toplevel
  from jaxrec.data import registry, side_info
  if args.action == "list":
    home = registry.data_home()
    for name, ds in registry.DATASETS.items():
      found = registry.located(name, home)
      where = (f"fetched ({found.origin})" if found else "not fetched")
      print(f"{name:16s} {where:18s} {ds.description}")
    print(f"data home: {home} ($JAXREC_DATA)")
  elif args.action == "fetch":
    found = registry.fetch(args.name)
    root = os.path.dirname(_first_path(found.files["ratings"]))
    print(f"{args.name}: ready in {root} ({found.origin}, SHA-256 checked)")
  else:
    lines = side_info.profile_lines(args.name, args.label)
    _write_text(args.out, "".join(f"{line}\n" for line in lines))
    print(f"{args.out}: {len(lines)} users of {args.name}, label "
          f"{args.label}")


def _first_path(where: str | tuple[str, str]) -> str:
  return where[0] if isinstance(where, tuple) else where


def _write_text(path: str, text: str) -> None:
  """Atomically: a killed run leaves no half task file behind."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
