"""The edgekit command line: a thin shell over the Python API (edgekit.api and the workflow modules).

One module per command group; each command parses its options, calls one API function and prints the
result through edgekit.cli.render (the only module that imports rich) or, with --json, as JSON. User
mistakes are EdgekitError: one line "error: ... (fix)" and exit 1; set EDGEKIT_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import os
import sys

import typer

from edgekit.cli import bundle, engine, export, fleet, generate, models, plan, profile, render, serve
from edgekit.errors import EdgekitError, missing_library

app = typer.Typer(help="Quantize, export, validate, profile and package the V3 and R1 model families.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
for group in (models, generate, export, bundle, plan, profile, fleet, engine, serve):  # the order of 'edgekit --help'
    group.register(app)


def _version(value: bool) -> None:
    if value:
        from edgekit import __version__

        print(f"edgekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print edgekit's version and exit.")) -> None:
    """Quantize, export, validate, profile and package the V3 and R1 model families."""


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM like Ctrl-C: every staging directory and temporary file is cleaned up


def main() -> None:
    import signal
    import threading

    render.use_rich_progress()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        app()  # standalone: usage errors print click's message and exit 2
    except EdgekitError as e:
        if os.environ.get("EDGEKIT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except ImportError as e:  # torch & co. on a device install (pip install .): name the extra to install
        missing = missing_library(e)
        if missing is None or os.environ.get("EDGEKIT_DEBUG"):
            raise
        print(f"error: {missing}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
