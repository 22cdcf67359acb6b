"""Issue 18 benchmark: export wall time and peak RSS vs parameter count, streamed (stamped from a 3-layer trace,
weights written one tensor at a time) vs the in-memory path; trace time vs depth; r1-8.5b int8 decoding.

Every export is the real CLI (`python -m edgekit.cli export ... --json`) in a subprocess; its peak RSS is
sampled with psutil every 0.2 s over the process tree. `uptime` is recorded with every number (the machine is
shared). Results merge into bench/results/export_scale.json (cases already there are kept unless --force), and
export_scale.png is redrawn from it.

    PYTHONPATH=$PWD .venv/bin/python bench/export_scale.py [--work /tmp/ek-scale] [--cases a,b] [--force]
    # adopt a run of the same CLI command measured by /usr/bin/time -v (its "Maximum resident set size"):
    ... bench/export_scale.py --adopt r1-8.5b-int8-stream=/tmp/ek-scale/r1-8.5b-int8:/tmp/ek-scale/big.err
    # per-phase peak RSS of the int8 template step (trace / quantize / stamp) of a preset, in-process:
    ... bench/export_scale.py --phases r1-8.5b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "export_scale.json"
ROOT = HERE.parent

# custom R1 shapes between the presets (config-only directories: --random-weights needs no weights file)
CONFIGS = {
    "r1-1b": dict(family="r1", name="r1-1b", vocab_size=32000, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=4,
                  d_ff=5632, max_seq_len=8192, local_window=128, n_global_buckets=32, max_distance=8192,
                  block_size=128, n_unique_blocks=12, gated_layers=list(range(1, 23))),
    "r1-3b": dict(family="r1", name="r1-3b", vocab_size=32000, d_model=3072, n_layers=48, n_heads=24, n_kv_heads=4,
                  d_ff=8192, max_seq_len=8192, local_window=128, n_global_buckets=32, max_distance=8192,
                  block_size=128, n_unique_blocks=24, gated_layers=list(range(1, 47))),
    # r1-mini's width at 8 and 80 layers: the trace-time-vs-depth pair
    "r1-mini-8": dict(family="r1", name="r1-mini-8", d_model=768, n_layers=8, n_heads=12, n_kv_heads=4, d_ff=2048,
                      max_seq_len=8192, local_window=64, n_global_buckets=16, block_size=64, n_unique_blocks=4,
                      gated_layers=list(range(1, 7))),
    "r1-mini-80": dict(family="r1", name="r1-mini-80", d_model=768, n_layers=80, n_heads=12, n_kv_heads=4,
                       d_ff=2048, max_seq_len=8192, local_window=64, n_global_buckets=16, block_size=64,
                       n_unique_blocks=40, gated_layers=list(range(1, 79))),
}
# name -> (target, extra CLI flags)
CASES = {
    "r1-mini-int8-inmemory": ("r1-mini", ["--int8", "--no-stream"]),
    "r1-mini-int8-stream": ("r1-mini", ["--int8", "--stream"]),
    "r1-1b-int8-stream": ("r1-1b", ["--int8", "--random-weights"]),
    "r1-3b-int8-stream": ("r1-3b", ["--int8", "--random-weights"]),
    "r1-8.5b-int8-stream": ("r1-8.5b", ["--int8", "--random-weights"]),
    "r1-3b-checkpoint-int8": ("r1-3b@checkpoint", ["--int8"]),  # 10 GB fp32 safetensors: streams automatically
    "r1-mini-8-inmemory": ("r1-mini-8", ["--no-stream"]),
    "r1-mini-8-stream": ("r1-mini-8", ["--random-weights"]),
    "r1-mini-80-stream": ("r1-mini-80", ["--random-weights"]),
}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def params(target: str) -> dict:
    from edgekit.config import ModelConfig, preset
    from edgekit.models import build, param_counts

    cfg = ModelConfig.from_dict(CONFIGS[target]) if target in CONFIGS else preset(target)
    return param_counts(build(cfg, device="meta"))


def run_measured(cmd: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, float]:
    """(process, wall seconds, peak RSS GiB of the process tree, sampled every 0.2 s)."""
    import psutil

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    peak = [0]

    def sample():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = sum(c.memory_info().rss for c in [p, *p.children(recursive=True)])
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    t.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - t0, peak[0] / 2**30


def write_checkpoint(cfg_dict: dict, d: Path) -> None:
    """config.json + model.safetensors with seeded random weights, written one tensor at a time (the safetensors
    layout: 8-byte header length, JSON header, raw little-endian data)."""
    import dataclasses

    from edgekit.config import ModelConfig
    from edgekit.models import build
    from edgekit.weights import RandomWeights

    cfg = ModelConfig.from_dict(cfg_dict)
    shapes = {n: tuple(t.shape) for n, t in build(cfg, device="meta").state_dict().items()}
    small = dataclasses.replace(cfg, n_layers=3, d_model=64, n_heads=4, n_kv_heads=0, d_ff=128, vocab_size=256,
                                n_unique_blocks=0, gated_layers=[1])
    source = RandomWeights(shapes, build(small).state_dict(), seed=0)
    header, offset = {}, 0
    for n, shape in shapes.items():
        nbytes = 4 * int(__import__("numpy").prod(shape))
        header[n] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg_dict))
    with open(d / "model.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for n in shapes:
            f.write(source.get(n).tobytes())


def export_case(name: str, work: Path) -> dict:
    target, flags = CASES[name]
    if target.endswith("@checkpoint"):
        target = target.removesuffix("@checkpoint")
        d = work / "checkpoints" / target
        if not (d / "model.safetensors").is_file():
            write_checkpoint(CONFIGS[target], d)
        target_arg = str(d)
    elif target in CONFIGS:
        d = work / "configs" / target
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(CONFIGS[target]))
        if "--no-stream" in flags and not (d / "model.safetensors").is_file():  # the in-memory path loads weights
            from edgekit.checkpoint import save_checkpoint
            from edgekit.config import ModelConfig
            from edgekit.models import build

            save_checkpoint(build(ModelConfig.from_dict(CONFIGS[target])), d)
        target_arg = str(d)
    else:
        target_arg = target
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEKIT_QUIET": "1"}
    before = uptime()
    proc, wall, peak = run_measured([sys.executable, "-m", "edgekit.cli", "export", target_arg, "--out", str(out),
                                     "--json", *flags], env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed: {proc.stderr[-2000:]}")
    row = summarize(name, target, json.loads(proc.stdout), wall, peak, before, uptime(), out)
    if target_arg.startswith(str(work / "checkpoints")):
        row["checkpoint_gib"] = round((Path(target_arg) / "model.safetensors").stat().st_size / 2**30, 2)
    return row


def summarize(name, target, r, wall, peak, before, after, out: Path) -> dict:
    st = r.get("streamed", {})
    v = r.get("validation", {})
    check = v.get("streamed") or v.get("int8") or v.get("fp32") or {}
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    return {"case": name, "target": target, "params": params(target), "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak, 2), "artifact_gib": round(size / 2**30, 3), "precision": r["precision"],
            "streamed": bool(st), "trace_s": st.get("trace_s"), "stamp_s": st.get("stamp_s"),
            "export_s": st.get("wall_s"),
            "export_peak_rss_gib_in_process": st.get("peak_rss_gib"), "graph_ops_if": r["graph_ops"].get("If", 0),
            "nodes": sum(r["graph_ops"].values()),
            "validation": {k: check.get(k) for k in ("passed", "logit_cosine_min", "logit_cosine_mean",
                                                     "argmax_agreement", "max_abs_diff", "reference", "block_loads",
                                                     *(["cases"] if "block_loads" in check else [])) if k in check},
            "uptime_before": before, "uptime_after": after}


def adopt(spec: str) -> dict:
    """name=ARTIFACT:TIME_LOG: an export run by hand under /usr/bin/time -v (wall clock + max RSS from its log)."""
    name, _, rest = spec.partition("=")
    art, _, log = rest.partition(":")
    text = Path(log).read_text()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1).split(":")
    wall = sum(float(x) * 60 ** i for i, x in enumerate(reversed(m)))
    from edgekit.artifact import read_manifest

    r = read_manifest(Path(art))
    uptime_file = Path(log).with_suffix(".uptime")
    before = uptime_file.read_text().strip() if uptime_file.is_file() else ""
    row = summarize(name, CASES[name][0], r, wall, rss_kb / 2**20, before, uptime(), Path(art))
    row["measured_by"] = "/usr/bin/time -v (the python process's max RSS)"
    return row


def decode_case(artifact: Path, tokens: int = 4) -> dict:
    """Load the artifact in ONNX Runtime and greedily decode a few tokens (the CLI's generate)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEKIT_QUIET": "1"}
    before = uptime()
    proc, wall, peak = run_measured([sys.executable, "-m", "edgekit.cli", "generate", str(artifact), "--prompt",
                                     "The edge", "--max-new-tokens", str(tokens), "--json"], env)
    if proc.returncode != 0:
        raise SystemExit(f"decode failed: {proc.stderr[-2000:]}")
    r = json.loads(proc.stdout)
    return {"case": "r1-8.5b-int8-decode", "artifact": str(artifact), "new_tokens": tokens, "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak, 2), "result": {k: v for k, v in r.items() if k not in ("prompt",)},
            "uptime_before": before, "uptime_after": uptime()}


def template_phases(name: str) -> dict:
    """Peak RSS of each phase of the streamed int8 export's template step for preset `name` (trace, int8
    quantization of the template, stamping), psutil-sampled every 0.1 s in this process (run it alone)."""
    import tempfile

    import psutil

    import exporters.onnx_int8 as int8
    import exporters.onnx_stream as stream
    from edgekit.config import preset

    phase, peaks, seconds, t0 = ["build"], {}, {}, time.monotonic()

    def sample():
        me = psutil.Process()
        while phase[0] != "done":
            peaks[phase[0]] = max(peaks.get(phase[0], 0.0), me.memory_info().rss / 2**30)
            time.sleep(0.1)

    def timed(label, f):
        def run(*a, **k):
            start, phase[0] = time.monotonic(), label
            try:
                return f(*a, **k)
            finally:
                seconds[label] = round(time.monotonic() - start, 1)
                phase[0] = "between"
        return run

    threading.Thread(target=sample, daemon=True).start()
    patches = {(stream, "trace_template"): "trace", (int8, "quantize_int8"): "quantize_int8",
               (stream, "segment"): "stamp"}
    saved = {k: getattr(*k) for k in patches}
    for (mod, attr), label in patches.items():
        setattr(mod, attr, timed(label, saved[(mod, attr)]))
    try:
        with tempfile.TemporaryDirectory(prefix="phases-") as d:
            before = uptime()
            stream.stamped_graph(preset(name), Path(d), int8=True)
    finally:
        for k, f in saved.items():
            setattr(*k, f)
        time.sleep(0.2)
        phase[0] = "done"
    return {"model": name, "peak_rss_gib": {k: round(v, 2) for k, v in peaks.items()}, "seconds": seconds,
            "total_s": round(time.monotonic() - t0, 1), "uptime_before": before, "uptime_after": uptime()}


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 4))
    for streamed, marker, label in ((True, "o", "streamed (stamped)"), (False, "s", "in memory (traced)")):
        pts = sorted((r["params"]["unique"] / 1e9, r["wall_s"], r["peak_rss_gib"],
                      r.get("export_peak_rss_gib_in_process"), r.get("export_s")) for r in rows
                     if "params" in r and r["streamed"] == streamed and r["precision"] == "int8")
        if not pts:
            continue
        x, wall, peak, export_peak, export_s = zip(*pts)
        a.plot(x, wall, marker=marker, label=f"{label}: export + validation")
        b.plot(x, peak, marker=marker, label=f"{label}: incl. validation (ORT session)")
        if streamed:
            a.plot(x, export_s, marker=marker, ls="--", label=f"{label}: export step")
            b.plot(x, export_peak, marker=marker, ls="--", label=f"{label}: export step")
    a.set(xscale="log", yscale="log", xlabel="unique parameters (B)", ylabel="wall time (s)",
          title="int8 export time (shared 2-core VM)")
    b.set(xscale="log", xlabel="unique parameters (B)", ylabel="peak RSS (GiB)", title="int8 export peak RSS")
    b.axhline(6, ls=":", c="gray")
    depth = sorted((r["target"], r["trace_s"]) for r in rows if r["case"] in ("r1-mini-8-stream",
                                                                             "r1-mini-80-stream"))
    if depth:
        c.bar([f"{t}\n({'8' if t.endswith('-8') else '80'} layers)" for t, _ in depth], [s for _, s in depth])
    c.set(ylabel="trace s (3-layer template)", title="trace time vs depth")
    for ax in (a, b):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS.with_suffix(".png"), dpi=110)


def save(mine: dict) -> dict:
    """Merge this run's rows into the results file as it is now (another run may have added rows meanwhile)."""
    import psutil

    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": []}
    data["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                       "mem_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    rows = {r["case"]: r for r in data["rows"]} | mine
    data["rows"] = list(rows.values())
    pair = [rows.get("r1-mini-8-stream"), rows.get("r1-mini-80-stream")]
    if all(pair):
        data["trace_80_over_8"] = round(pair[1]["trace_s"] / pair[0]["trace_s"], 3)
    RESULTS.write_text(json.dumps(data, indent=1))
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ek-scale"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--adopt", action="append", default=[])
    ap.add_argument("--decode", type=Path, help="an int8 r1-8.5b artifact to decode a few tokens with")
    ap.add_argument("--keep", action="store_true", help="keep the exported artifacts (default: deleted)")
    ap.add_argument("--quick", action="store_true", help="smoke test: the 8- vs 80-layer trace pair only")
    ap.add_argument("--phases", metavar="PRESET", help="only: per-phase peak RSS of PRESET's int8 template step")
    args = ap.parse_args()
    if args.phases:
        data = json.loads(RESULTS.read_text())
        data.setdefault("template_phases", {})["after"] = template_phases(args.phases)
        print(json.dumps(data["template_phases"]["after"]), flush=True)
        RESULTS.write_text(json.dumps(data, indent=1))
        return
    if args.quick:
        args.cases, args.force = "r1-mini-8-stream,r1-mini-80-stream", True
    done = {r["case"] for r in json.loads(RESULTS.read_text())["rows"]} if RESULTS.is_file() else set()
    mine: dict[str, dict] = {}
    for spec in args.adopt:
        row = adopt(spec)
        mine[row["case"]] = row
    for name in [c for c in args.cases.split(",") if c]:
        if name in done and not args.force:
            continue
        print(f"{name} ...", flush=True)
        mine[name] = export_case(name, args.work)
        print(json.dumps(mine[name]), flush=True)
        if not args.keep:
            shutil.rmtree(args.work / name, ignore_errors=True)
        save(mine)
    if args.decode:
        mine["r1-8.5b-int8-decode"] = decode_case(args.decode)
        print(json.dumps(mine["r1-8.5b-int8-decode"]), flush=True)
    plot(save(mine)["rows"])


if __name__ == "__main__":
    main()
