"""`compare()`: two targets under identical settings, or one target under two runtimes with their
outputs compared on the same seeded inputs. Each profile runs in a fresh Python process
(`python -m edgekit.profiling`), so that one model's memory cannot hide in the other's numbers."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.profiling.measure import REPORT_VERSION, open_profiled_runner, profile, write_json


def profile_isolated(target: str | Path, runtime: str | None = None, **kwargs) -> dict:
    """`profile()` in a fresh Python process: its memory numbers belong to this model alone.

    The child inherits stderr (the progress bar) and writes the report as the last line of stdout.
    Ctrl-C reaches both (same process group): the child returns what it measured, the parent marks it.
    """
    import subprocess

    payload = json.dumps({"target": str(target), "runtime": runtime, **kwargs}, default=str)
    proc = subprocess.Popen([sys.executable, "-m", "edgekit.profiling"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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


def child_main() -> None:  # python -m edgekit.profiling: kwargs as JSON on stdin, report as JSON on stdout
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
    """Both runtimes on the same seeded inputs (edgekit.validate's cases), results only: nothing is judged."""
    from edgekit.validate import cases, run

    keys = ("dtype", "device", "provider", "threads", "iobinding")
    options = {k: settings.get(k) for k in keys}
    first, _, _ = open_profiled_runner(target, runtimes[0], **options)
    second, _, _ = open_profiled_runner(target, runtimes[1], **options)
    with first, second:
        rep = run(first, second, first.spec, fidelity=True)  # each decodes on its own prefill's cache
    return {"reference": runtimes[0], "candidate": runtimes[1], "cases": len(cases(first.spec)),
            "max_abs_diff": rep["max_abs_diff"], "logits_max_abs_diff": max(c["logits_max_abs_diff"]
                                                                            for c in rep["cases"]),
            "argmax_agreement": rep["argmax_agreement"], "logit_cosine_mean": rep["logit_cosine_mean"],
            "logit_cosine_min": rep["logit_cosine_min"]}
