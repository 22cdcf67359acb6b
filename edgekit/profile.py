"""`edgekit profile` and `edgekit compare`: measure a model on the machine edgekit runs on, honestly.

One profile run = prefill of a seeded prompt (time to first token) + (new_tokens - 1) single-token
decode steps through the runner's KV-cache session, greedy; warm-up runs first, then the measured
runs. Every step returns the last position's logits to the host, which also synchronises a GPU, so
the per-step times are wall-clock latencies a caller would see.

What is reported (field by field in README.md, "The profile report"):
- latency: TTFT and per-token decode latency with p50/p90/p99; decode tokens/s; requests/s at the batch
- memory: process RSS (baseline before the model is loaded, peak, peak over baseline); the peak is the
  kernel's high-water mark (ru_maxrss) when the profile set it, else a 10 ms sampling thread's maximum;
  on CUDA also torch's max allocated / reserved
- R1: the fraction of gated-layer executions skipped (one decision per call for the whole batch)
- roofline: weight bytes read per decode step (from the model's structure, the precision and the
  measured skip pattern) / memory bandwidth (this host's, measured by profiles.host; a known GPU's or
  Jetson's from its profile), and the measured decode tokens/s as a fraction of it
- energy per token only where the device reports power (edgekit.telemetry), else null with the reason
- `--sweep-threshold`: the same measurement at several R1 thresholds
- `--workload mixed`: a seeded set of requests of mixed prompt lengths, batched in arrival order
  ("fixed") or grouped by length under a token budget ("dynamic"), both throughputs reported

Ctrl-C stops the measurement; the report then holds what was measured so far ("interrupted": true).
`compare` runs each profile in a fresh Python process (`python -m edgekit.profile`), so that one
model's memory cannot hide in the other's numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

REPORT_VERSION = 1
WORKLOADS = ("single", "mixed")
BATCHING = ("fixed", "dynamic", "both")
RUNTIME_OPTIONS = {"torch": ("dtype", "device", "threads"), "onnxruntime": ("provider", "threads", "iobinding")}


# small helpers ------------------------------------------------------------------------------------
def stats_ms(seconds: list[float]) -> dict | None:
    """p50/p90/p99 (linear interpolation: p50 <= p90 <= p99 always), mean, min, max in ms."""
    if not seconds:
        return None
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max()), "n": int(ms.size)}


def parse_thresholds(text: str | None) -> list[float] | None:
    """'0,0.5,0.9,2' or 'START:STOP:N' (N evenly spaced values, ends included)."""
    if text is None or text == "":
        return None
    try:
        if ":" in text:
            a, b, n = text.split(":")
            if int(n) < 2:
                raise ValueError
            return [round(float(x), 6) for x in np.linspace(float(a), float(b), int(n))]
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise EdgekitError(f"--sweep-threshold: cannot read '{text}'",
                           "give comma-separated values (0,0.5,0.9,2) or START:STOP:N (0:1:5)") from None


class RssMonitor:
    """Peak resident memory of this process over a `with` block (see the module docstring)."""

    def __init__(self, interval_s: float = 0.01):
        import psutil

        self.proc = psutil.Process()
        self.interval_s = interval_s
        self._stop = threading.Event()

    @staticmethod
    def _maxrss() -> int:
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru if sys.platform == "darwin" else ru * 1024  # Linux reports kB

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sampled = max(self.sampled, self.proc.memory_info().rss)

    def __enter__(self) -> RssMonitor:
        self.baseline = self.proc.memory_info().rss
        self.sampled = self.baseline
        self.ru_before = self._maxrss()
        self._thread = threading.Thread(target=self._loop, name="edgekit-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sampled = max(self.sampled, self.proc.memory_info().rss)
        self.ru_after = self._maxrss()

    def result(self) -> dict:
        if self.ru_after > self.ru_before:
            peak, how = self.ru_after, "ru_maxrss: the kernel's high-water mark, raised during the profile"
        else:
            peak, how = self.sampled, ("sampled every 10 ms (this process had peaked higher before the "
                                       "profile, so ru_maxrss cannot tell)")
        return {"baseline_rss_bytes": self.baseline, "peak_rss_bytes": peak,
                "peak_rss_delta_bytes": max(0, peak - self.baseline), "peak_from": how}


def dir_bytes(path: Path | None) -> int | None:
    if path is None:
        return None
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# weight traffic and the roofline ------------------------------------------------------------------
def weight_traffic(cfg, precision: str, batch: int = 1, run_fraction: list[float] | None = None) -> dict:
    """Bytes of weights stored and read per decode step.

    Per step every layer reads its block's attention norm and K/V projections (the cache is appended
    outside R1's condition) and its gate; the rest of the block (Q, O, relative position, MLP) only
    when the layer runs (`run_fraction[layer]`, measured; 1.0 without gates). A block shared by several
    layers is read once per use. Linear weights take 1 byte at int8 (+ a 4-byte scale per output for
    the torch int8 checkpoint's per-channel scales), 2 at fp16/bf16, 4 at fp32; norms, position tables
    and embeddings stay at the activation width. The embedding reads `batch` rows; the head all of it.
    """
    from edgekit.models import build
    from edgekit.models.layers import Linear

    model = build(cfg, device="meta")
    lin = {"int8": 1, "fp16": 2, "bf16": 2}.get(precision, 4)
    other = 2 if precision in ("fp16", "bf16") else 4

    def module_bytes(module) -> int:
        total = 0
        for _, m in module.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if isinstance(m, Linear) and pname == "weight":
                    total += p.numel() * lin + (4 * p.shape[1] if precision == "int8" else 0)
                else:
                    total += p.numel() * other
        return total

    per_block = []
    for block in model.blocks:
        always = module_bytes(block.attn_norm) + module_bytes(block.attn.k) + module_bytes(block.attn.v)
        per_block.append((always, module_bytes(block) - always))
    gates = {int(k): module_bytes(g) for k, g in getattr(model, "gates", {}).items()}
    run_fraction = run_fraction or [1.0] * cfg.n_layers
    head = module_bytes(model.lm_head) if model.lm_head is not None else model.embed.weight.numel() * other
    step = batch * cfg.d_model * other + module_bytes(model.norm) + head
    for layer in range(cfg.n_layers):
        always, rest = per_block[cfg.block_of(layer)]
        step += always + gates.get(layer, 0) + run_fraction[layer] * rest
    stored = sum(module_bytes(m) for m in [*model.blocks, model.embed, model.norm]) + sum(gates.values())
    stored += module_bytes(model.lm_head) if model.lm_head is not None else 0
    return {"weight_bytes_stored": int(stored), "weight_bytes_per_decode_step": int(step)}


def bandwidth_for(info: dict, on_gpu: bool) -> tuple[float | None, str]:
    """(GB/s, where it comes from) for the memory the weights stream from."""
    try:
        import profiles
    except ImportError:
        return None, "profiles package not installed"
    if info.get("jetson") or (on_gpu and info.get("cuda")):
        name = info.get("profile")
        if not name or name == "host":
            return None, f"no profile for this device ({info.get('profile_from')}): bandwidth unknown"
        bw, measured = profiles.load(name).bandwidth()
        return bw, f"profile {name} ({'measured' if measured else 'datasheet'})"
    if on_gpu:
        return None, "GPU run without a detected CUDA device"
    from profiles.host import host_profile

    bw, _ = host_profile().bandwidth()
    return bw, "this host, measured by profiles.host (STREAM copy, cached)"


# measuring ----------------------------------------------------------------------------------------
class Samples:
    """What one setting measured so far (kept per step, so an interrupted run still counts)."""

    def __init__(self):
        self.ttft: list[float] = []
        self.decode: list[float] = []
        self.e2e: list[float] = []
        self.executed: list[np.ndarray] = []  # per measured call (prefill and decode)
        self.decode_executed: list[np.ndarray] = []
        self.tokens = 0  # generated tokens (all rows) in measured runs
        self.runs = 0  # completed measured runs


def one_run(runner, prompts: np.ndarray, new_tokens: int, thresholds, sink: Samples | None, advance) -> None:
    """Prefill + (new_tokens - 1) greedy decode steps; times go to `sink` (None: warm-up)."""
    batch = prompts.shape[0]
    sess = runner.session(batch, thresholds)
    t0 = time.perf_counter()
    token = prompts
    for i in range(new_tokens):  # step 0: the prefill (time to first token), then greedy decode steps
        ta = time.perf_counter()
        logits, executed = sess.step(token)
        token = logits.argmax(-1).reshape(batch, 1)
        seconds = time.perf_counter() - ta
        if sink is not None:
            (sink.decode if i else sink.ttft).append(seconds)
            sink.tokens += batch
            if executed is not None:
                sink.executed.append(executed)
                if i:
                    sink.decode_executed.append(executed)
        advance(1)
    if sink is not None:
        sink.e2e.append(time.perf_counter() - t0)
        sink.runs += 1


def gating(cfg, executed: list[np.ndarray], decode_executed: list[np.ndarray]) -> dict | None:
    if cfg.family != "r1":
        return None
    gated = list(cfg.gated_layers)
    out = {"gated_layers": gated, "calls": len(executed),
           "note": "one gate decision per layer per call, shared by every row of the batch"}
    if not executed:
        return out
    ex = np.stack(executed).astype(bool)  # [calls, layers]
    g = ex[:, gated]
    out.update(gated_executions=int(g.size), gated_skipped=int((~g).sum()),
               skipped_fraction=float((~g).mean()) if g.size else 0.0,
               layer_skipped_fraction=float((~ex).mean()))
    if decode_executed:
        d = np.stack(decode_executed).astype(bool)
        out["decode_skipped_fraction"] = float((~d[:, gated]).mean()) if gated else 0.0
        out["decode_run_fraction_per_layer"] = [round(float(x), 4) for x in d.mean(0)]
    return out


def summarize(s: Samples, batch: int, prompt_len: int) -> dict:
    decode_s = sum(s.decode)
    e2e_s = sum(s.e2e)
    return {"ttft_ms": stats_ms(s.ttft), "decode_ms_per_token": stats_ms(s.decode), "e2e_ms": stats_ms(s.e2e),
            "decode_tokens_per_s": batch * len(s.decode) / decode_s if decode_s else None,
            "prefill_tokens_per_s": batch * prompt_len * len(s.ttft) / sum(s.ttft) if s.ttft else None,
            "requests_per_s": batch * s.runs / e2e_s if e2e_s else None,
            "measured_runs": s.runs}


def seeded_prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, min(vocab, 256), (batch, length), dtype=np.int64)


# dynamic batching --------------------------------------------------------------------------------
def mixed_requests(n: int, prompt_len: int, seed: int) -> list[int]:
    """Seeded prompt lengths, uniform in [prompt_len/4, 7*prompt_len/4] (mean ~ prompt_len)."""
    rng = np.random.default_rng(seed + 1)
    return [int(x) for x in rng.integers(max(1, prompt_len // 4), max(2, 7 * prompt_len // 4) + 1, n)]


def plan_fixed(lengths: list[int], batch: int) -> list[list[int]]:
    """Arrival order, `batch` requests per call, padded to the longest in the batch."""
    return [list(range(i, min(i + batch, len(lengths)))) for i in range(0, len(lengths), batch)]


def plan_dynamic(lengths: list[int], new_tokens: int, budget: int) -> list[list[int]]:
    """Length-aware: longest first, a batch grows while rows x (its longest prompt + new tokens) <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * (lengths[groups[-1][0]] + new_tokens) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def run_workload(runner, lengths: list[int], groups: list[list[int]], new_tokens: int, thresholds, seed: int,
                 pad: int, advance) -> dict:
    """Every group: left-padded prefill + decode; wall time over all groups."""
    rng = np.random.default_rng(seed + 2)
    vocab = min(runner.cfg.vocab_size, 256)
    prompts = [rng.integers(0, vocab, n, dtype=np.int64) for n in lengths]
    s = Samples()
    padded = real = 0
    t0 = time.perf_counter()
    for group in groups:
        width = max(lengths[i] for i in group)
        ids = np.full((len(group), width), pad, dtype=np.int64)
        for row, i in enumerate(group):
            ids[row, width - lengths[i]:] = prompts[i]
        padded += ids.size
        real += sum(lengths[i] for i in group)
        one_run(runner, ids, new_tokens, thresholds, s, lambda *a: None)
        advance(1)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "batches": len(groups), "rows_per_batch_mean": len(lengths) / len(groups),
            "generated_tokens_per_s": len(lengths) * new_tokens / wall, "requests_per_s": len(lengths) / wall,
            "prompt_padding_fraction": 1 - real / padded,
            "gating": gating(runner.cfg, s.executed, s.decode_executed)}


# the profile --------------------------------------------------------------------------------------
def _check(prompt_len, new_tokens, batch, warmup, runs, requests, token_budget, workload, batching) -> None:
    for name, value, low in (("--prompt-len", prompt_len, 1), ("--new-tokens", new_tokens, 2), ("--batch", batch, 1),
                             ("--warmup", warmup, 0), ("--runs", runs, 1), ("--requests", requests, 1)):
        if value < low:
            raise EdgekitError(f"{name} must be at least {low}, got {value}",
                               "decode latency needs at least 2 new tokens" if name == "--new-tokens" else None)
    if workload not in WORKLOADS:
        raise EdgekitError(f"unknown workload '{workload}'", f"use one of {', '.join(WORKLOADS)}")
    if batching not in BATCHING:
        raise EdgekitError(f"unknown batching '{batching}'", f"use one of {', '.join(BATCHING)}")
    if token_budget is not None and token_budget < 1:
        raise EdgekitError(f"--token-budget must be positive, got {token_budget}")


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
            iobinding: bool | None = None, seed: int = 0, roofline: bool = True, energy: bool = True,
            out: str | Path | None = None, plot: str | Path | None = None, show_progress: bool = True) -> dict:
    """Measure `target` on this machine; returns the report (README.md documents every field)."""
    from edgekit import device as devices
    from edgekit.progress import progress

    _check(prompt_len, new_tokens, batch, warmup, runs, requests, token_budget, workload, batching)
    sweep = parse_thresholds(sweep) if isinstance(sweep, str) else sweep
    runner, _, source = open_profiled_runner(target, runtime, dtype=dtype, device=device, provider=provider,
                                             threads=threads, iobinding=iobinding)
    res, cfg = runner.resolved, runner.cfg
    if not runner.spec.gated and (threshold is not None or sweep):
        raise EdgekitError(f"--threshold/--sweep-threshold apply to R1 models; {cfg.name} is {cfg.family.upper()}")
    longest = max(mixed_requests(requests, prompt_len, seed)) if workload == "mixed" else prompt_len
    if longest + new_tokens > cfg.max_seq_len:
        raise EdgekitError(f"prompt ({longest}) + new tokens ({new_tokens}) exceed the context ({cfg.max_seq_len})",
                           "lower --prompt-len or --new-tokens")
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
                     "workload": workload},
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
                cuda = _cuda_reset(runner)
                with runner:
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
                    cuda = _cuda_peak(runner, cuda)
    except KeyboardInterrupt:
        report["interrupted"] = True
    report["latency"] = summarize(main, batch, prompt_len)
    report["memory"] = {**mem.result(), **(cuda or {})} if hasattr(mem, "ru_after") else None
    precision = report.get("runtime", {}).get("precision") or res.manifest.get("precision") or "fp32"
    g = gating(cfg, main.executed, main.decode_executed)
    report["gating"] = g
    traffic = weight_traffic(cfg, precision, batch, (g or {}).get("decode_run_fraction_per_layer"))
    report["size"] = {"artifact_bytes": dir_bytes(res.path), "precision": precision, **traffic}
    report["roofline"] = _roofline(report, traffic, info, on_gpu, batch) if roofline and not report["interrupted"] \
        else None
    tokens = main.tokens
    if energy_result and tokens:
        report["energy"] = {**energy_result, "joules_per_token": energy_result["joules"] / tokens,
                            "tokens": tokens, "available": True}
    else:
        report["energy"] = {"available": False, "reason": energy_reason if not energy_result else "no tokens"}
    report["sweep"] = [_sweep_entry(t, s, cfg, batch, prompt_len) for t, s in sweep_samples if s.ttft] or None
    report["workload"] = _workload_report(work, lengths, budget, batch, new_tokens, requests) if work else None
    report["samples"] = {"ttft_ms": [round(x * 1e3, 4) for x in main.ttft],
                         "decode_ms": [round(x * 1e3, 4) for x in main.decode]}
    if out:
        write_json(report, out)
    if plot and (main.decode or report["sweep"]):
        write_plot(report, plot)
    return report


def _cuda_reset(runner) -> dict | None:
    dev = str(getattr(runner, "options", {}).get("device") or "")
    if not dev.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return {"cuda_allocated_before_bytes": torch.cuda.memory_allocated()}


def _cuda_peak(runner, before: dict | None) -> dict | None:
    if before is None:
        return None
    import torch

    return {**before, "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved()}


def _roofline(report: dict, traffic: dict, info: dict, on_gpu: bool, batch: int) -> dict:
    bw, where = bandwidth_for(info, on_gpu)
    measured = report["latency"]["decode_tokens_per_s"]
    out = {"bandwidth_gbs": bw, "bandwidth_from": where,
           "weight_bytes_per_decode_step": traffic["weight_bytes_per_decode_step"]}
    if "host" in where:
        out["note"] = ("the host figure follows the STREAM copy convention (2 x bytes copied / time); a read-only "
                       "weight stream can run faster, so a fraction above 1 is possible on a CPU")
    if bw:
        limit = batch * bw * 1e9 / traffic["weight_bytes_per_decode_step"]
        out.update(roofline_tokens_per_s=limit, fraction_of_roofline=measured / limit if measured else None)
    return out


def _sweep_entry(t: float, s: Samples, cfg, batch: int, prompt_len: int) -> dict:
    lat = summarize(s, batch, prompt_len)
    g = gating(cfg, s.executed, s.decode_executed) or {}
    return {"threshold": t, "ttft_ms_p50": lat["ttft_ms"]["p50"],
            "decode_ms_p50": (lat["decode_ms_per_token"] or {}).get("p50"),
            "decode_ms_p90": (lat["decode_ms_per_token"] or {}).get("p90"),
            "decode_ms_p99": (lat["decode_ms_per_token"] or {}).get("p99"),
            "decode_tokens_per_s": lat["decode_tokens_per_s"], "skipped_fraction": g.get("skipped_fraction"),
            "decode_skipped_fraction": g.get("decode_skipped_fraction"), "measured_runs": s.runs}


def _workload_report(work: dict, lengths: list[int], budget: int, batch: int, new_tokens: int, n: int) -> dict:
    out = {"requests": n, "prompt_lengths": lengths, "new_tokens": new_tokens, "batch": batch, "token_budget": budget,
           "note": "prompts are left-padded within a batch; the graph has no attention mask, so padded rows' "
                   "outputs are approximate: this measures cost, not quality. R1 takes one gate decision per "
                   "call for the whole batch, so batching also changes which layers run."}
    for mode, passes in work.items():
        if not passes:
            continue
        median = statistics.median(p["generated_tokens_per_s"] for p in passes)
        best = min(passes, key=lambda p: abs(p["generated_tokens_per_s"] - median))
        out[mode] = {**best, "generated_tokens_per_s": median, "passes": len(passes),
                     "generated_tokens_per_s_all": [p["generated_tokens_per_s"] for p in passes]}
    if "fixed" in out and "dynamic" in out:
        out["dynamic_over_fixed"] = out["dynamic"]["generated_tokens_per_s"] / out["fixed"]["generated_tokens_per_s"]
    return out


# output -------------------------------------------------------------------------------------------
def write_json(data: dict, path: str | Path) -> Path:
    from edgekit.artifact import os_error

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(path)
    except OSError as e:
        raise os_error(e, path) from None
    return path


def write_plot(report: dict, path: str | Path) -> Path:
    """PNG: decode-latency distribution; with a sweep, latency and skipped fraction vs threshold; with a
    mixed workload, the two batching throughputs. Matplotlib's Agg canvas directly (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from edgekit.artifact import os_error

    panels = [p for p in ("latency", "sweep", "workload") if report.get(p) and (p != "latency" or
                                                                                  report["samples"]["decode_ms"])]
    fig = Figure(figsize=(6.4 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    title = f"{report['target']['name']} · {report.get('runtime', {}).get('runtime', '?')} · " \
            f"{report.get('size', {}).get('precision', '')} · batch {report['settings']['batch']}"
    for ax, panel in zip(axes, panels):
        if panel == "latency":
            ms = report["samples"]["decode_ms"]
            ax.hist(ms, bins=min(40, max(5, len(ms) // 3)), color="#4c72b0")
            d = report["latency"]["decode_ms_per_token"]
            for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                ax.axvline(d[q], color="k", linestyle=style, label=f"{q} {d[q]:.2f} ms")
            ax.set_xlabel("decode latency per step (ms)")
            ax.set_ylabel("steps")
            ax.legend()
            ax.set_title("decode latency distribution")
        elif panel == "sweep":
            sw = report["sweep"]
            x = [e["threshold"] for e in sw]
            ax.plot(x, [e["decode_ms_p50"] for e in sw], "o-", color="#4c72b0", label="decode p50 (ms)")
            ax.set_xlabel("R1 threshold (all gates)")
            ax.set_ylabel("decode latency p50 (ms)")
            ax2 = ax.twinx()
            ax2.plot(x, [e["skipped_fraction"] for e in sw], "s--", color="#dd8452", label="skipped fraction")
            ax2.set_ylabel("fraction of gated layer executions skipped")
            ax2.set_ylim(-0.05, 1.05)
            ax.set_title("latency and skipping vs threshold")
            lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
            ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
        else:
            w = report["workload"]
            modes = [m for m in ("fixed", "dynamic") if m in w]
            vals = [w[m]["generated_tokens_per_s"] for m in modes]
            ax.bar(modes, vals, color=["#4c72b0", "#55a868"][: len(modes)])
            ax.set_ylabel("generated tokens/s")
            ratio = f" (dynamic/fixed {w['dynamic_over_fixed']:.2f}x)" if "dynamic_over_fixed" in w else ""
            ax.set_title(f"mixed workload, {w['requests']} requests{ratio}")
    fig.suptitle(title)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise os_error(e, path) from None
    return path


# isolation and compare ----------------------------------------------------------------------------
def profile_isolated(target: str | Path, runtime: str | None = None, **kwargs) -> dict:
    """`profile()` in a fresh Python process: its memory numbers belong to this model alone.

    The child inherits stderr (the progress bar) and writes the report as the last line of stdout.
    Ctrl-C reaches both (same process group): the child returns what it measured, the parent marks it.
    """
    import subprocess

    payload = json.dumps({"target": str(target), "runtime": runtime, **kwargs}, default=str)
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.profile"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    interrupted = False
    try:
        stdout, _ = proc.communicate(payload)
    except KeyboardInterrupt:
        interrupted = True
        try:
            stdout, _ = proc.communicate(timeout=60)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            stdout, _ = proc.communicate()
    lines = [ln for ln in (stdout or "").splitlines() if ln.startswith("{")]
    if not lines:
        if interrupted:
            raise KeyboardInterrupt
        raise EdgekitError(f"profiling {target} in a subprocess failed (exit code {proc.returncode})",
                           "run 'edgekit profile' on it directly to see why")
    data = json.loads(lines[-1])
    if "error" in data:
        raise EdgekitError(data["error"], data.get("fix"))
    data["interrupted"] = data.get("interrupted", False) or interrupted
    return data


def _child_main() -> None:  # python -m edgekit.profile: kwargs as JSON on stdin, report as JSON on stdout
    kwargs = json.loads(sys.stdin.read())
    try:
        report = profile(**kwargs)
    except EdgekitError as e:
        print(json.dumps({"error": e.message, "fix": e.fix}))
        sys.exit(1)
    print(json.dumps(report, default=str))


COMPARE_ROWS = [  # (label, path in report, unit scale, unit, better)
    ("peak RSS", ("memory", "peak_rss_bytes"), 2**-20, "MiB", "lower"),
    ("peak RSS over baseline", ("memory", "peak_rss_delta_bytes"), 2**-20, "MiB", "lower"),
    ("CUDA max allocated", ("memory", "cuda_max_allocated_bytes"), 2**-20, "MiB", "lower"),
    ("weights stored", ("size", "weight_bytes_stored"), 2**-20, "MiB", "lower"),
    ("artifact on disk", ("size", "artifact_bytes"), 2**-20, "MiB", "lower"),
    ("time to first token p50", ("latency", "ttft_ms", "p50"), 1, "ms", "lower"),
    ("decode latency p50", ("latency", "decode_ms_per_token", "p50"), 1, "ms", "lower"),
    ("decode latency p90", ("latency", "decode_ms_per_token", "p90"), 1, "ms", "lower"),
    ("decode latency p99", ("latency", "decode_ms_per_token", "p99"), 1, "ms", "lower"),
    ("decode throughput", ("latency", "decode_tokens_per_s"), 1, "tokens/s", "higher"),
    ("requests/s at the batch", ("latency", "requests_per_s"), 1, "req/s", "higher"),
    ("gated executions skipped", ("gating", "skipped_fraction"), 100, "%", None),
    ("fraction of bandwidth roofline", ("roofline", "fraction_of_roofline"), 100, "%", "higher"),
    ("energy per token", ("energy", "joules_per_token"), 1e3, "mJ", "lower"),
]


def _dig(d: dict | None, path: tuple) -> float | None:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d if isinstance(d, int | float) and not isinstance(d, bool) else None


def comparison_rows(a: dict, b: dict) -> list[dict]:
    rows = []
    for label, path, scale, unit, better in COMPARE_ROWS:
        va, vb = _dig(a, path), _dig(b, path)
        if va is None and vb is None:
            continue
        row = {"metric": label, "unit": unit, "a": None if va is None else va * scale,
               "b": None if vb is None else vb * scale, "better": better}
        if va not in (None, 0) and vb is not None:
            row["difference_pct"] = 100.0 * (vb - va) / va
        rows.append(row)
    return rows


def _label(report: dict) -> str:
    rt = report.get("runtime", {})
    extra = rt.get("provider") or rt.get("device") or ""
    return f"{report['target']['name']} ({rt.get('runtime', '?')} {report['size']['precision']}" \
           f"{' ' + extra if extra and extra != 'cpu' else ''})"


def _int8_variant(target: str, runtime: str | None, tmp: Path, progress_note) -> str:
    """The int8 form of `target` for `runtime`: a torch-int8 checkpoint (edgekit quantize) or an ORT
    dynamic-int8 ONNX export; an int8 artifact is used as it is."""
    from edgekit import api
    from edgekit.resolve import resolve

    res = resolve(target)
    if res.manifest.get("precision") == "int8":
        return str(target)
    if res.kind in ("onnx", "engine"):
        raise EdgekitError(f"--int8: {target} is an fp32 {res.kind} artifact",
                           "pass the preset/checkpoint, or an artifact exported with --int8")
    out = tmp / f"{res.name}-int8-{len(list(tmp.iterdir()))}"
    if (runtime or "torch") == "torch":
        progress_note(f"quantizing {target} to torch int8")
        api.quantize(target, out)
    else:
        progress_note(f"exporting {target} to ONNX int8 (slow: torch.export)")
        api.export(target, "onnx", out, int8=True)
    return str(out)


def compare(a: str, b: str | None = None, runtime: str | None = None, int8: bool = False, isolate: bool = True,
            out: str | Path | None = None, **settings) -> dict:
    """Two targets under identical settings, or one target under two runtimes (`runtime="r1,r2"`) with
    their outputs compared on the same seeded inputs (exporters.onnx.validate)."""
    import tempfile

    runtimes = [r.strip() for r in runtime.split(",")] if runtime else [None]
    if b is None:
        if len(runtimes) != 2:
            raise EdgekitError("compare needs two targets, or one target and two runtimes",
                               "edgekit compare r1-mini v3-mini, or edgekit compare DIR --runtime torch,onnxruntime")
        if int8:
            raise EdgekitError("--int8 applies when comparing two targets", "pass an int8 artifact instead")
        jobs = [(a, runtimes[0]), (a, runtimes[1])]
        mode = "runtimes"
    else:
        if len(runtimes) != 1:
            raise EdgekitError("--runtime R1,R2 compares two runtimes of one target",
                               "with two targets give one runtime (or none)")
        jobs = [(a, runtimes[0]), (b, runtimes[0])]
        mode = "targets"
    settings.pop("plot", None)
    run = profile_isolated if isolate else profile
    with tempfile.TemporaryDirectory(prefix="edgekit-compare-") as tmp:
        if int8:
            jobs = [(_int8_variant(t, r, Path(tmp), lambda m: print(m, file=sys.stderr)), r) for t, r in jobs]
        reports, interrupted = [], False
        for target, rt in jobs:
            try:
                reports.append(run(target, rt, **settings))
            except KeyboardInterrupt:
                interrupted = True
            if interrupted or reports[-1].get("interrupted"):
                interrupted = True
                break
    result = {"edgekit_compare": REPORT_VERSION, "mode": mode, "int8": int8, "settings": settings,
              "interrupted": interrupted, "labels": [_label(r) for r in reports], "profiles": reports}
    if len(reports) == 2:
        result["rows"] = comparison_rows(*reports)
        if mode == "runtimes":
            result["outputs"] = compare_outputs(a, runtimes, settings)
    if out:
        write_json(result, out)
    return result


def compare_outputs(target: str, runtimes: list[str], settings: dict) -> dict:
    """Both runtimes on the same seeded inputs (exporters.onnx.validate's cases), report only."""
    from exporters.onnx import validate, validation_cases

    keys = ("dtype", "device", "provider", "threads", "iobinding")
    options = {k: settings.get(k) for k in keys}
    first, _, _ = open_profiled_runner(target, runtimes[0], **options)
    second, _, _ = open_profiled_runner(target, runtimes[1], **options)
    with first, second:
        # min_cosine=-1: report every difference (skip patterns included), never fail: this is a comparison
        rep = validate(first, second, first.spec, tolerance=None, min_cosine=-1.0)
    return {"reference": runtimes[0], "candidate": runtimes[1], "cases": len(validation_cases(first.spec)),
            "max_abs_diff": rep["max_abs_diff"], "logits_max_abs_diff": max(c["logits_max_abs_diff"]
                                                                            for c in rep["cases"]),
            "argmax_agreement": rep["argmax_agreement"], "logit_cosine_mean": rep["logit_cosine_mean"],
            "logit_cosine_min": rep["logit_cosine_min"]}



# terminal output (the CLI's rendering; kept here so edgekit/cli.py stays a thin shell) -------------
def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def show_profile(r: dict, console) -> None:
    from rich.table import Table

    rt, lat, s = r.get("runtime", {}), r["latency"], r["settings"]
    dev = r["device"]
    where = (dev.get("jetson") or {}).get("model") or (dev.get("cuda") or {}).get("name") or dev["cpu"]["model"]
    console.print(f"[bold]{r['target']['name']}[/bold] on {where} ({dev.get('profile') or 'no profile'}) - "
                  f"{rt.get('runtime', '?')} {r['size']['precision']} {rt.get('device') or rt.get('provider') or ''}; "
                  f"prompt {s['prompt_len']}, {s['new_tokens']} new tokens, batch {s['batch']}, "
                  f"{lat['measured_runs']} measured run(s) after {s['warmup']} warm-up", highlight=False)
    if r.get("interrupted"):
        console.print("[yellow]interrupted: the numbers below cover what was measured before Ctrl-C[/yellow]")
    t = Table(show_header=True)
    for c in ("metric", "p50", "p90", "p99", "mean"):
        t.add_column(c, justify="right" if c != "metric" else "left")
    for label, key in (("time to first token (ms)", "ttft_ms"), ("decode per token (ms)", "decode_ms_per_token"),
                       ("request end to end (ms)", "e2e_ms")):
        st = lat.get(key) or {}
        t.add_row(label, *(_fmt(st.get(q)) for q in ("p50", "p90", "p99", "mean")))
    console.print(t)
    mem, size, roof, en, g = r.get("memory") or {}, r["size"], r.get("roofline") or {}, r["energy"], r.get("gating")
    lines = [f"decode {_fmt(lat['decode_tokens_per_s'])} tokens/s, prefill {_fmt(lat['prefill_tokens_per_s'])} "
             f"tokens/s, {_fmt(lat['requests_per_s'])} requests/s at batch {s['batch']}"]
    if mem:
        mib = {k: v / 2**20 for k, v in mem.items() if k.endswith("_bytes")}
        text = (f"memory: peak RSS {mib['peak_rss_bytes']:.1f} MiB, {mib['peak_rss_delta_bytes']:.1f} MiB over the "
                f"{mib['baseline_rss_bytes']:.1f} MiB baseline")
        if "cuda_max_allocated_bytes" in mib:
            text += (f"; CUDA max allocated {mib['cuda_max_allocated_bytes']:.1f} MiB, reserved "
                     f"{mib['cuda_max_reserved_bytes']:.1f} MiB")
        lines.append(text)
    lines.append(f"size: {size['weight_bytes_stored'] / 2**20:.2f} MiB of weights"
                 + (f", {size['artifact_bytes'] / 2**20:.2f} MiB on disk" if size.get("artifact_bytes") else ""))
    if g and "skipped_fraction" in g:
        lines.append(f"R1: {g['gated_skipped']} of {g['gated_executions']} gated layer executions skipped "
                     f"({100 * g['skipped_fraction']:.1f}%) at threshold {_fmt(s['threshold'])}")
    if roof.get("fraction_of_roofline") is not None:
        lines.append(f"roofline: {_fmt(roof['roofline_tokens_per_s'])} tokens/s at {_fmt(roof['bandwidth_gbs'])} GB/s "
                     f"({roof['bandwidth_from']}), {roof['weight_bytes_per_decode_step'] / 2**20:.2f} MiB of weights "
                     f"per step: measured = {100 * roof['fraction_of_roofline']:.1f}% of it")
    elif roof:
        lines.append(f"roofline: {roof['bandwidth_from']}")
    lines.append(f"energy: {_fmt(en['joules_per_token'] * 1e3)} mJ/token, mean {_fmt(en['mean_power_w'])} W "
                 f"({en['source']}, {en.get('rails', '')})" if en.get("available") else f"energy: {en['reason']}")
    jet = dev.get("jetson")
    if jet:
        lines.append(f"Jetson: L4T {jet['l4t']}, nvpmodel {(jet['nvpmodel'] or {}).get('mode', 'unknown')}, "
                     f"jetson_clocks {jet['jetson_clocks']}")
    for line in lines:
        console.print(line, highlight=False)
    if r.get("sweep"):
        t = Table(title="threshold sweep")
        for c in ("threshold", "decode p50 ms", "decode p90 ms", "tokens/s", "skipped"):
            t.add_column(c, justify="right")
        for e in r["sweep"]:
            t.add_row(_fmt(e["threshold"]), _fmt(e["decode_ms_p50"]), _fmt(e["decode_ms_p90"]),
                      _fmt(e["decode_tokens_per_s"]), f"{100 * (e['skipped_fraction'] or 0):.1f}%")
        console.print(t)
    w = r.get("workload")
    if w:
        t = Table(title=f"mixed workload: {w['requests']} requests, {w['new_tokens']} new tokens each, "
                        f"token budget {w['token_budget']}")
        for c in ("batching", "tokens/s", "requests/s", "batches", "rows/batch", "prompt padding"):
            t.add_column(c, justify="right")
        for m in ("fixed", "dynamic"):
            if m in w:
                e = w[m]
                t.add_row(m, _fmt(e["generated_tokens_per_s"]), _fmt(e["requests_per_s"]), str(e["batches"]),
                          _fmt(e["rows_per_batch_mean"]), f"{100 * e['prompt_padding_fraction']:.1f}%")
        console.print(t)
        if "dynamic_over_fixed" in w:
            console.print(f"dynamic / fixed throughput: {w['dynamic_over_fixed']:.3f}x", highlight=False)


def show_compare(r: dict, console) -> None:
    from rich.table import Table

    if r.get("interrupted"):
        console.print("[yellow]interrupted: comparison incomplete[/yellow]")
    if "rows" not in r:
        for p in r["profiles"]:
            show_profile(p, console)
        return
    a, b = r["labels"]
    t = Table(title=f"{a}  vs  {b}")
    for c in ("metric", "A", "B", "B vs A"):
        t.add_column(c, justify="left" if c == "metric" else "right")
    for row in r["rows"]:
        diff = row.get("difference_pct")
        cell = "-" if diff is None else f"{diff:+.1f}%"
        if diff is not None and row["better"]:
            good = (diff < 0) == (row["better"] == "lower")
            cell = f"[{'green' if good else 'red'}]{cell}[/]" if abs(diff) >= 0.05 else cell
        t.add_row(f"{row['metric']} ({row['unit']})", _fmt(row["a"], 4), _fmt(row["b"], 4), cell)
    console.print(t)
    o = r.get("outputs")
    if o:
        console.print(f"outputs on {o['cases']} seeded cases ({o['reference']} vs {o['candidate']}): max abs diff "
                      f"{o['max_abs_diff']:.3g} (logits {o['logits_max_abs_diff']:.3g}), argmax agreement "
                      f"{100 * o['argmax_agreement']:.2f}%, logit cosine mean {o['logit_cosine_mean']:.6f} "
                      f"(min {o['logit_cosine_min']:.6f})", highlight=False)

if __name__ == "__main__":
    _child_main()
