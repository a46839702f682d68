"""The `jaxrec` command: train, eval, inspect, grow; one module per verb.

A user mistake prints one line, `jaxrec: error: ...`, and exits with
status 2; Ctrl-C exits with 130.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jaxrec.errors import JaxrecError


class Parser(argparse.ArgumentParser):
  """argparse that raises JaxrecError instead of printing usage and exiting."""

  def error(self, message: str):
    raise JaxrecError(f"{self.prog}: {message}")


def verbs():
  """The verb modules, each with `add_parser(subparsers)` and `run(args)`."""
  # pylint: disable=import-outside-toplevel
  from jaxrec.cli import eval as eval_verb
  from jaxrec.cli import grow, inspect, train
  return {"train": train, "eval": eval_verb, "inspect": inspect,
          "grow": grow}


def build_parser() -> Parser:
  parser = Parser(prog="jaxrec", description="Very deep sequential "
                  "recommenders in JAX: train, evaluate, inspect, grow.")
  sub = parser.add_subparsers(dest="command", required=True,
                              parser_class=Parser)
  for module in verbs().values():
    module.add_parser(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  # Orbax logs every read-only open through absl; keep the terminal clean.
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    args = build_parser().parse_args(argv)
    verbs()[args.command].run(args)
  except JaxrecError as e:
    print(f"jaxrec: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxrec: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
