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


# the optional dependency groups of pyproject.toml: what each one is for, in the message of a missing library
EXTRAS = {"export": "exporting, quantizing, calibrating and PyTorch runs need it", "hf": "Hugging Face models "
          "need it", "plot": "plots need it", "gguf": "reading .gguf files needs it",
          "serve": "edgekit serve needs it"}
# libraries of the extras, for the import errors no require() catches
LIBRARY_EXTRA = {"torch": "export", "onnx": "export", "onnxscript": "export", "safetensors": "export",
                 "transformers": "export", "matplotlib": "plot", "gguf": "gguf",
                 "accelerate": "gguf", "starlette": "serve", "uvicorn": "serve", "sse_starlette": "serve",
                 "prometheus_client": "serve"}


def require(module: str, extra: str = "export"):
    """Import `module`, or say which extra installs it: one line, not an ImportError."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise _missing(module.split(".")[0], extra) from None


def missing_library(e: ImportError) -> EdgekitError | None:
    """A one-line error for an import of an extra's library that the install lacks (None: not one of them)."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    extra = LIBRARY_EXTRA.get(name)
    if extra is None:
        return None
    return _missing(name, extra)


def _missing(name: str, extra: str) -> EdgekitError:
    return EdgekitError(f"{name} is not installed; {EXTRAS.get(extra, 'this command needs it')}",
                        f"pip install 'edgekit[{extra}]'")
