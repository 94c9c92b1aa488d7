"""The one exception type for bad user input; the CLI turns it into one line and exit code 2."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """Bad input from the user (a file, a line, an argument): the message names it and says what was expected."""
