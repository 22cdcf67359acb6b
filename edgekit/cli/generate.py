"""edgekit generate: text from a preset, checkpoint or exported artifact."""

from __future__ import annotations

from typing import Annotated

import typer

from edgekit import api
from edgekit.cli import render
from edgekit.cli.options import (
    Chat,
    JsonOut,
    MaxNewTokens,
    PrefillChunk,
    Prompt,
    Seed,
    Target,
    Temperature,
    Threshold,
    TopK,
    one_of,
)


def generate(
    target: Target,
    prompt: Prompt = None,
    chat: Chat = None,
    max_new_tokens: MaxNewTokens = 16,
    threshold: Threshold = None,
    temperature: Temperature = 0.0,
    top_k: TopK = 0,
    seed: Seed = 0,
    runtime: Annotated[str | None, typer.Option(help="torch or onnxruntime (default: by artifact).")] = None,
    prefill_chunk: PrefillChunk = None,
    as_json: JsonOut = False,
) -> None:
    """Generate text with a preset, checkpoint or exported artifact."""
    one_of(prompt, chat, "generate")
    r = api.generate(target, prompt if chat is None else chat, max_new_tokens=max_new_tokens, threshold=threshold,
                     temperature=temperature, top_k=top_k, seed=seed, runtime=runtime, chat=chat is not None,
                     prefill_chunk=prefill_chunk)
    render.emit(r, as_json, render.show_generated)


def register(app: typer.Typer) -> None:
    app.command()(generate)
