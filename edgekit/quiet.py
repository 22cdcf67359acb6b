"""Third-party output during export / quantize / calibrate-skip goes to a log file inside the artifact, not to
the terminal: Python warnings, `logging` records (the ONNX Runtime quantizer's `WARNING:root:...`, torch.export's
logs) and whatever C/C++ libraries write to the stdout/stderr file descriptors (ONNX Runtime, torch).

edgekit's own progress lines still reach the terminal: while captured, sys.stdout / sys.stderr point at
duplicates of the original descriptors, and only descriptors 1 and 2 (and the handlers that hold the old
stream objects) lead to the file. `set_verbose(True)` (the CLI's --verbose) or EDGEKIT_VERBOSE=1 leaves
everything live. Bottom layer: no torch, no rich."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

LOG_DIR = "logs"
_verbose = False


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = verbose


def verbose() -> bool:
    return _verbose or bool(os.environ.get("EDGEKIT_VERBOSE"))


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # a StringIO (tests), a closed stream
        return None


@contextlib.contextmanager
def _redirect_fd(fd: int, target: int, stream_name: str) -> Iterator[None]:
    """Point descriptor `fd` at `target`; sys.<stream_name>, if it wrote to `fd`, moves to a duplicate of it."""
    stream = getattr(sys, stream_name)
    with contextlib.suppress(Exception):
        stream.flush()
    saved = os.dup(fd)
    replacement = None
    if _fileno(stream) == fd:
        replacement = io.TextIOWrapper(io.FileIO(os.dup(saved), "w"), encoding=getattr(stream, "encoding", None)
                                       or "utf-8", errors="replace", line_buffering=True, write_through=True)
        setattr(sys, stream_name, replacement)
    os.dup2(target, fd)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            getattr(sys, stream_name).flush()
        os.dup2(saved, fd)
        os.close(saved)
        if replacement is not None:
            setattr(sys, stream_name, stream)
            replacement.close()


class captured:
    """Send third-party warnings, logging and descriptor-level output to the file `log` (created with its
    directory; None: a temporary file, deleted at the end) from entering until close() or the end of the block;
    with verbose() they stay live and the file only says so. close() before hashing the file (write_manifest)."""

    def __init__(self, log: str | Path | None, what: str = ""):
        self.what, self.path, self._temporary = what, None if log is None else Path(log), log is None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> captured:
        import tempfile

        if self.path is None:
            fd, name = tempfile.mkstemp(prefix="edgekit-", suffix=".log")
            os.close(fd)
            self.path = Path(name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stack = contextlib.ExitStack()
        f = self._stack.enter_context(open(self.path, "a", encoding="utf-8", errors="replace"))
        f.write(f"# edgekit {self.what or 'log'} {time.strftime('%Y-%m-%dT%H:%M:%S%z')}: third-party warnings and "
                "logs\n")
        if verbose():
            f.write("# --verbose: shown live on the terminal instead\n")
        f.flush()
        if not verbose():
            self._stack.enter_context(_captured(f))
        return self

    def close(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()

    def copy_into(self, directory: str | Path, name: str | None = None) -> Path:
        """Copy what was logged so far to DIRECTORY/logs/NAME (an artifact's log when the log was temporary)."""
        import shutil

        target = Path(directory) / LOG_DIR / (name or self.path.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path, target)
        return target

    def __exit__(self, *exc) -> None:
        self.close()
        if self._temporary and self.path is not None:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def _captured(f) -> Iterator[None]:
    def to_log(message, category, filename, lineno, file=None, line=None):
        f.write(warnings.formatwarning(message, category, filename, lineno, line))
        f.flush()

    handler = logging.StreamHandler(f)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    root = logging.getLogger()
    saved_handlers = root.handlers[:]
    root.handlers = [handler]  # logging.warning() & co. then install no stderr handler of their own
    try:
        with warnings.catch_warnings(), _redirect_fd(1, f.fileno(), "stdout"), _redirect_fd(2, f.fileno(), "stderr"):
            warnings.simplefilter("default")
            warnings.showwarning = to_log
            yield
    finally:
        root.handlers = saved_handlers
        handler.flush()
