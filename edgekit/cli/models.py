"""edgekit models, edgekit info: the presets and one model's config."""

from __future__ import annotations

import typer

from edgekit import api
from edgekit.cli import render
from edgekit.cli.options import JsonOut, Target


def models(as_json: JsonOut = False) -> None:
    """List the built-in model presets."""
    render.emit(api.list_models(), as_json, lambda r: render.show_rows(
        r, ["name", "family", "params_total", "params_unique", "layers", "d_model", "context"]))


def info(target: Target, as_json: JsonOut = False) -> None:
    """Show a model's config and parameter breakdown."""
    render.emit(api.model_info(target), as_json)


def register(app: typer.Typer) -> None:
    app.command()(models)
    app.command()(info)
