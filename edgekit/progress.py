"""Progress display for long steps on stderr: a live bar on a terminal, then one line per finished stage with
its elapsed time (a plain line in a pipe too); silent when EDGEKIT_QUIET is set (tests).

This module is the bottom layer and imports no display library: by default it writes one plain line
that it rewrites in place; the CLI installs its rich progress bar with set_display()."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

Advance = Callable[..., None]
Display = Callable[[str, "float | None"], AbstractContextManager[Advance]]

_display: Display | None = None


def set_display(display: Display | None) -> None:
    """Use `display(description, total)` (a context manager yielding advance) for every progress; None: plain."""
    global _display
    _display = display


@contextlib.contextmanager
def plain(description: str, total: float | None = None) -> Iterator[Advance]:
    """One stderr line, rewritten at most 10 times a second and cleared at the end."""
    state = {"done": 0.0, "text": description, "shown": 0.0}
    t0 = time.monotonic()

    def advance(n: float = 1, description: str | None = None) -> None:
        state["done"] += n
        state["text"] = description or state["text"]
        now = time.monotonic()
        if now - state["shown"] >= 0.1:
            state["shown"] = now
            count = f" {state['done']:.0f}/{total:.0f}" if total else ""
            sys.stderr.write(f"\r\033[K{state['text']}{count} {now - t0:.0f}s")
            sys.stderr.flush()

    try:
        yield advance
    finally:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


@contextlib.contextmanager
def progress(description: str, total: float | None = None) -> Iterator[Advance]:
    """Yields advance(n=1, description=None). total=None shows a spinner-like bar. When the stage ends, one
    line "description  12.3s" stays on stderr, on a terminal and in a pipe alike (not with EDGEKIT_QUIET)."""
    if os.environ.get("EDGEKIT_QUIET"):
        yield lambda *a, **k: None
        return
    t0 = time.monotonic()
    if sys.stderr.isatty():
        with (_display or plain)(description, total) as advance:
            yield advance
    else:
        yield lambda *a, **k: None
    sys.stderr.write(f"{description}  {time.monotonic() - t0:.1f}s\n")
    sys.stderr.flush()
