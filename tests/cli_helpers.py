"""What the CLI tests share: the tiny run's flags and the one-line error
check (`trained_run`, the tiny run itself, is a fixture in conftest)."""
from jaxrec import cli

TINY_MODEL = ["--num-blocks", "2", "--embed-dim", "8", "--batch-size", "16",
              "--max-len", "20", "--quiet"]
TINY = ["--data", "synthetic:tiny", "--steps", "6", "--eval-every", "3",
        *TINY_MODEL]


def run_error(capsys, argv):
  """In-process CLI run expecting a user error: exit 2 and exactly one
  line, `jaxrec: error: ...`; returns that line."""
  assert cli.main([str(a) for a in argv]) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxrec: error: "), lines
  return lines[0]
