"""User-facing errors.

Anything a user can get wrong (a path, a malformed row, an option value, a
checkpoint of another model) raises `JaxrecError` with a one-line message that
names the file, line, field or option. The CLI prints it as
`jaxrec: error: <message>` and exits with status 2 -- never a traceback.
"""


class JaxrecError(Exception):
  """A mistake in the user's input, reported as one line without traceback."""


def first_line(error: BaseException) -> str:
  """The first line of an exception's message ("" if it has none): what a
  one-line `JaxrecError` quotes of a library's multi-line error."""
  text = str(error).strip()
  return text.splitlines()[0] if text else ""
