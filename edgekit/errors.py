"""The one user-error family. The CLI turns these into a one-line message and exit code 1."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class EdgekitError(Exception):
    """A mistake the user can fix: bad name, missing or corrupt file, wrong shape, no space.

    `fix` says what to do about it; the CLI prints "error: <message> (<fix>)".
    """

    def __init__(self, message: str, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message


def unknown_name(kind: str, name: str, known: Iterable[str]) -> EdgekitError:
    """An unknown `kind` called `name`: lists the known ones and the nearest match."""
    known = sorted(known)
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
    hint = f"did you mean '{near[0]}'? " if near else ""
    return EdgekitError(f"unknown {kind} '{name}'", f"{hint}known: {', '.join(known)}")
