"""Progress display for long steps: a rich progress bar on stderr, silent when not a terminal
or when EDGEKIT_QUIET is set (tests, --json pipelines)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

Advance = Callable[..., None]


@contextlib.contextmanager
def progress(description: str, total: float | None = None) -> Iterator[Advance]:
    """Yields advance(n=1, description=None). total=None shows a spinner-like bar."""
    if os.environ.get("EDGEKIT_QUIET") or not sys.stderr.isatty():
        yield lambda *a, **k: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f}" if total else ""), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: float = 1, description: str | None = None) -> None:
            bar.update(task, advance=n, **({"description": description} if description else {}))

        yield advance
