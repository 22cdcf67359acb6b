"""Issue 3 benchmark: ONNX artifacts of the mini presets on this machine.

- file size fp32 vs int8 (ORT dynamic int8, If branches included)
- ONNX Runtime prefill latency (128 tokens) and per-token decode latency at batch 1, fp32 vs int8
- R1 decode latency vs fraction of gated layers skipped (0, 25, 50, 75, 100 %)
- the cost of the If nodes: the same R1 weights exported without gates
- the decode steps again on 1-thread sessions timed by CPU time (robust to other processes on a shared machine)
- where a decode step's time goes: ONNX Runtime's profiler, shares by op type (onnx_decode_profile.py)

Variants are timed round-robin in one run (medians over rounds) because this machine is shared.
Writes bench/results/onnx_export.json and onnx_export.png.

    .venv/bin/python bench/onnx_export.py [--work /tmp/edgekit-bench] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGEKIT_QUIET", "1")

from edgekit import api  # noqa: E402
from edgekit.checkpoint import save_checkpoint  # noqa: E402
from edgekit.models import build  # noqa: E402
from edgekit.spec import DecoderSpec  # noqa: E402
from edgekit.validate import validate  # noqa: E402
from exporters.onnx import MODEL_FILE  # noqa: E402
from exporters.onnx_int8 import quantize_int8  # noqa: E402

HERE = Path(__file__).parent
PROMPT, DECODE = 128, 16


def artifact(work: Path, name: str, target, int8_from: Path | None = None) -> Path:
    out = work / name
    if (out / "manifest.json").is_file():
        return out
    if int8_from is None:
        api.export(target, "onnx", out, force=True)
    else:  # quantize an exported fp32 graph (what `export --int8` does) without exporting twice
        shutil.copytree(int8_from, out, ignore=shutil.ignore_patterns("model.onnx*", "manifest.json"))
        quantize_int8(int8_from / MODEL_FILE, out / MODEL_FILE)
        (out / "manifest.json").write_text(json.dumps({"format": "onnx", "precision": "int8"}))
    return out


def unhoisted(work: Path) -> Path:
    """r1-mini exported without exporters.onnx.hoist_branch_invariants: the ablation that shows what
    moving the branches' data-independent work out of the If nodes saves."""
    import exporters.onnx as onnx_exporter

    out = work / "r1-mini-unhoisted"
    if (out / "manifest.json").is_file():
        return out
    hoist = onnx_exporter.hoist_branch_invariants
    onnx_exporter.hoist_branch_invariants = lambda proto, **kw: {"hoisted": 0, "merged": 0}
    try:
        api.export("r1-mini", "onnx", out, force=True)
    finally:
        onnx_exporter.hoist_branch_invariants = hoist
    return out


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
    return ort.InferenceSession(str(path / MODEL_FILE), so, providers=["CPUExecutionProvider"])


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("model.onnx*"))


def timings(sess, spec: DecoderSpec, thresholds=None, clock=time.perf_counter) -> tuple[float, float]:
    """(prefill seconds for PROMPT tokens, median decode seconds per token) at batch 1. clock=time.thread_time on a
    1-thread session: the CPU time the step took, which other processes on a shared machine barely change."""
    feeds = spec.dummy(1, PROMPT, 0, seed=0, thresholds=thresholds)
    t = clock()
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    prefill = clock() - t
    steps = []
    for i in range(DECODE):
        feeds = {**feeds, "input_ids": np.array([[i + 1]], np.int64),
                 "attention_mask": np.ones((1, PROMPT + i + 1), np.int64)}
        for past, present in zip(spec.past_names(), spec.present_names()):
            feeds[past] = out[present]
        t = clock()
        out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        steps.append(clock() - t)
    return prefill, float(np.median(steps))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-bench"))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    r1 = build("r1-mini")
    ungated_ckpt = args.work / "r1-mini-ungated-ckpt"
    if not (ungated_ckpt / "config.json").is_file():
        ungated = build(dataclasses.replace(r1.cfg, gated_layers=[], name="r1-mini-ungated"))
        ungated.load_state_dict({k: v for k, v in r1.state_dict().items() if not k.startswith("gates.")})
        ungated_ckpt.mkdir(exist_ok=True)
        save_checkpoint(ungated, ungated_ckpt)
    arts = {"v3-mini fp32": artifact(args.work, "v3-mini", "v3-mini"),
            "r1-mini fp32": artifact(args.work, "r1-mini", "r1-mini"),
            "r1-mini fp32 no gates": artifact(args.work, "r1-mini-ungated", ungated_ckpt),
            "r1-mini fp32 unhoisted": unhoisted(args.work)}
    arts["v3-mini int8"] = artifact(args.work, "v3-mini-int8", None, arts["v3-mini fp32"])
    arts["r1-mini int8"] = artifact(args.work, "r1-mini-int8", None, arts["r1-mini fp32"])
    export_seconds = time.time() - t0

    # fidelity of the int8 graphs (same check as `edgekit export --int8`)
    from edgekit.resolve import Resolved, resolve
    from runtimes.onnxruntime import OnnxRuntimeRunner
    from runtimes.torch import TorchRunner

    fidelity = {}
    for name in ("v3-mini", "r1-mini"):
        res = resolve(name)
        spec = DecoderSpec(res.cfg)
        with TorchRunner(res) as ref, OnnxRuntimeRunner(Resolved("onnx", name, res.cfg, arts[f"{name} int8"])) as q:
            rep = validate(ref, q, spec, tolerance=None, min_cosine=0.0)
        fidelity[name] = {k: rep[k] for k in ("logit_cosine_mean", "logit_cosine_min", "argmax_agreement")}

    cfg = r1.cfg
    gated = cfg.gated_layers
    skip_fracs = [0.0, 0.25, 0.5, 0.75, 1.0]

    def thresholds_skipping(frac: float) -> np.ndarray:
        thr = np.zeros(cfg.n_layers, np.float32)
        k = round(frac * len(gated))
        for g in np.array(gated)[np.linspace(0, len(gated) - 1, k).round().astype(int)] if k else []:
            thr[g] = 2.0
        return thr

    runs = {}  # label -> (session, spec, thresholds)
    for label, path in arts.items():
        spec = DecoderSpec(build(label.split()[0], device="meta").cfg if "no gates" not in label else
                           dataclasses.replace(cfg, gated_layers=[]))
        if spec.gated:
            for f in (skip_fracs if label == "r1-mini fp32" else [0.0]):
                runs[f"{label} skip {f:.0%}"] = (path, spec, thresholds_skipping(f))
        else:
            runs[label] = (path, spec, None)
    samples = {k: {"prefill": [], "decode": []} for k in runs}
    load = [os.getloadavg()[0]]
    for _ in range(args.rounds):
        # fresh sessions every round: one session's speed stays off by up to ~10 % for its whole life here (where
        # its buffers landed), which one session per variant turned into a fixed bias between variants
        sessions = {str(p): session(p) for p, _, _ in runs.values()}
        for label, (path, spec, thr) in runs.items():
            p, d = timings(sessions[str(path)], spec, thr)
            samples[label]["prefill"].append(p)
            samples[label]["decode"].append(d)
        load.append(os.getloadavg()[0])
    # the same decode steps on 1-thread sessions, timed by the CPU time of the calling thread (load-robust)
    cpu_labels = ["v3-mini fp32", "v3-mini int8", "r1-mini fp32 skip 0%", "r1-mini int8 skip 0%",
                  "r1-mini fp32 no gates", "r1-mini fp32 unhoisted skip 0%"]
    cpu = {label: [] for label in cpu_labels}
    for _ in range(args.rounds):
        for label in cpu_labels:
            path, spec, thr = runs[label]
            cpu[label].append(timings(session(path, threads=1), spec, thr, clock=time.thread_time)[1])
        load.append(os.getloadavg()[0])
    c = {k: float(np.median(v)) for k, v in cpu.items()}
    lat = {k: {"prefill_ms": 1e3 * float(np.median(v["prefill"])), "decode_ms": 1e3 * float(np.median(v["decode"])),
               "decode_ms_spread": [1e3 * min(v["decode"]), 1e3 * max(v["decode"])]} for k, v in samples.items()}

    d = {k: v["decode_ms"] for k, v in lat.items()}
    all_run, none_run = d["r1-mini fp32 skip 0%"], d["r1-mini fp32 skip 100%"]
    half = d["r1-mini fp32 skip 50%"]
    ideal_half_saving = 0.5 * (all_run - none_run)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "settings": {"prompt_tokens": PROMPT, "decode_tokens": DECODE, "rounds": args.rounds, "batch": 1},
        "load_average_1min_during_timing": [round(min(load), 2), round(max(load), 2)],
        "export_and_quantize_seconds": round(export_seconds, 1),
        "sizes_bytes": {k: size(p) for k, p in arts.items()},
        "int8_over_fp32": {m: round(size(arts[f"{m} int8"]) / size(arts[f"{m} fp32"]), 4)
                           for m in ("v3-mini", "r1-mini")},
        "fidelity_int8": fidelity,
        "latency": lat,
        "int8_decode_speedup": {m: round(d[f"{m} fp32" + (" skip 0%" if m == "r1-mini" else "")] /
                                         d[f"{m} int8" + (" skip 0%" if m == "r1-mini" else "")], 3)
                                for m in ("v3-mini", "r1-mini")},
        "r1_skip_curve_decode_ms": {f: d[f"r1-mini fp32 skip {f:.0%}"] for f in skip_fracs},
        "r1_half_skip_fraction_of_ideal_saving": round((all_run - half) / ideal_half_saving, 3),
        "if_overhead_when_nothing_skipped": round(all_run / d["r1-mini fp32 no gates"] - 1, 4),
        "if_overhead_without_hoisting": round(d["r1-mini fp32 unhoisted skip 0%"] / d["r1-mini fp32 no gates"]
                                              - 1, 4),
        "cpu_1_thread": {
            "decode_cpu_ms": {k: round(1e3 * v, 3) for k, v in c.items()},
            "decode_cpu_ms_spread": {k: [round(1e3 * min(v), 3), round(1e3 * max(v), 3)] for k, v in cpu.items()},
            "int8_decode_speedup": {m: round(c[f"{m} fp32" + (" skip 0%" if m == "r1-mini" else "")] /
                                             c[f"{m} int8" + (" skip 0%" if m == "r1-mini" else "")], 3)
                                    for m in ("v3-mini", "r1-mini")},
            "if_overhead_when_nothing_skipped": round(c["r1-mini fp32 skip 0%"] / c["r1-mini fp32 no gates"] - 1, 4),
            "if_overhead_without_hoisting": round(c["r1-mini fp32 unhoisted skip 0%"] / c["r1-mini fp32 no gates"]
                                                  - 1, 4)},
    }
    # where the decode step's time goes (ONNX Runtime's profiler, 1 thread, shares of one run; onnx_decode_profile.py)
    from onnx_decode_profile import profile

    result["decode_profile_1_thread"] = {label: profile(arts[label], 1, 8) for label in
                                         ("r1-mini fp32", "r1-mini fp32 no gates", "r1-mini int8", "v3-mini int8")}
    try:
        import subprocess

        cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        result["machine"]["cpu"] = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                                         if ln.startswith("Model name")), result["machine"]["cpu"])
    except OSError:
        pass
    out = HERE / "results" / "onnx_export.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, HERE / "results" / "onnx_export.png")
    print(json.dumps({k: v for k, v in result.items() if k != "latency"}, indent=1))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    lat = result["latency"]
    labels = ["v3-mini fp32", "v3-mini int8", "r1-mini fp32 skip 0%", "r1-mini int8 skip 0%"]
    a.bar(range(len(labels)), [lat[k]["decode_ms"] for k in labels], color=["C0", "C1", "C0", "C1"])
    a.set_xticks(range(len(labels)), [k.replace(" skip 0%", "") for k in labels], rotation=15)
    a.set_ylabel("decode ms / token (batch 1, 128-token cache)")
    a.set_title("ONNX Runtime CPU: fp32 vs int8")
    curve = result["r1_skip_curve_decode_ms"]
    xs = [float(x) for x in curve]
    b.plot([100 * x for x in xs], list(curve.values()), "o-", label="R1 with If gates")
    b.axhline(lat["r1-mini fp32 no gates"]["decode_ms"], color="gray", ls="--", label="same weights, no gates")
    b.set_xlabel("gated layers skipped (%)")
    b.set_ylabel("decode ms / token")
    b.set_title("r1-mini: decode latency vs layers skipped")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
