"""edgekit profile, edgekit compare: measurements on this machine (edgekit.profiling)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgekit.cli import render
from edgekit.cli.options import (
    Batch,
    JsonOut,
    NewTokens,
    PrefillChunk,
    ProfRuntime,
    PromptLen,
    Provider,
    ReportOut,
    Runs,
    Target,
    Threads,
    Threshold,
    TorchDevice,
    TorchDtype,
    Warmup,
    at_least,
    model_source,
)


def profile_cmd(
    target: Target,
    runtime: ProfRuntime = None,
    prompt_len: PromptLen = 64,
    new_tokens: NewTokens = 32,
    batch: Batch = 1,
    warmup: Warmup = 1,
    runs: Runs = 5,
    threshold: Threshold = None,
    sweep: Annotated[str | None, typer.Option("--sweep-threshold", help="R1: also measure at these thresholds "
                                              "(0,0.5,0.9,2 or START:STOP:N).")] = None,
    workload: Annotated[str, typer.Option(help="single, or mixed: seeded requests of mixed lengths.")] = "single",
    batching: Annotated[str, typer.Option(help="mixed workload: fixed, dynamic or both.")] = "both",
    requests: Annotated[int, typer.Option(callback=at_least(1, "--requests"),
                                          help="mixed workload: number of requests.")] = 16,
    token_budget: Annotated[int | None, typer.Option("--token-budget", callback=at_least(1, "--token-budget"),
                                                     help="dynamic batching: rows x (prompt + "
                                                     "new tokens) per batch (default: fixed's worst case).")] = None,
    dtype: TorchDtype = None,
    device: TorchDevice = None,
    provider: Provider = None,
    threads: Threads = None,
    prefill_chunk: PrefillChunk = None,
    seed: Annotated[int, typer.Option(callback=at_least(0, "--seed"),
                                      help="Seed of the prompts and the mixed workload.")] = 0,
    energy: Annotated[bool, typer.Option(help="Measure energy where the device reports power.")] = True,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG (latency distribution, sweep, "
                                              "batching).")] = None,
    out: ReportOut = None,
    as_json: JsonOut = False,
) -> None:
    """Measure latency, throughput, memory, R1 skipping and energy on this machine (Ctrl-C keeps what was measured)."""
    from edgekit.profiling import profile

    r = profile(target, runtime, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, warmup=warmup, runs=runs,
                threshold=threshold, sweep=sweep, workload=workload, batching=batching, requests=requests,
                token_budget=token_budget, dtype=dtype, device=device, provider=provider, threads=threads,
                prefill_chunk=prefill_chunk, seed=seed,
                energy=energy, out=out, plot=plot)
    render.emit(r, as_json, render.show_profile)
    if r["interrupted"]:
        raise SystemExit(130)


def compare_cmd(
    a: Annotated[str, typer.Argument(callback=model_source, help="First preset, checkpoint or artifact.")],
    b: Annotated[str | None, typer.Argument(callback=model_source,
                                            help="Second target (omit with --runtime R1,R2).")] = None,
    runtime: Annotated[str | None, typer.Option("--runtime", help="One runtime for both targets, or R1,R2 to compare "
                                                "two runtimes on one target (outputs included).")] = None,
    int8: Annotated[bool, typer.Option("--int8", help="Compare the int8 forms (torch-int8 checkpoint, or ONNX "
                                       "dynamic int8 for onnxruntime).")] = False,
    prompt_len: PromptLen = 64,
    new_tokens: NewTokens = 32,
    batch: Batch = 1,
    warmup: Warmup = 1,
    runs: Runs = 5,
    threshold: Threshold = None,
    dtype: TorchDtype = None,
    device: TorchDevice = None,
    provider: Provider = None,
    threads: Threads = None,
    out: ReportOut = None,
    as_json: JsonOut = False,
) -> None:
    """Profile two targets (or two runtimes) under identical settings, each in a fresh process; print the table."""
    from edgekit.profiling import compare

    r = compare(a, b, runtime=runtime, int8=int8, out=out, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch,
                warmup=warmup, runs=runs, threshold=threshold, dtype=dtype, device=device, provider=provider,
                threads=threads)
    render.emit(r, as_json, render.show_compare)
    if r["interrupted"]:
        raise SystemExit(130)


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_cmd)
    app.command("compare")(compare_cmd)
