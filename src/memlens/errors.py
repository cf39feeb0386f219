"""User-facing errors.

A `MemlensError` carries a message meant for a person: it names the file, line or field at fault and what was
expected. The CLI prints it on one line and exits with status 2, without a traceback.
"""


class MemlensError(Exception):
    """An error caused by the user's input or setup, with a message that says what to fix."""


class InputError(MemlensError, ValueError):
    """A file, field or argument does not hold what was expected."""
