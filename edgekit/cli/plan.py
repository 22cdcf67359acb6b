"""edgekit devices, edgekit plan: target-device profiles and the estimate (edgekit.plan, profiles/)."""

from __future__ import annotations

from typing import Annotated

import typer

from edgekit.cli import render
from edgekit.cli.options import Device, JsonOut, model_source
from edgekit.errors import EdgekitError


def devices(as_json: JsonOut = False) -> None:
    """List the target-device profiles (profiles/*.toml) and this machine ('host', measured once)."""
    from edgekit.plan import list_devices

    render.emit(list_devices(), as_json, lambda r: render.show_rows(
        r, ["name", "kind", "sm", "memory_gib", "bandwidth_gbs", "fp16_tflops", "int8_tops", "precisions",
            "tensorrt"]))


def plan(
    target: Annotated[str | None, typer.Argument(callback=model_source, help="Preset, checkpoint, Hugging Face or "
                                                 "artifact directory, or .gguf file (omit with --select).")] = None,
    device: Device = "host",
    precision: Annotated[str | None, typer.Option(help="fp32, fp16, bf16, fp8, int8 or int4 (default: a table "
                                                       "of every precision the device supports).")] = None,
    context: Annotated[int | None, typer.Option(help="Tokens in context (default 4096, or the model's "
                                                     "max_seq_len if smaller).")] = None,
    batch: Annotated[int, typer.Option(help="Sequences decoded together.")] = 1,
    select: Annotated[bool, typer.Option("--select", help="Choose V3 or R1 for --task by the brief's selection "
                                                          "framework and check it against the numbers.")] = False,
    task: Annotated[str | None, typer.Option(help="With --select: reasoning, chat or general.")] = None,
    fallback: Annotated[str | None, typer.Option("--fallback", callback=model_source,
                                                 help="A cascade's second model (edgekit serve MODEL --fallback M): "
                                                 "the memory of both held at once.")] = None,
    as_json: JsonOut = False,
) -> None:
    """Estimate whether a model fits a device and how fast it runs (an estimate, with its assumptions)."""
    from edgekit import plan as planner

    if select:
        if fallback is not None:
            raise EdgekitError("--fallback applies to a plan for MODEL", "drop --select, or drop --fallback")
        if target is not None or precision is not None:
            raise EdgekitError("--select chooses the model and precision", "drop MODEL and --precision")
        if task is None:
            raise EdgekitError("--select needs --task", f"one of: {', '.join(planner.TASKS)}")
        render.emit(planner.select(device, task, context=context, batch=batch), as_json, render.show_select)
        return
    if task is not None:
        raise EdgekitError("--task only applies with --select", "add --select, or drop --task")
    if target is None:
        raise EdgekitError("plan needs a MODEL", "e.g. 'edgekit plan v3-13b --device a100-40gb', or --select --task T")
    render.emit(planner.plan(target, device, precision=precision, context=context, batch=batch, fallback=fallback),
                as_json, render.show_plan)


def register(app: typer.Typer) -> None:
    app.command()(devices)
    app.command()(plan)
