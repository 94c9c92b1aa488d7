"""The one exception type for bad user input; the CLI turns it into one line and exit code 2.

An error about one setting carries its `key` (the config key, e.g. `model`, `validation.k`) apart
from the message, so that it is reported in the words of its source: `model: ...` when the value came
from a config file or a `key=value` override, `--model: ...` when it came from a command-line flag
(the CLI renames the key to the flag that set it).
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["MAX_LINE", "UserError", "echo", "first_line"]

MAX_LINE = 600  # an error line never echoes more (a YAML alias bomb once made one of 58 MB)


_ECHO = reprlib.Repr()  # keyword arguments need Python 3.12
_ECHO.maxlevel, _ECHO.maxlist, _ECHO.maxtuple, _ECHO.maxdict, _ECHO.maxstring, _ECHO.maxother = 3, 6, 6, 6, 120, 120


def echo(value: Any) -> str:
    """A bad value as an error message shows it: its repr, cut short (huge or deeply nested values stay cheap)."""
    return _ECHO.repr(value)


def first_line(e: BaseException, *, limit: int = 300, with_type: bool = False) -> str:
    """A library's exception as a clause of a one-line error: its first line, cut at `limit` characters
    (prefixed with its type when `with_type`); its type alone when it has no message."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0][:limit]
    return f"{type(e).__name__}: {line}" if with_type else line


class UserError(Exception):
    """Bad input from the user (a file, a line, an argument): the message names it and says what was expected."""

    def __init__(self, message: str, *, key: str | None = None, where: str | None = None) -> None:
        self.detail = message
        self.key = key
        self.where = where
        super().__init__(message)

    def __str__(self) -> str:
        return self.render()

    def render(self, name: str | None = None) -> str:
        """The one line: `WHERE: NAME: detail`, NAME being the key unless the caller renames it (a CLI flag)."""
        parts = [p for p in (self.where, name or self.key) if p]
        line = ": ".join([*parts, self.detail]).replace("\n", " ")
        if len(line) > MAX_LINE:
            line = f"{line[: MAX_LINE - 60]} ... [{len(line) - MAX_LINE + 60} characters cut] {line[-40:]}"
        return line
