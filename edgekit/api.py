"""The Python API the CLI calls. Each function takes plain values and returns plain data."""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.families import is_hf


def list_models() -> list[dict]:
    from edgekit.config import read_config
    from edgekit.models import PRESETS, build, param_counts
    from edgekit.resolve import REFERENCE

    shipped = {name: read_config(path) for name, path in REFERENCE.items() if path.is_dir()}
    rows = []
    for name, cfg in {**PRESETS, **shipped}.items():
        counts = param_counts(build(cfg, device="meta"))
        rows.append({"name": name, "family": cfg.family, "params_total": counts["total"],
                     "params_unique": counts["unique"], "layers": cfg.n_layers, "d_model": cfg.d_model,
                     "context": cfg.max_seq_len})
    return rows


def model_info(target: str | Path) -> dict:
    from edgekit.models import build, param_counts
    from edgekit.resolve import resolve

    res = resolve(target)
    if is_hf(res.cfg):  # a Hugging Face directory (or an artifact exported from one)
        from edgekit.hfconfig import weight_counts

        return {"name": res.name, "kind": res.kind, "path": str(res.path or ""), "config": res.cfg.to_dict(),
                **({"params": weight_counts(res.path)} if res.kind == "hf" else {}),
                **({"manifest": {k: v for k, v in res.manifest.items() if k != "files"}} if res.manifest else {})}
    model = build(res.cfg, device="meta")
    counts = param_counts(model)
    breakdown = {"embedding": model.embed.weight.numel(),
                 "lm_head": 0 if model.lm_head is None else model.lm_head.weight.numel(),
                 "per_block": sum(p.numel() for p in model.blocks[0].parameters()),
                 "unique_blocks": len(model.blocks),
                 "gates": sum(p.numel() for n, p in model.named_parameters() if n.startswith("gates."))}
    return {"name": res.name, "kind": res.kind, "path": str(res.path or ""), "config": res.cfg.to_dict(),
            "params": counts, "breakdown": breakdown,
            **({"manifest": {k: v for k, v in res.manifest.items() if k != "files"}} if res.manifest else {})}


def generate(target: str | Path, prompt: str, max_new_tokens: int = 16, threshold: float | None = None,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0, runtime: str | None = None,
             chat: bool = False, **runner_options) -> dict:
    """Continue `prompt`, or with chat=True answer it as a user message rendered by the model's chat template."""
    from edgekit.generation import generate as run_generation
    from edgekit.tokenizer import ByteTokenizer
    from runtimes import open_runner

    if max_new_tokens < 1:
        raise EdgekitError(f"--max-new-tokens must be at least 1, got {max_new_tokens}",
                           "pass --max-new-tokens 1 or more")
    import math

    if not math.isfinite(temperature) or temperature < 0:
        raise EdgekitError(f"--temperature must be a finite number of at least 0, got {temperature}",
                           "pass --temperature 0 (greedy) or more")
    if top_k < 0:
        raise EdgekitError(f"--top-k must be at least 0, got {top_k}", "pass --top-k 0 for all tokens, or a positive k")
    if seed < 0:
        raise EdgekitError(f"--seed must be at least 0, got {seed}", "pass --seed 0 or more")
    if threshold is not None and not math.isfinite(threshold):
        raise EdgekitError(f"--threshold must be a finite number, got {threshold}", "pass --threshold a number")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        raise EdgekitError(f"the prompt is not valid UTF-8 text (byte {e.start} cannot be decoded)",
                           "pass UTF-8 text; check the terminal's or the script's encoding") from None
    runner = open_runner(target, runtime, **runner_options)
    tok = runner.resolved.tokenizer()
    if isinstance(tok, ByteTokenizer):
        if chat:
            raise EdgekitError(f"{runner.cfg.name} has no chat template (edgekit's presets use a byte tokenizer)",
                               "use --prompt TEXT, or a Hugging Face model directory with a chat template")
    if threshold is not None and not runner.spec.gated:
        raise EdgekitError(f"--threshold applies to gated models (R1, calibrate-skip); {runner.cfg.name} has no skip "
                           "gates", "drop --threshold")
    rendered = None
    if chat:
        rendered, ids = tok.chat(prompt)
    else:
        ids = tok.encode(prompt)
    if len(ids) + max_new_tokens > runner.cfg.max_seq_len:
        raise EdgekitError(f"prompt + new tokens ({len(ids) + max_new_tokens}) exceed the context "
                           f"({runner.cfg.max_seq_len})", "shorten the prompt or --max-new-tokens")
    with runner:
        g = run_generation(runner.stepper(threshold), ids, max_new_tokens, temperature, top_k, seed,
                           stop=tok.eos_id)
    # skipping is counted over the gated layers only (ungated layers always run): "24 of 24", not "24 of 36"
    gated = len(getattr(runner.cfg, "gated_layers", None) or ())
    slots = len(g.executed) * gated if gated else g.layer_slots
    return {"model": runner.cfg.name, "runtime": runner.name, "prompt": prompt, "text": tok.decode(g.tokens),
            "tokens": g.tokens, "layer_slots": slots, "layer_runs": slots - g.skipped, "skipped": g.skipped,
            **({"chat_prompt": rendered} if chat else {})}


FORMATS = ("onnx", "tensorrt")


def check_min_cosine(min_cosine: float | None) -> None:
    import math

    if min_cosine is not None and not (math.isfinite(min_cosine) and 0 <= min_cosine <= 1):
        raise EdgekitError(f"--min-cosine {min_cosine} is not a cosine between 0 and 1",
                           "e.g. --min-cosine 0.99 (1 = identical logits)")


def check_options(fmt: str, int8: bool, min_cosine: float | None, device: str | None, context: int | None,
                  precision: str | None, fidelity_data) -> None:
    """Options that would be silently ignored are refused before any work."""
    check_min_cosine(min_cosine)
    if fmt == "onnx":
        given = [o for o, v in (("--device", device), ("--context", context), ("--precision", precision))
                 if v is not None]
        if given:
            raise EdgekitError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --format tensorrt, "
                               "not to an ONNX export", "drop them, or pass --format tensorrt; for a smaller "
                               "CPU/ARM model use --int8")
        if not int8:
            given = [o for o, v in (("--fidelity-data", fidelity_data), ("--min-cosine", min_cosine)) if v is not None]
            if given:
                raise EdgekitError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to the int8 "
                                   "fidelity check", "add --int8, or drop them: the fp32 graph is validated against "
                                   "PyTorch with a fixed tolerance")
    if context is not None and context < 1:
        raise EdgekitError(f"--context {context} must be at least 1", "e.g. --context 2048")


def _write_common(tmp: Path, cfg) -> None:
    from edgekit.artifact import dumps
    from edgekit.tokenizer import ByteTokenizer

    (tmp / "config.json").write_text(dumps(cfg.to_dict(), indent=1))
    ByteTokenizer().save(tmp)


def _dir_bytes(directory: Path, pattern: str = "model.onnx*") -> int:
    return sum(p.stat().st_size for p in Path(directory).glob(pattern) if p.is_file())


def export(target: str | Path, fmt: str, out: str | Path, int8: bool = False, force: bool = False,
           min_cosine: float | None = None, tolerance: float = 1e-3, device: str | None = None,
           context: int | None = None, precision: str | None = None, fidelity_data: str | Path | None = None,
           max_ppl_increase: float | None = None, fuse: bool = True, stream: bool | None = None,
           random_weights: bool = False) -> dict:
    """Export a preset/checkpoint to an artifact directory; validation failures fail the export.

    stream (None = automatic) / random_weights: the streamed path (edgekit/streamed.py: a few-layer trace
    stamped to full depth, weights written one tensor at a time), taken automatically by models whose fp32
    weights exceed streamed.STREAM_ABOVE_BYTES.

    onnx: fp32 graph validated against PyTorch (max abs diff <= tolerance x the output's scale, several
    shapes and skip patterns); with int8, block int8 (exporters/onnx_int8.py) inside the If branches, a
    logit-cosine floor (min_cosine, default 0.99) on fidelity_data (a text file) or Resolved.fidelity_text's
    default, and where that is real text, a perplexity gate: the int8 graph's perplexity at most
    max_ppl_increase (default 0.02) above the fp32 graph's (validate.perplexity_gate: sequential, 2-8 windows).
    tensorrt: delegated to exporters.tensorrt (TensorRT-ready ONNX + build recipe; min_cosine defaults to the
    precision's own floor there). fuse: a Hugging Face llama / qwen2 graph gets ONNX Runtime's fused attention and
    norms (exporters/onnx_fuse.py) before validation.
    """
    from edgekit.artifact import check_target
    from edgekit.errors import unknown_name
    from edgekit.progress import progress
    from edgekit.resolve import resolve

    if fmt not in FORMATS:
        raise unknown_name("format", fmt, FORMATS)
    check_options(fmt, int8, min_cosine, device, context, precision, fidelity_data)
    if max_ppl_increase is not None and not int8:
        raise EdgekitError("--max-ppl-increase applies to the int8 fidelity check", "add --int8, or drop it")
    check_target(Path(out), force)  # before any work
    res = resolve(target)
    from edgekit import streamed

    if streamed.wants_stream(res, fmt, stream, random_weights):
        return _export_streamed(res, out, int8, force, min_cosine, tolerance, random_weights)
    text = res.fidelity_text(fidelity_data) if int8 and fmt == "onnx" else (None, "")
    from edgekit.checkpoint import load_model

    model = load_model(res)
    if getattr(model, "quantized", False):
        raise EdgekitError(f"{target} is a torch-int8 checkpoint", "export the fp32 model; --int8 quantizes the graph")

    def build(tmp: Path) -> dict:
        if fmt == "tensorrt":
            from edgekit import engine

            return engine.export(model, tmp, device=device, context=context,
                                 precision=precision or ("int8" if int8 else "fp16"), min_cosine=min_cosine)
        return _export_onnx(res, model, tmp, int8, 0.99 if min_cosine is None else min_cosine, tolerance,
                            progress, text, 0.02 if max_ppl_increase is None else max_ppl_increase,
                            fidelity_data, fuse)

    return _write_artifact(res, Path(out), force, build)


def _write_artifact(res, out: Path, force: bool, build) -> dict:
    """The artifact staged and renamed into place: side files (config / tokenizer), `build(tmp)` -> the manifest's
    fields (third-party warnings and logs into logs/export.log), the manifest; the summary export returns."""
    from edgekit.artifact import staging, write_manifest
    from edgekit.quiet import LOG_DIR, captured

    with staging(out, force) as tmp, captured(tmp / LOG_DIR / "export.log", "export") as log:
        if res.kind == "hf":
            from edgekit.hfconfig import write_side_files

            write_side_files(tmp, res.path)
        else:
            _write_common(tmp, res.cfg)
        fields = build(tmp)
        log.close()  # complete before write_manifest hashes it
        manifest = write_manifest(tmp, model=res.name, family=res.cfg.family, source=str(res.path or res.name),
                                  **fields)
    return {k: v for k, v in manifest.items() if k != "files"} | {"out": str(out), "files": sorted(manifest["files"])}


def _export_streamed(res, out, int8: bool, force: bool, min_cosine: float | None, tolerance: float,
                     random_weights: bool) -> dict:
    from edgekit import streamed
    from edgekit.progress import progress

    return _write_artifact(res, Path(out), force, lambda tmp: streamed.export(
        res, tmp, int8, random_weights, 0.99 if min_cosine is None else min_cosine, tolerance, progress))


def _export_onnx(res, model, tmp: Path, int8: bool, min_cosine: float, tolerance: float, progress,
                 text: tuple, max_ppl_increase: float = 0.02, fidelity_data=None, fuse: bool = True) -> dict:

    from edgekit.resolve import Resolved
    from edgekit.spec import DecoderSpec
    from exporters import onnx as onnx_exporter
    from runtimes.onnxruntime import OnnxRuntimeRunner
    from runtimes.torch import TorchRunner

    spec = DecoderSpec(res.cfg)
    fp32_dir = tmp / "fp32" if int8 else tmp
    fp32_dir.mkdir(exist_ok=True)
    from exporters import onnx_hf_stamp

    stamped = res.kind == "hf" and onnx_hf_stamp.stampable(res.cfg)  # a 2-layer trace stamped to full depth
    with progress(f"exporting {res.name} to ONNX (torch.export"
                  f"{f' of {onnx_hf_stamp.TEMPLATE_LAYERS} layers, stamped' if stamped else ''})") as advance:
        if stamped:
            onnx_hf_stamp.export_graph(model, fp32_dir / onnx_exporter.MODEL_FILE)
        else:
            onnx_exporter.export_graph(model, fp32_dir / onnx_exporter.MODEL_FILE)
        advance(1)
    fusion = None
    if fuse and is_hf(res.cfg) and not spec.gated:
        from exporters.onnx_fuse import fuse_file

        with progress("fusing ONNX Runtime ops (GroupQueryAttention, SkipSimplifiedLayerNormalization)") as advance:
            fusion = fuse_file(fp32_dir / onnx_exporter.MODEL_FILE, model.hf.config.num_attention_heads,
                               res.cfg.max_seq_len)
            advance(1)
    import contextlib

    import torch

    # one PyTorch reference and one fp32 session for the fp32 check, the int8 check and the perplexity gate. The
    # reference runs single-threaded: its calls are <= 27 tokens, where a second thread gains little and, on a
    # shared 2-core machine, OpenMP's spinning made them 13x slower (SmolLM2, load 5: 7.6 s vs 0.58 s a call); the
    # sessions' idle threads sleep rather than spin (a 256-token perplexity window: 0.92 s vs 1.16 s at load 6) and
    # load the file as stored, one session through the fused graph's If (not the runner's fused-branch session too)
    threads = torch.get_num_threads()
    stack = contextlib.ExitStack()
    stack.callback(torch.set_num_threads, threads)
    reference = stack.enter_context(TorchRunner(Resolved(res.kind, res.name, res.cfg, res.path, model=model),
                                                threads=1))
    fp32_runner = stack.enter_context(OnnxRuntimeRunner(Resolved("onnx", res.name, res.cfg, fp32_dir), spin=False,
                                                        fused_session=False))
    with stack:
        return _validate_onnx(res, model, reference, fp32_runner, spec, tmp, fp32_dir, int8, min_cosine, tolerance,
                              progress, text, max_ppl_increase, fidelity_data, fusion, stack)


def _validate_onnx(res, model, reference, fp32_runner, spec, tmp: Path, fp32_dir: Path, int8: bool, min_cosine: float,
                   tolerance: float, progress, text: tuple, max_ppl_increase: float, fidelity_data, fusion,
                   stack) -> dict:
    """_export_onnx's checks: fp32 graph vs PyTorch, then (int8) quantize, int8 vs PyTorch, perplexity gate."""
    import shutil

    from edgekit import validate
    from edgekit.resolve import Resolved
    from exporters import onnx as onnx_exporter
    from exporters.onnx_graph import graph_ops
    from runtimes.onnxruntime import OnnxRuntimeRunner

    n_cases = len(validate.cases(spec))
    with progress("validating fp32 graph against PyTorch", n_cases) as advance:
        validation = validate.validate(reference, fp32_runner, spec, tolerance=tolerance, advance=advance)
        if res.kind == "hf":  # MoE: inputs that reach every routed expert, graph == PyTorch on them
            from edgekit.models.hf import check_experts

            experts = check_experts(model, fp32_runner, spec, tolerance)
            if experts:
                validation["experts"] = experts
    fields = {"format": "onnx", "precision": "fp32", "model_file": onnx_exporter.MODEL_FILE,
              "opset": onnx_exporter.OPSET, "inputs": spec.input_names, "outputs": spec.output_names,
              "dynamic_axes": spec.dynamic_axes(), "validation": {"fp32": validation},
              "graph_ops": graph_ops(fp32_dir / onnx_exporter.MODEL_FILE)}
    if fusion is not None:
        fields["fusion"] = fusion
    fp32_bytes = _dir_bytes(fp32_dir)
    fields["size"] = {"fp32_bytes": fp32_bytes}
    if int8:
        from exporters.onnx_int8 import METHOD, quantize_int8

        with progress("quantizing to int8 (block int8 weights, int8 activations; If branches included)") as advance:
            quantization = quantize_int8(fp32_dir / onnx_exporter.MODEL_FILE, tmp / onnx_exporter.MODEL_FILE)
            advance(1)
        with OnnxRuntimeRunner(Resolved("onnx", res.name, res.cfg, tmp), spin=False,
                               fused_session=False) as int8_runner:
            with progress("checking int8 fidelity", n_cases) as advance:
                report = validate.validate(reference, int8_runner, spec, tolerance=None, min_cosine=min_cosine,
                                           advance=advance, text=text[0], text_source=text[1])
            # perplexity where the text is language the model predicts (the user's text, or English prose for a
            # pretrained model); not for the task text of v3-ref/r1-ref, trained on answers only (their
            # perplexity over prompts is ~1e4 and meaningless: bench/accuracy.py measures their fidelity)
            if text[0] is not None and (fidelity_data is not None or is_hf(res.cfg)):
                with progress("perplexity of the fp32 and int8 graphs on the fidelity text") as advance:
                    report["perplexity"] = validate.perplexity_gate(fp32_runner, int8_runner, spec, text[0],
                                                                    max_ppl_increase, text[1])
                    advance(1)
        fields["validation"]["int8"] = report
        fields["quantization"] = {"method": METHOD, **quantization}
        stack.close()  # the fp32 session, before its files go
        shutil.rmtree(fp32_dir)
        int8_bytes = _dir_bytes(tmp)
        fields.update(precision="int8", graph_ops=graph_ops(tmp / onnx_exporter.MODEL_FILE))
        fields["size"].update(int8_bytes=int8_bytes, int8_over_fp32=round(int8_bytes / fp32_bytes, 4))
    return fields


def quantize(target: str | Path, out: str | Path, force: bool = False, min_cosine: float = 0.99,
             fidelity_data: str | Path | None = None) -> dict:
    """PyTorch dynamic int8 of the Linear layers as a checkpoint artifact, with size and fidelity."""
    from edgekit.artifact import check_target, staging, write_manifest
    from edgekit.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
    from edgekit.progress import progress
    from edgekit.quantize import METHOD
    from edgekit.resolve import Resolved, resolve
    from edgekit.spec import DecoderSpec
    from edgekit.validate import cases, validate
    from runtimes.torch import TorchRunner

    check_min_cosine(min_cosine)
    check_target(Path(out), force)  # before any work
    res = resolve(target)
    text, source = res.fidelity_text(fidelity_data)
    from edgekit.checkpoint import load_model

    model = load_model(res)
    out = Path(out)
    spec = DecoderSpec(res.cfg)
    from edgekit.quiet import LOG_DIR, captured  # third-party warnings/logs -> logs/quantize.log

    with staging(out, force) as tmp, captured(tmp / LOG_DIR / "quantize.log", "quantize") as log:
        _write_common(tmp, res.cfg)
        save_checkpoint(model, tmp, int8=True)
        quantized = load_checkpoint(tmp)
        fp32_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        int8_bytes = (tmp / WEIGHTS).stat().st_size
        with TorchRunner(Resolved(res.kind, res.name, res.cfg, res.path, model=model)) as ref, \
                TorchRunner(Resolved("checkpoint", res.name, res.cfg, tmp, model=quantized)) as q, \
                progress("checking int8 fidelity", len(cases(spec))) as advance:
            report = validate(ref, q, spec, tolerance=None, min_cosine=min_cosine, advance=advance,
                              text=text, text_source=source)
        log.close()  # complete before write_manifest hashes it
        manifest = write_manifest(tmp, format="checkpoint", precision="int8", quantization=METHOD, model=res.name,
                                  family=res.cfg.family, source=str(res.path or res.name), validation={"int8": report},
                                  size={"fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
                                        "int8_over_fp32": round(int8_bytes / fp32_bytes, 4)})
    return {k: v for k, v in manifest.items() if k != "files"} | {"out": str(out), "files": sorted(manifest["files"])}
