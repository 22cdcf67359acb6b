"""`profile()`: measure one target on this machine, with one runtime and one set of settings.

Warm-up runs first, then the measured runs (edgekit.profiling.timing); memory around all of it
(memory); an optional threshold sweep and mixed workload (batching); the weight traffic and roofline
(roofline); energy only where the device reports power (edgekit.telemetry), else null with the reason.
Ctrl-C stops the measurement; the report then holds what was measured so far ("interrupted": true)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.profiling.batching import mixed_requests, plan_dynamic, plan_fixed, run_workload, workload_report
from edgekit.profiling.memory import RssMonitor, cuda_peak, cuda_reset, dir_bytes
from edgekit.profiling.roofline import roofline as roofline_report
from edgekit.profiling.roofline import weight_traffic
from edgekit.profiling.timing import Samples, gating, one_run, seeded_prompts, summarize, sweep_entry

REPORT_VERSION = 1
WORKLOADS = ("single", "mixed")
BATCHING = ("fixed", "dynamic", "both")
RUNTIME_OPTIONS = {"torch": ("dtype", "device", "threads", "prefill_chunk"),
                   "onnxruntime": ("provider", "threads", "iobinding", "prefill_chunk")}


def parse_thresholds(text: str | None) -> list[float] | None:
    """'0,0.5,0.9,2' or 'START:STOP:N' (N evenly spaced values, ends included)."""
    if text is None or text == "":
        return None
    try:
        if ":" in text:
            a, b, n = text.split(":")
            if int(n) < 2:
                raise ValueError
            values = [round(float(x), 6) for x in np.linspace(float(a), float(b), int(n))]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
        if not all(np.isfinite(values)):
            raise ValueError
        return values
    except ValueError:
        raise EdgekitError(f"--sweep-threshold: cannot read '{text}' as finite numbers",
                           "give comma-separated values (0,0.5,0.9,2) or START:STOP:N (0:1:5)") from None


def _check(prompt_len, new_tokens, batch, warmup, runs, requests, token_budget, workload, batching) -> None:
    for name, value, low in (("--prompt-len", prompt_len, 1), ("--new-tokens", new_tokens, 2), ("--batch", batch, 1),
                             ("--warmup", warmup, 0), ("--runs", runs, 1), ("--requests", requests, 1)):
        if value < low:
            raise EdgekitError(f"{name} must be at least {low}, got {value}",
                               "decode latency needs at least 2 new tokens" if name == "--new-tokens" else
                               f"pass {name} {low} or more")
    if workload not in WORKLOADS:
        raise EdgekitError(f"unknown workload '{workload}'", f"use one of {', '.join(WORKLOADS)}")
    if batching not in BATCHING:
        raise EdgekitError(f"unknown batching '{batching}'", f"use one of {', '.join(BATCHING)}")
    if token_budget is not None and token_budget < 1:
        raise EdgekitError(f"--token-budget must be positive, got {token_budget}", "pass --token-budget 1 or more")


def estimate_bytes(cfg, batch: int, prompt_len: int, new_tokens: int, prefill_chunk: int | None = None) -> int:
    """A lower bound of what one measured run holds (fp32): the KV cache at full length, and the prefill's
    logits and hidden states (of one chunk with --prefill-chunk). Enough to refuse a batch that cannot fit
    before any work starts."""
    from edgekit.spec import DecoderSpec

    prefill = batch * min(prompt_len, prefill_chunk or prompt_len) * (cfg.vocab_size + 4 * cfg.d_model)
    return DecoderSpec(cfg).kv_bytes(batch, prompt_len + new_tokens) + 4 * prefill


def check_memory(cfg, batch: int, prompt_len: int, new_tokens: int, available: int | None = None,
                 prefill_chunk: int | None = None) -> None:
    if available is None:
        import psutil

        available = psutil.virtual_memory().available
    need = estimate_bytes(cfg, batch, prompt_len, new_tokens, prefill_chunk)
    if need > available:
        raise EdgekitError(f"--batch {batch} x {prompt_len + new_tokens} tokens needs at least {need / 2**30:.1f} GiB "
                           f"(KV cache and prefill logits), this machine has {available / 2**30:.1f} GiB available",
                           "lower --batch, --prompt-len or --new-tokens")


def open_profiled_runner(target, runtime: str | None, **options):
    """A runner for `target`; the torch runtime on an exported artifact runs the model it came from
    (the manifest's `source`), so that torch and an ONNX/engine artifact can be profiled alike."""
    from edgekit.resolve import resolve
    from runtimes import open_runner

    res = resolve(target)
    source = None
    if runtime == "torch" and res.kind in ("onnx", "engine"):
        source = res.manifest.get("source")
        if not source:
            raise EdgekitError(f"{target} has no source in its manifest for the torch runtime",
                               "profile the preset or checkpoint it was exported from")
        src = resolve(source)
        if src.cfg.to_dict() != res.cfg.to_dict():
            raise EdgekitError(f"{target} was exported from {source}, whose config has changed since",
                               "re-export the artifact, or profile the source directly")
        target = source
    chosen = runtime or res.default_runtime
    for key, value in options.items():
        if value is not None and key not in RUNTIME_OPTIONS.get(chosen, options):
            raise EdgekitError(f"--{key} does not apply to the {chosen} runtime",
                               "--dtype/--device are torch options, --provider is onnxruntime's")
    runner = open_runner(target, runtime, **{k: v for k, v in options.items() if v is not None})
    return runner, res, source


def profile(target: str | Path, runtime: str | None = None, *, prompt_len: int = 64, new_tokens: int = 32,
            batch: int = 1, warmup: int = 1, runs: int = 5, threshold: float | None = None,
            sweep: list[float] | str | None = None, workload: str = "single", batching: str = "both",
            requests: int = 16, token_budget: int | None = None, dtype: str | None = None,
            device: str | None = None, provider: str | None = None, threads: int | None = None,
            iobinding: bool | None = None, prefill_chunk: int | None = None, seed: int = 0,
            roofline: bool = True, energy: bool = True,
            out: str | Path | None = None, plot: str | Path | None = None, show_progress: bool = True) -> dict:
    """Measure `target` on this machine; returns the report (README.md documents every field)."""
    from edgekit import device as devices
    from edgekit.progress import progress

    _check(prompt_len, new_tokens, batch, warmup, runs, requests, token_budget, workload, batching)
    if seed < 0:
        raise EdgekitError(f"--seed must be at least 0, got {seed}", "pass --seed 0 or more")
    devices.check_threads(threads)
    sweep = parse_thresholds(sweep) if isinstance(sweep, str) else sweep
    runner, _, source = open_profiled_runner(target, runtime, dtype=dtype, device=device, provider=provider,
                                             threads=threads, iobinding=iobinding, prefill_chunk=prefill_chunk)
    res, cfg = runner.resolved, runner.cfg
    if not runner.spec.gated and (threshold is not None or sweep):
        raise EdgekitError(f"--threshold/--sweep-threshold apply to gated models (R1, calibrate-skip); {cfg.name} "
                           "has no skip gates", "drop --threshold and --sweep-threshold")
    longest = max(mixed_requests(requests, prompt_len, seed)) if workload == "mixed" else prompt_len
    if longest + new_tokens > cfg.max_seq_len:
        raise EdgekitError(f"prompt ({longest}) + new tokens ({new_tokens}) exceed the context ({cfg.max_seq_len})",
                           "lower --prompt-len or --new-tokens")
    check_memory(cfg, batch, longest, new_tokens, prefill_chunk=prefill_chunk)
    info = devices.identify()
    on_gpu = str(device or "").startswith("cuda") or (provider or "cpu") != "cpu"
    info["runs_on_gpu"] = on_gpu
    thr = cfg.default_threshold if (runner.spec.gated and threshold is None) else threshold
    report: dict = {
        "edgekit_profile": REPORT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target": {"name": res.name, "kind": res.kind, "path": str(res.path) if res.path else None,
                   "family": cfg.family, "layers": cfg.n_layers, "d_model": cfg.d_model,
                   **({"exported_artifact": str(target)} if source else {})},
        "settings": {"prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch, "warmup": warmup,
                     "runs": runs, "threshold": thr if runner.spec.gated else None, "seed": seed,
                     "workload": workload, "prefill_chunk": prefill_chunk},
        "device": info, "interrupted": False,
    }
    prompts = seeded_prompts(batch, prompt_len, cfg.vocab_size, seed)
    main = Samples()
    sweep_samples: list[tuple[float, Samples]] = []
    work: dict = {}
    energy_result, energy_reason = None, "not measured (--no-energy)"
    meter = None
    if energy:
        from edgekit.telemetry import power_meter

        index = int(str(device).split(":")[1]) if str(device or "").startswith("cuda:") else 0
        meter, energy_reason = power_meter(info, gpu_index=index)
    modes = [m for m in ("fixed", "dynamic") if batching in (m, "both")] if workload == "mixed" else []
    lengths = mixed_requests(requests, prompt_len, seed) if modes else []
    budget = token_budget or batch * (max(lengths) + new_tokens) if modes else None
    plans = {"fixed": plan_fixed(lengths, batch), "dynamic": plan_dynamic(lengths, new_tokens, budget)} if modes else {}
    total = (warmup + runs) * new_tokens + len(sweep or []) * runs * new_tokens
    total += sum(runs * len(plans[m]) for m in modes)
    cuda = None
    mem = RssMonitor()
    try:
        with progress(f"profiling {res.name} ({runner.name})", total if show_progress else None) as advance:
            if not show_progress:
                advance = lambda *a, **k: None  # noqa: E731
            with mem:
                with runner:
                    # after loading: a model drawn on the GPU in fp32 and cast is no peak of running it
                    cuda = cuda_reset(runner)
                    report["runtime"] = runner.describe()
                    for _ in range(warmup):
                        one_run(runner, prompts, new_tokens, thr, None, advance)
                    if meter is not None:
                        meter.start()
                    try:
                        for _ in range(runs):
                            one_run(runner, prompts, new_tokens, thr, main, advance)
                    finally:
                        if meter is not None:
                            energy_result = meter.stop()
                    for t in sweep or []:
                        sweep_samples.append((t, Samples()))
                        for _ in range(runs):
                            one_run(runner, prompts, new_tokens, t, sweep_samples[-1][1], advance)
                    if modes:  # passes alternate between the modes (ABBA...): a shared machine's load drifts
                        one_run(runner, prompts[:1, : min(prompt_len, 8)], 2, thr, None, lambda *a: None)
                    for i in range(runs):
                        for m in modes if i % 2 == 0 else modes[::-1]:
                            work.setdefault(m, []).append(run_workload(runner, lengths, plans[m], new_tokens, thr,
                                                                       seed, min(258, cfg.vocab_size - 1), advance))
                    cuda = cuda_peak(cuda)
    except KeyboardInterrupt:
        report["interrupted"] = True
    report["latency"] = summarize(main, batch, prompt_len)
    report["memory"] = {**mem.result(), **(cuda or {})} if hasattr(mem, "ru_after") else None
    precision = report.get("runtime", {}).get("precision") or res.manifest.get("precision") or "fp32"
    g = gating(cfg, main.executed, main.decode_executed)
    report["gating"] = g
    traffic = weight_traffic(cfg, precision, batch, (g or {}).get("decode_run_fraction_per_layer"), res.path)
    report["size"] = {"artifact_bytes": dir_bytes(res.path), "precision": precision, **traffic}
    report["roofline"] = roofline_report(report["latency"]["decode_tokens_per_s"], traffic, info, on_gpu, batch) \
        if roofline and not report["interrupted"] else None
    tokens = main.tokens
    if energy_result and tokens:
        report["energy"] = {**energy_result, "joules_per_token": energy_result["joules"] / tokens,
                            "tokens": tokens, "available": True}
    else:
        report["energy"] = {"available": False, "reason": energy_reason if not energy_result else "no tokens"}
    report["sweep"] = [sweep_entry(t, s, cfg, batch, prompt_len) for t, s in sweep_samples if s.ttft] or None
    report["workload"] = workload_report(work, lengths, budget, batch, new_tokens, requests) if work else None
    report["samples"] = {"ttft_ms": [round(x * 1e3, 4) for x in main.ttft],
                         "decode_ms": [round(x * 1e3, 4) for x in main.decode]}
    if out:
        write_json(report, out)
    if plot and (main.decode or report["sweep"]):
        from edgekit.profiling.plot import write_plot

        write_plot(report, plot)
    return report


def write_json(data: dict, path: str | Path) -> Path:
    from edgekit.artifact import dumps, os_error

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(dumps(data, indent=1, default=str))
        tmp.replace(path)
    except OSError as e:
        raise os_error(e, path) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()  # on any error: no empty or half temporary file left beside the report
    return path
