"""edgekit build-engine: the TensorRT engine, built on the device from an artifact's recipe."""

from __future__ import annotations

from typing import Annotated

import typer

from edgekit.cli import render
from edgekit.cli.options import JsonOut


def build_engine(
    target: Annotated[str, typer.Argument(help="TensorRT artifact (export --format tensorrt) or installed bundle.")],
    force: Annotated[bool, typer.Option("--force", help="Build even for a recipe made for another GPU (SM) or "
                                        "TensorRT version, or over an existing engine.")] = False,
    as_json: JsonOut = False,
) -> None:
    """Build the TensorRT engine on this device from the artifact's recipe (needs TensorRT and a GPU)."""
    from edgekit.engine import build_engine as build

    render.emit(build(target, force=force), as_json)


def register(app: typer.Typer) -> None:
    app.command("build-engine")(build_engine)
