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
FidelityData = Annotated[Path | None, typer.Option(
    "--fidelity-data", help="Text file the int8 fidelity check decodes (default: random tokens; task text for the "
    "reference checkpoints).")]


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
    prompt: Annotated[str | None, typer.Option("--prompt", help="Text to continue.")] = None,
    chat: Annotated[str | None, typer.Option("--chat", help="A user message, rendered with the model's chat "
                                             "template (Hugging Face models) and answered.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate.")] = 16,
    threshold: Annotated[float | None, typer.Option("--threshold", help="R1 skip threshold (all gates).")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample from the k most likely tokens (0 = all).")] = 0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    runtime: Annotated[str | None, typer.Option(help="torch or onnxruntime (default: by artifact).")] = None,
    as_json: JsonOut = False,
) -> None:
    """Generate text with a preset, checkpoint or exported artifact."""
    _one_of(prompt, chat, "generate")
    r = api.generate(target, prompt if chat is None else chat, max_new_tokens=max_new_tokens, threshold=threshold,
                     temperature=temperature, top_k=top_k, seed=seed, runtime=runtime, chat=chat is not None)
    if as_json:
        emit(r, True)
        return
    console.print(r["text"], markup=False, highlight=False)
    if r.get("layer_slots"):
        console.print(f"[dim]{r['runtime']}: skipped {r['skipped']} of {r['layer_slots']} gated-layer executions "
                      f"({100 * r['skipped'] / r['layer_slots']:.0f}%)[/dim]")


def _one_of(prompt: str | None, chat: str | None, command: str) -> None:
    if (prompt is None) == (chat is None):
        raise EdgekitError(f"{command} needs one of --prompt or --chat", "--prompt TEXT continues text; --chat "
                           "MESSAGE answers it through the model's chat template")


@app.command()
def export(
    target: Target,
    out: OutDir,
    fmt: Annotated[str, typer.Option("--format", help="onnx or tensorrt.")] = "onnx",
    int8: Annotated[bool, typer.Option("--int8", help="ONNX Runtime dynamic int8 (CPU/ARM targets).")] = False,
    device: Annotated[str | None, typer.Option(help="Target device profile (tensorrt).")] = None,
    context: Annotated[int | None, typer.Option(help="Context length to plan for (tensorrt).")] = None,
    precision: Annotated[str | None, typer.Option(help="TensorRT precision (default fp16).")] = None,
    min_cosine: Annotated[float | None, typer.Option("--min-cosine", help="Fail below this logit cosine (default "
                                                     "0.99 for onnx int8; tensorrt: fp16 0.999, int4 0.95).")] = None,
    fidelity_data: FidelityData = None,
    force: Force = False,
    as_json: JsonOut = False,
) -> None:
    """Export to an artifact directory (model, config, manifest); validation failures fail the command."""
    r = api.export(target, fmt, out, int8=int8, force=force, min_cosine=min_cosine, device=device,
                   context=context, precision=precision, fidelity_data=fidelity_data)
    if as_json:
        emit(r, True)
        return
    v = r.get("validation", {})
    console.print(f"wrote {r['out']} ({r['format']}, {r['precision']}; files: {', '.join(r['files'])})")
    if "fp32" in v:
        console.print(f"validated fp32 vs PyTorch: {len(v['fp32']['cases'])} cases, max abs diff "
                      f"{v['fp32']['max_abs_diff']:.2e}, skip patterns {v['fp32']['distinct_skip_patterns']}")
    if "int8" in v:
        console.print(f"int8: size {r['size']['int8_over_fp32']:.1%} of fp32, logit cosine "
                      f"{v['int8']['logit_cosine_mean']:.5f}, argmax agreement {v['int8']['argmax_agreement']:.1%} "
                      f"(on {v['int8']['inputs']})")
    for name, rep in v.get("onnxruntime_cpu", {}).items():
        console.print(f"validated in ONNX Runtime ({name.replace('_', ' ')}): logit cosine "
                      f"{rep['logit_cosine_mean']:.5f}, argmax agreement {rep['argmax_agreement']:.1%}")
    if "engine" in r:
        e = r["engine"]
        why = f" ({e['why']}; {e['how']})" if e.get("why") else ""
        console.print(f"engine: {e.get('status')}{why}", markup=False)


@app.command()
def quantize(
    target: Target,
    out: OutDir,
    min_cosine: Annotated[float, typer.Option("--min-cosine", help="Fail below this logit cosine.")] = 0.99,
    fidelity_data: FidelityData = None,
    force: Force = False,
    as_json: JsonOut = False,
) -> None:
    """PyTorch dynamic int8 of the Linear layers, written as a safetensors checkpoint artifact."""
    r = api.quantize(target, out, force=force, min_cosine=min_cosine, fidelity_data=fidelity_data)
    if as_json:
        emit(r, True)
        return
    v = r["validation"]["int8"]
    console.print(f"wrote {r['out']}: size {r['size']['int8_over_fp32']:.1%} of fp32, logit cosine "
                  f"{v['logit_cosine_mean']:.5f}, argmax agreement {v['argmax_agreement']:.1%} (on {v['inputs']})")


@app.command("calibrate-skip")
def calibrate_skip_cmd(
    target: Annotated[Path, typer.Argument(help="Hugging Face model directory (qwen2, llama, deepseek_v3).")],
    data: Annotated[Path, typer.Option("--data", help="Calibration text (plain UTF-8), tokenized in chunks.")],
    out: OutDir,
    layers: Annotated[str | None, typer.Option(help="Layers to gate, comma-separated (default: all).")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration chunk.")] = 128,
    max_ppl_increase: Annotated[float, typer.Option("--max-ppl-increase", help="Default threshold: the largest "
                                                    "whose held-out perplexity rises at most this much.")] = 0.05,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Set the default threshold yourself.")] = None,
    force: Force = False,
    as_json: JsonOut = False,
) -> None:
    """Fit per-layer skip gates on calibration text; write a gated checkpoint (export keeps them as If)."""
    from edgekit.calibrate import calibrate_skip, parse_layers

    r = calibrate_skip(target, data, out, layers=parse_layers(layers), seq_len=seq_len,
                       max_ppl_increase=max_ppl_increase, threshold=threshold, force=force)
    if as_json:
        emit(r, True)
        return
    c = r["chosen"]
    say(f"wrote {r['out']}: {len(r['gated_layers'])} gated layers, default threshold {r['default_threshold']:.4g} "
        f"(held-out perplexity {c['ppl']:.4g}, {c['ppl_increase']:+.1%}; {c['layers_skipped_mean']:.2f} layers "
        "skipped per call)")


# --- IoT bundles (edgekit.package): keygen, package, verify, install, run --------------------------

PublicKey = Annotated[Path | None, typer.Option("--public-key", help="ed25519 public key (edgekit.pub); "
                                                 "the bundle must then carry a valid signature.")]
BundleFile = Annotated[Path, typer.Argument(help="Bundle file (.tar.gz) written by 'edgekit package'.")]


def say(text: str) -> None:
    """Plain text, unwrapped (paths and hashes stay on one line)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command("keygen")
def keygen_cmd(
    out: Annotated[Path, typer.Option("--out", help="Directory for edgekit.key (private) and edgekit.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
    as_json: JsonOut = False,
) -> None:
    """Create an ed25519 key pair for signing bundles."""
    from edgekit import package as bundles

    r = bundles.keygen(out, force=force)
    emit(r, as_json, lambda r: say(
        f"wrote {r['private_key']} (private: keep it on the build machine) and {r['public_key']} "
        f"(ship this one; key id {r['key_id']})"))


@app.command("package")
def package_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (export, quantize or checkpoint).")],
    device: Annotated[str, typer.Option("--device", help="Target device profile (e.g. cpu, jetson-orin-nano).")],
    out: Annotated[Path, typer.Option("--out", help="Bundle file to write (.tar.gz, written atomically).")],
    sign_key: Annotated[Path | None, typer.Option("--sign-key", help="ed25519 private key (edgekit.key).")] = None,
    runtime: Annotated[str | None, typer.Option(help="Runtime on the device (default: by artifact).")] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads on the device.")] = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="R1 skip threshold (all gates).")] = None,
    force: Force = False,
    as_json: JsonOut = False,
) -> None:
    """Bundle an artifact for a device: one reproducible, optionally signed .tar.gz."""
    from edgekit import package as bundles

    r = bundles.package(artifact, device, out, sign_key=sign_key, runtime=runtime, threads=threads,
                        threshold=threshold, force=force)
    emit(r, as_json, lambda r: say(
        f"wrote {r['bundle']}: {r['model']} for {r['device']}, {r['files']} files, {r['bytes']} bytes, "
        f"sha256 {r['sha256']}, signed: {r['signed']}"))


@app.command("verify")
def verify_cmd(file: BundleFile, public_key: PublicKey = None, as_json: JsonOut = False) -> None:
    """Check a bundle: signature, every file's hash, none missing, none extra."""
    from edgekit import package as bundles

    r = bundles.verify(file, public_key)
    emit(r, as_json, lambda r: say(
        "\n".join([f"OK {r['bundle']}: {r['model']} for {r['device']}", *(f"  {c}" for c in r["checks"])]),))


@app.command("install")
def install_cmd(
    file: BundleFile,
    dest: Annotated[Path, typer.Option("--dest", help="Directory to install into (created atomically).")],
    public_key: PublicKey = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an installed bundle at --dest and skip the "
                                                         "machine check.")] = False,
    as_json: JsonOut = False,
) -> None:
    """Verify a bundle, check this machine against its target, and install it atomically."""
    from edgekit import package as bundles

    r = bundles.install(file, dest, public_key=public_key, force=force)
    emit(r, as_json, lambda r: say(
        "\n".join([f"installed {r['model']} to {r['installed']} (signature: {r['signature']}; engine: "
                   f"{r['engine']})", *(f"  machine: {m}" for m in r["machine"])])))


@app.command("run")
def run_cmd(
    target: Annotated[Path, typer.Argument(help="Installed bundle directory, or a bundle file.")],
    prompt: Annotated[str | None, typer.Option("--prompt", help="Text to continue.")] = None,
    chat: Annotated[str | None, typer.Option("--chat", help="A user message, rendered with the model's chat "
                                             "template (Hugging Face models) and answered.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate.")] = 16,
    public_key: PublicKey = None,
    threshold: Annotated[float | None, typer.Option("--threshold", help="Override the bundle's threshold.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Run a bundle file even if this machine does not "
                                                         "match its target.")] = False,
    as_json: JsonOut = False,
) -> None:
    """Run an installed bundle (or verify and run a bundle file) with its runtime and settings."""
    from edgekit import package as bundles

    _one_of(prompt, chat, "run")
    r = bundles.run(target, prompt if chat is None else chat, max_new_tokens=max_new_tokens, public_key=public_key,
                    threshold=threshold, force=force, chat=chat is not None)
    if as_json:
        emit(r, True)
        return
    say(r["text"])
    if r.get("layer_slots"):
        console.print(f"[dim]{r['runtime']}: skipped {r['skipped']} of {r['layer_slots']} gated-layer executions "
                      f"({100 * r['skipped'] / r['layer_slots']:.0f}%)[/dim]")


# devices and plan (issue 5): the work is in edgekit.plan and profiles/ -------------------------
Device = Annotated[str, typer.Option("--device", help="Target device profile (see 'edgekit devices'), or 'host'.")]


@app.command()
def devices(as_json: JsonOut = False) -> None:
    """List the target-device profiles (profiles/*.toml) and this machine ('host', measured once)."""
    from edgekit.plan import list_devices

    emit(list_devices(), as_json, lambda r: console.print(table_of(
        r, ["name", "kind", "sm", "memory_gib", "bandwidth_gbs", "fp16_tflops", "int8_tops", "precisions",
            "tensorrt"])))


def _show_plan(r: dict) -> None:
    short = {"precision": "prec", "weights_gib": "weights", "kv_cache_gib": "KV",
             "kv_cache_decompressed_gib": "KV decompressed", "activations_gib": "act",
             "overhead_gib": "overhead", "total_gib": "total", "margin_gib": "margin", "fits": "fits",
             "max_context": "max ctx", "prefill_s": "prefill s", "decode_tokens_per_s": "decode tok/s",
             "decode_tokens_per_s_if_60pct_skipped": "tok/s 60% skip"}
    rows = [{short[k]: f"{v:.3g}" if isinstance(v, float) else ("yes" if v else "NO") if isinstance(v, bool) else v
             for k, v in row.items() if k in short}
            for row in r["rows"]]
    console.print(f"[bold]{r['label']}[/bold]: {r['model']} on {r['device']} ({r['device_title']}, "
                  f"{r['device_gib']:g} GiB), {r['context']} tokens x batch {r['batch']}; memory in GiB",
                  highlight=False)
    params, kv = r["params"], r["kv_cache"]
    active = f", {params['active'] / 1e9:.2f} B active per token (MoE)" if "active" in params else ""
    console.print(f"parameters: {params['unique'] / 1e9:.2f} B{active}; KV cache: {kv['fp16_bytes_per_token']:,} "
                  f"fp16 bytes per token ({kv['basis']})", markup=False, highlight=False)
    if "decompressed" in kv:
        console.print(f"  decompressed K/V would be {kv['decompressed']['fp16_bytes_per_token']:,} fp16 bytes per "
                      f"token ({kv['decompressed']['basis']})", markup=False, highlight=False)
    console.print(table_of(rows, [c for c in short.values() if c in rows[0]]))
    console.print(f"[bold]recommendation:[/bold] {r['recommendation']}", highlight=False)
    for title, lines in (("device", r["device_notes"]), ("assumptions", r["assumptions"])):
        console.print(f"[bold]{title}:[/bold]")
        for line in lines:
            console.print(f"  - {line}", markup=False, highlight=False)


def _show_select(r: dict) -> None:
    console.print(f"[bold]{r['label']}[/bold]: selection for task '{r['task']}' on {r['device']}, "
                  f"{r['context']} tokens x batch {r['batch']}", highlight=False)
    choice = f"{r['choice']} at {r['precision']}" if r["choice"] else "no full-size model fits"
    console.print(f"[bold]choice:[/bold] {choice} (rule: {r['rule']['choice']}, because {r['rule']['because']}; "
                  f"numbers: {r['numbers']['because']})", highlight=False)
    for line in r["explanation"] + r["notes"] + r["assumptions"]:
        console.print(f"  - {line}", markup=False, highlight=False)


@app.command()
def plan(
    target: Annotated[str | None, typer.Argument(help="Preset, checkpoint or artifact (omit with --select).")] = None,
    device: Device = "host",
    precision: Annotated[str | None, typer.Option(help="fp32, fp16, bf16, fp8, int8 or int4 (default: a table "
                                                       "of every precision the device supports).")] = None,
    context: Annotated[int | None, typer.Option(help="Tokens in context (default 4096, or the model's "
                                                     "max_seq_len if smaller).")] = None,
    batch: Annotated[int, typer.Option(help="Sequences decoded together.")] = 1,
    select: Annotated[bool, typer.Option("--select", help="Choose V3 or R1 for --task by the brief's selection "
                                                          "framework and check it against the numbers.")] = False,
    task: Annotated[str | None, typer.Option(help="With --select: reasoning, chat or general.")] = None,
    as_json: JsonOut = False,
) -> None:
    """Estimate whether a model fits a device and how fast it runs (an estimate, with its assumptions)."""
    from edgekit import plan as planner

    if select:
        if target is not None or precision is not None:
            raise EdgekitError("--select chooses the model and precision", "drop MODEL and --precision")
        if task is None:
            raise EdgekitError("--select needs --task", f"one of: {', '.join(planner.TASKS)}")
        emit(planner.select(device, task, context=context, batch=batch), as_json, _show_select)
        return
    if task is not None:
        raise EdgekitError("--task only applies with --select")
    if target is None:
        raise EdgekitError("plan needs a MODEL", "e.g. 'edgekit plan v3-13b --device a100-40gb', or --select --task T")
    emit(planner.plan(target, device, precision=precision, context=context, batch=batch), as_json, _show_plan)

# profile and compare (issue 4): the work is in edgekit.profile ------------------------------------
PromptLen = Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt tokens (seeded random).")]
NewTokens = Annotated[int, typer.Option("--new-tokens", min=2, help="Tokens generated per request.")]
Batch = Annotated[int, typer.Option("--batch", min=1, help="Sequences per call.")]
Warmup = Annotated[int, typer.Option("--warmup", min=0, help="Unmeasured runs first.")]
Runs = Annotated[int, typer.Option("--runs", min=1, help="Measured runs.")]
Threshold = Annotated[float | None, typer.Option("--threshold", help="R1 skip threshold (all gates).")]
ProfRuntime = Annotated[str | None, typer.Option("--runtime", help="torch or onnxruntime (default: by artifact).")]
TorchDtype = Annotated[str | None, typer.Option("--dtype", help="torch: fp32, fp16 or bf16.")]
TorchDevice = Annotated[str | None, typer.Option("--device", help="torch: cpu, cuda or cuda:N on this machine.")]
Provider = Annotated[str | None, typer.Option("--provider", help="onnxruntime: cpu, cuda or tensorrt.")]
Threads = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads (intra-op).")]
ReportOut = Annotated[Path | None, typer.Option("--out", help="Also write the JSON report to this file.")]


@app.command("profile")
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
    requests: Annotated[int, typer.Option(min=1, help="mixed workload: number of requests.")] = 16,
    token_budget: Annotated[int | None, typer.Option("--token-budget", help="dynamic batching: rows x (prompt + "
                                                     "new tokens) per batch (default: fixed's worst case).")] = None,
    dtype: TorchDtype = None,
    device: TorchDevice = None,
    provider: Provider = None,
    threads: Threads = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompts and the mixed workload.")] = 0,
    energy: Annotated[bool, typer.Option(help="Measure energy where the device reports power.")] = True,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG (latency distribution, sweep, "
                                              "batching).")] = None,
    out: ReportOut = None,
    as_json: JsonOut = False,
) -> None:
    """Measure latency, throughput, memory, R1 skipping and energy on this machine (Ctrl-C keeps what was measured)."""
    from edgekit.profile import profile, show_profile

    r = profile(target, runtime, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, warmup=warmup, runs=runs,
                threshold=threshold, sweep=sweep, workload=workload, batching=batching, requests=requests,
                token_budget=token_budget, dtype=dtype, device=device, provider=provider, threads=threads, seed=seed,
                energy=energy, out=out, plot=plot)
    emit(r, as_json, lambda r: show_profile(r, console))
    if r["interrupted"]:
        raise SystemExit(130)


@app.command("compare")
def compare_cmd(
    a: Annotated[str, typer.Argument(help="First preset, checkpoint or artifact.")],
    b: Annotated[str | None, typer.Argument(help="Second target (omit with --runtime R1,R2).")] = None,
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
    from edgekit.profile import compare, show_compare

    r = compare(a, b, runtime=runtime, int8=int8, out=out, prompt_len=prompt_len, new_tokens=new_tokens, batch=batch,
                warmup=warmup, runs=runs, threshold=threshold, dtype=dtype, device=device, provider=provider,
                threads=threads)
    emit(r, as_json, lambda r: show_compare(r, console))
    if r["interrupted"]:
        raise SystemExit(130)


@app.command("build-engine")
def build_engine(
    target: Annotated[str, typer.Argument(help="TensorRT artifact (export --format tensorrt) or installed bundle.")],
    force: Annotated[bool, typer.Option("--force", help="Build even for a recipe made for another GPU (SM) or "
                                        "TensorRT version, or over an existing engine.")] = False,
    as_json: JsonOut = False,
) -> None:
    """Build the TensorRT engine on this device from the artifact's recipe (needs TensorRT and a GPU)."""
    from edgekit.engine import build_engine as build

    emit(build(target, force=force), as_json)


def main() -> None:
    try:
        app()  # standalone: usage errors print click's message and exit 2
    except EdgekitError as e:
        if os.environ.get("EDGEKIT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
