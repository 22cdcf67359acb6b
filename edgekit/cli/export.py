"""edgekit export, quantize, calibrate-skip: commands that turn a model into an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgekit import api, quiet
from edgekit.cli import render
from edgekit.cli.options import FidelityData, Force, JsonOut, OutDir, Target, Verbose, at_least, model_source, number


def export(
    target: Target,
    out: OutDir,
    fmt: Annotated[str, typer.Option("--format", help="onnx or tensorrt.")] = "onnx",
    int8: Annotated[bool, typer.Option("--int8", help="int8 weights per block, int8 activations at run time "
                                       "(ONNX Runtime MatMulNBits; CPU/ARM targets).")] = False,
    device: Annotated[str | None, typer.Option(help="Target device profile (tensorrt).")] = None,
    context: Annotated[int | None, typer.Option(callback=at_least(1, "--context"),
                                                help="Context length to plan for (tensorrt).")] = None,
    precision: Annotated[str | None, typer.Option(help="TensorRT precision (default fp16).")] = None,
    min_cosine: Annotated[float | None, typer.Option("--min-cosine", callback=number("--min-cosine", 0, 1),
                                                     help="Fail below this logit cosine, 0..1 (default 0.99 for onnx "
                                                     "int8; tensorrt: fp16 0.999, int4 0.95).")] = None,
    fidelity_data: FidelityData = None,
    max_ppl_increase: Annotated[float | None, typer.Option(
        "--max-ppl-increase", callback=number("--max-ppl-increase", 0),
        help="int8: fail when perplexity on the fidelity text rises more than this (default 0.02 = 2 %).")] = None,
    fuse: Annotated[bool, typer.Option("--fuse/--no-fuse", help="Hugging Face llama/qwen2 graphs: ONNX Runtime's "
                                       "fused GroupQueryAttention and norms (fast on the CPU provider; --no-fuse "
                                       "keeps plain ONNX ops).")] = True,
    stream: Annotated[bool | None, typer.Option(
        "--stream/--no-stream", help="Trace a few layers and stamp them to full depth, writing the weights one "
        "tensor at a time (memory ~ one layer). Default: automatic, for models over 4 GiB of fp32 weights.")] = None,
    random_weights: Annotated[bool, typer.Option(
        "--random-weights", help="Seeded random weights at the model's init scale, streamed (full-size presets "
        "or a config-only Hugging Face directory, for profiling; a checkpoint's own weights are ignored).")] = False,
    force: Force = False,
    as_json: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Export to an artifact directory (model, config, manifest); validation failures fail the command."""
    quiet.set_verbose(verbose)
    r = api.export(target, fmt, out, int8=int8, force=force, min_cosine=min_cosine, device=device,
                   context=context, precision=precision, fidelity_data=fidelity_data,
                   max_ppl_increase=max_ppl_increase, fuse=fuse, stream=stream, random_weights=random_weights)
    render.emit(r, as_json, render.show_export)


def quantize(
    target: Target,
    out: OutDir,
    min_cosine: Annotated[float, typer.Option("--min-cosine", callback=number("--min-cosine", 0, 1),
                                              help="Fail below this logit cosine (0..1).")] = 0.99,
    fidelity_data: FidelityData = None,
    force: Force = False,
    as_json: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """PyTorch dynamic int8 of the Linear layers, written as a safetensors checkpoint artifact."""
    quiet.set_verbose(verbose)
    r = api.quantize(target, out, force=force, min_cosine=min_cosine, fidelity_data=fidelity_data)
    render.emit(r, as_json, render.show_quantize)


def calibrate_skip_cmd(
    target: Annotated[Path, typer.Argument(callback=model_source, help="Hugging Face model directory (qwen2, llama, "
                                           "deepseek_v3) or a llama/qwen2 .gguf file.")],
    data: Annotated[Path, typer.Option("--data", help="Calibration text (plain UTF-8), tokenized in chunks.")],
    out: OutDir,
    layers: Annotated[str | None, typer.Option(help="Layers to gate, comma-separated (default: all).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", callback=at_least(2, "--seq-len"),
                                         help="Tokens per calibration chunk.")] = 128,
    max_ppl_increase: Annotated[float, typer.Option("--max-ppl-increase", callback=number("--max-ppl-increase", 0),
                                                    help="Default threshold: the largest whose held-out perplexity "
                                                    "rises at most this much.")] = 0.05,
    threshold: Annotated[float | None, typer.Option("--threshold", callback=number("--threshold"),
                                                    help="Set the default threshold yourself.")] = None,
    force: Force = False,
    as_json: JsonOut = False,
    verbose: Verbose = False,
) -> None:
    """Fit per-layer skip gates on calibration text; write a gated checkpoint (export keeps them as If)."""
    quiet.set_verbose(verbose)
    from edgekit.calibrate import calibrate_skip, parse_layers

    r = calibrate_skip(target, data, out, layers=parse_layers(layers), seq_len=seq_len,
                       max_ppl_increase=max_ppl_increase, threshold=threshold, force=force)
    render.emit(r, as_json, lambda r: render.say(
        f"wrote {r['out']}: {len(r['gated_layers'])} gated layers, default threshold {r['default_threshold']:.4g} "
        f"(held-out perplexity {r['chosen']['ppl']:.4g}, {r['chosen']['ppl_increase']:+.1%}; "
        f"{r['chosen']['layers_skipped_mean']:.2f} layers skipped per call)"))


def register(app: typer.Typer) -> None:
    app.command()(export)
    app.command()(quantize)
    app.command("calibrate-skip")(calibrate_skip_cmd)
