"""Profile the mini presets on this machine with edgekit.profile (issue 4).

1. Spread: r1-mini decode profiled REPEATS times, each in a fresh process (edgekit.profile.profile_isolated),
   same settings; reports every repeat's decode p50 / tokens/s and their spread (min, median, max, CV).
2. Compare: r1-mini vs v3-mini under identical settings, torch fp32; then int8 (torch-int8 checkpoints from
   `edgekit quantize`, and ONNX Runtime dynamic int8 if both mini ONNX int8 exports are given/found).
   Each table is `edgekit compare` run ROUNDS times (A, B, A, B, ...: the load of a shared machine drifts)
   and reports the median per side.
3. Dynamic batching: r1-mini, a seeded mixed-length workload batched in arrival order vs length-aware
   under a token budget; the measured dynamic/fixed throughput ratio, whatever it is.

Writes bench/results/profile_mini.json and profile_mini.png. The machine is recorded with the results
(CPU, cores, load average before and after: on a shared machine the load is part of the numbers).

    .venv/bin/python bench/profile_mini.py [--quick] [--repeats 5] [--onnx-int8 R1DIR V3DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EDGEKIT_QUIET", "1")

from edgekit import device  # noqa: E402
from edgekit import profiling as prof  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def slim(report: dict) -> dict:
    """A profile report without the raw samples and the repeated device/version block."""
    return {k: v for k, v in report.items() if k not in ("samples", "device")}


def spread(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    return {"values": values, "min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": mean, "cv": statistics.pstdev(values) / mean if mean else None,
            "max_over_min": max(values) / min(values) if min(values) else None}


def compare_rounds(label: str, a: str, b: str, rounds: int, **kwargs) -> dict:
    """`edgekit compare a b` `rounds` times (so A and B alternate: ABAB..., each in a fresh process) and the
    median of each metric per side; every round's numbers are kept."""
    log(f"compare {label}: {rounds} round(s)")
    per_round = []
    try:
        for i in range(rounds):
            log(f"  round {i + 1}/{rounds}")
            per_round.append(prof.compare(a, b, **kwargs))
    except (EdgekitError, KeyError, RuntimeError) as e:  # recorded, not hidden
        log(f"  {label} failed: {type(e).__name__}: {e}")
        return {"label": label, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
    rows = []
    for first in per_round[0]["rows"]:
        got = [next(r for r in rnd["rows"] if r["metric"] == first["metric"]) for rnd in per_round]
        va = [r["a"] for r in got if r["a"] is not None]
        vb = [r["b"] for r in got if r["b"] is not None]
        row = {"metric": first["metric"], "unit": first["unit"], "better": first["better"],
               "a": statistics.median(va) if va else None, "b": statistics.median(vb) if vb else None,
               "a_rounds": va, "b_rounds": vb}
        if row["a"] and row["b"] is not None:
            row["difference_pct"] = 100.0 * (row["b"] - row["a"]) / row["a"]
        rows.append(row)
    return {"label": label, "rounds": rounds, "labels": per_round[0]["labels"], "rows": rows,
            "profiles_round_1": [slim(p) for p in per_round[0]["profiles"]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny presets, few tokens: a smoke test of this script")
    ap.add_argument("--repeats", type=int, default=5, help="repeated r1-mini profiles for the spread")
    ap.add_argument("--rounds", type=int, default=3, help="compare rounds (A and B alternate), medians reported")
    ap.add_argument("--onnx-int8", nargs=2, metavar=("R1DIR", "V3DIR"), default=None,
                    help="mini ONNX int8 exports to compare with onnxruntime (default: /tmp/r1m, /tmp/v3m if both are)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch and onnxruntime (default 1: on an oversubscribed machine torch's "
                         "default threads wait on descheduled OpenMP workers, see the plan-vs-measured section)")
    ap.add_argument("--out", type=Path, default=RESULTS / "profile_mini.json")
    args = ap.parse_args()

    r1, v3 = ("r1-tiny", "v3-tiny") if args.quick else ("r1-mini", "v3-mini")
    settings = dict(prompt_len=16, new_tokens=4, warmup=1, runs=2) if args.quick else \
        dict(prompt_len=64, new_tokens=16, warmup=1, runs=3)
    settings["threads"] = args.threads
    info = device.identify()
    result = {"script": "bench/profile_mini.py", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"cpu": info["cpu"], "memory_gib": info["memory_gib"], "cuda": info["cuda"],
                          "jetson": info["jetson"], "profile": info["profile"], "versions": info["versions"],
                          "load_average_before": os.getloadavg()},
              "settings": {**settings, "models": [r1, v3], "runtime": "torch (fp32 unless stated)"}}
    t0 = time.perf_counter()

    # 1. spread of repeated r1-mini decode profiles, each in a fresh process
    reps = []
    for i in range(args.repeats):
        log(f"spread: {r1} repeat {i + 1}/{args.repeats}")
        r = prof.profile_isolated(r1, "torch", **settings, seed=0)
        reps.append({"decode_ms_p50": r["latency"]["decode_ms_per_token"]["p50"],
                     "decode_ms_p99": r["latency"]["decode_ms_per_token"]["p99"],
                     "decode_tokens_per_s": r["latency"]["decode_tokens_per_s"],
                     "ttft_ms_p50": r["latency"]["ttft_ms"]["p50"],
                     "peak_rss_delta_mib": r["memory"]["peak_rss_delta_bytes"] / 2**20,
                     "fraction_of_roofline": (r["roofline"] or {}).get("fraction_of_roofline"),
                     "skipped_fraction": r["gating"]["skipped_fraction"]})
        if i == 0:
            result["spread_first_report"] = slim(r)
    result["spread"] = {"model": r1, "repeats": reps,
                        **{k: spread([x[k] for x in reps]) for k in ("decode_ms_p50", "decode_tokens_per_s",
                                                                     "ttft_ms_p50", "peak_rss_delta_mib")}}

    # 2. compare tables: fp32, torch int8 (quantized once, then compared as checkpoints), onnxruntime int8
    import tempfile

    from edgekit import api

    rounds = 1 if args.quick else args.rounds
    cmp = dict(rounds=rounds, runtime="torch", **settings)
    result["compare"] = [compare_rounds(f"{r1} vs {v3}, torch fp32", r1, v3, **cmp)]
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-int8-") as tmp:
        log("quantizing both to torch int8 (edgekit quantize)")
        q1, q3 = (api.quantize(m, Path(tmp) / m)["out"] for m in (r1, v3))
        result["compare"].append(compare_rounds(f"{r1} vs {v3}, torch int8 (edgekit quantize)", q1, q3, **cmp))
    onnx = args.onnx_int8 or (["/tmp/r1m", "/tmp/v3m"] if all(Path(p, "manifest.json").is_file()
                                                              for p in ("/tmp/r1m", "/tmp/v3m")) else None)
    if onnx and not args.quick:
        result["compare"].append(compare_rounds(f"{r1} vs {v3}, onnxruntime int8 ({', '.join(onnx)})", onnx[0],
                                                onnx[1], **{**cmp, "runtime": "onnxruntime"}))
    else:
        result["compare"].append({"label": "onnxruntime int8", "error": "skipped: no mini ONNX exports of both "
                                  "models were available (pass --onnx-int8 R1DIR V3DIR)"})

    # 3. dynamic batching
    log(f"dynamic batching: {r1}")
    work_settings = dict(prompt_len=16, new_tokens=4, batch=2, requests=6) if args.quick else \
        dict(prompt_len=64, new_tokens=16, batch=4, requests=16)
    w = prof.profile_isolated(r1, "torch", warmup=0, runs=2, workload="mixed", batching="both", threads=args.threads,
                              **work_settings)
    result["dynamic_batching"] = {"model": r1, **work_settings, "workload": w["workload"],
                                  "dynamic_over_fixed": w["workload"].get("dynamic_over_fixed")}
    result["machine"]["load_average_after"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - t0, 1)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    prof.write_json(result, args.out)
    plot(result, args.out.with_suffix(".png"))
    log(f"wrote {args.out} and {args.out.with_suffix('.png')} in {result['seconds']} s")
    print(json.dumps({"spread_decode_tokens_per_s": result["spread"]["decode_tokens_per_s"],
                      "dynamic_over_fixed": result["dynamic_batching"]["dynamic_over_fixed"]}, indent=1))


def plot(result: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    reps = result["spread"]["repeats"]
    ax1.plot(range(1, len(reps) + 1), [r["decode_tokens_per_s"] for r in reps], "o-")
    ax1.set_xlabel("repeat (fresh process each)")
    ax1.set_ylabel("decode tokens/s")
    s = result["spread"]["decode_tokens_per_s"]
    ax1.set_title(f"{result['spread']['model']}: spread {s['min']:.1f}-{s['max']:.1f} tok/s (CV {100 * s['cv']:.1f}%)")
    ax1.set_ylim(bottom=0)
    rows = [c for c in result["compare"] if c.get("rows")]
    labels, r1v, v3v = [], [], []
    for c in rows:
        by = {r["metric"]: r for r in c["rows"]}
        labels.append(c["label"].split(", ", 1)[1].split(" (")[0])
        r1v.append(by["decode throughput"]["a"])
        v3v.append(by["decode throughput"]["b"])
    x = range(len(labels))
    ax2.bar([i - 0.2 for i in x], r1v, 0.4, label=result["settings"]["models"][0])
    ax2.bar([i + 0.2 for i in x], v3v, 0.4, label=result["settings"]["models"][1])
    ax2.set_xticks(list(x), labels)
    ax2.set_ylabel("decode tokens/s")
    ax2.legend()
    ax2.set_title(f"compare: median of {rows[0]['rounds'] if rows else 0} alternating rounds")
    w = result["dynamic_batching"]["workload"]
    modes = [m for m in ("fixed", "dynamic") if m in w]
    ax3.bar(modes, [w[m]["generated_tokens_per_s"] for m in modes], color=["#4c72b0", "#55a868"])
    ratio = result["dynamic_batching"]["dynamic_over_fixed"]
    ax3.set_title(f"mixed workload, {w['requests']} requests: dynamic/fixed = {ratio:.2f}x")
    ax3.set_ylabel("generated tokens/s")
    cpu = result["machine"]["cpu"]
    fig.suptitle(f"edgekit profile, mini presets on {cpu['model']} ({cpu.get('usable_cores')} usable cores)")
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
