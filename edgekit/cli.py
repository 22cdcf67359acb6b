"""The edgekit command line: a thin shell over the Python API (edgekit.api).

Each command parses its options, calls one API function and prints the result as a rich table or,
with --json, as JSON. User mistakes are EdgekitError: one line "error: ... (fix)" and exit 1; set
EDGEKIT_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from edgekit import api
from edgekit.errors import EdgekitError

app = typer.Typer(help="Quantize, export, validate, profile and package the V3 and R1 model families.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()

Target = Annotated[str, typer.Argument(help="Preset name (see 'edgekit models'), checkpoint or artifact directory.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
OutDir = Annotated[Path, typer.Option("--out", help="Output directory (written atomically).")]


def emit(data, as_json: bool, render=None) -> None:
    """Print `data` as JSON, or through `render(data)` (default: key/value table)."""
    if as_json:
        print(json.dumps(data, indent=1, default=str))
    elif render is not None:
        render(data)
    else:
        table = Table(show_header=False)
        for k, v in data.items():
            table.add_row(str(k), json.dumps(v, default=str) if isinstance(v, dict | list) else str(v))
        console.print(table)


def table_of(rows: list[dict], columns: list[str], title: str | None = None) -> Table:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in columns))
    return table


@app.command()
def models(as_json: JsonOut = False) -> None:
    """List the built-in model presets."""
    rows = api.list_models()
    emit(rows, as_json, lambda r: console.print(table_of(
        r, ["name", "family", "params_total", "params_unique", "layers", "d_model", "context"])))


@app.command()
def info(target: Target, as_json: JsonOut = False) -> None:
    """Show a model's config and parameter breakdown."""
    emit(api.model_info(target), as_json)


@app.command()
def generate(
    target: Target,
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue.")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate.")] = 16,
    threshold: Annotated[float | None, typer.Option("--threshold", help="R1 skip threshold (all gates).")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens (0 = all).")] = 0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    runtime: Annotated[str | None, typer.Option(help="torch or onnxruntime (default: by artifact).")] = None,
    as_json: JsonOut = False,
) -> None:
    """Generate text with a preset, checkpoint or exported artifact."""
    r = api.generate(target, prompt, max_new_tokens=max_new_tokens, threshold=threshold,
                     temperature=temperature, top_k=top_k, seed=seed, runtime=runtime)
    if as_json:
        emit(r, True)
        return
    console.print(r["text"], markup=False, highlight=False)
    if r.get("layer_slots"):
        console.print(f"[dim]{r['runtime']}: R1 skipped {r['skipped']} of {r['layer_slots']} layer executions "
                      f"({100 * r['skipped'] / r['layer_slots']:.0f}%)[/dim]")


def main() -> None:
    try:
        app(standalone_mode=False)
    except EdgekitError as e:
        if os.environ.get("EDGEKIT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except typer.Abort:
        sys.exit(1)
    except Exception as e:  # click usage errors carry their own exit codes
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
