"""How the command line speaks to its user: one-line errors and warnings.

This module imports nothing of the package, so every command can use it without
pulling in the others (and without import circles).
"""

from __future__ import annotations

import sys

__all__ = ["PROG", "UserError", "one_line", "warn"]

PROG = "byol-pytorch"


class UserError(Exception):
    """Bad input from the user: the command prints the message as one line and exits 1."""


def one_line(message: object) -> str:
    """The message with every run of whitespace (newlines included) made one space."""
    return " ".join(str(message).split())


def warn(message: str) -> None:
    """One warning line on stderr, prefixed like the command's errors."""
    print(f"{PROG}: warning: {one_line(message)}", file=sys.stderr, flush=True)
