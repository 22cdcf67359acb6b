"""Long-context cost of R1-mini (routed attention) vs V3-mini (dense, segment memory), torch fp32, 1 thread (issue 15).

Per (model, kernel, prompt length) in a fresh subprocess: prefill time of the whole prompt, peak RSS of the
process (and RSS before the prefill: weights + torch), decode ms/token with that context (median of a few
steps), and the (query, key) pairs one head of one layer attends to. R1 kernels (R1.attention_impl), the same
weights and results: "blocks" (per key block, decoding with the RoutedCache: in-place K/V + block summaries, what
the torch session runs), "gather" (per query gather, decoding with a plain torch.cat cache: the previous state),
"dense" (the masked-dense oracle). Random weights (seeded): cost, not quality. Gates open (threshold 0).

    .venv/bin/python bench/long_context.py [--sizes 256,1024,2048,4096] [--r1-kernels blocks,gather]
        [--dense-sizes 256,1024] [--decode 5]

Writes bench/results/long_context.json and long_context.png; records the machine and /proc/loadavg.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "n/a"


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(model_name: str, impl: str, n: int, decode: int) -> dict:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    from edgekit.models import build
    from edgekit.models.r1 import attended_keys

    model = build(model_name, seed=0)
    cfg = model.cfg
    if cfg.family == "r1":
        model.attention_impl = impl
    thr = torch.zeros(cfg.n_layers)
    ids = torch.randint(0, 256, (1, n + decode), generator=torch.Generator().manual_seed(0))
    before = rss_mib()
    past = model.new_cache(1) if cfg.family == "r1" and impl == "blocks" else None
    with torch.inference_mode():
        t0 = time.perf_counter()
        _, past, _ = model(ids[:, :n], past, thr)
        prefill = time.perf_counter() - t0
        steps = []
        for t in range(n, n + decode):
            t0 = time.perf_counter()
            _, past, _ = model(ids[:, t : t + 1], past, thr)
            steps.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cfg.family == "r1":
        attended = attended_keys(cfg, n)
    else:
        m = cfg.memory_len or n
        attended = sum(min(i, m) + 1 for i in range(n))
    return {
        "model": model_name,
        "kernel": impl if cfg.family == "r1" else "dense",
        "prompt_tokens": n,
        "prefill_s": prefill,
        "prefill_ms_per_token": 1e3 * prefill / n,
        "decode_ms_per_token": 1e3 * statistics.median(steps),
        "decode_steps": len(steps),
        "rss_before_prefill_mib": before,
        "peak_rss_mib": peak,
        "attended_pairs_per_head_layer": attended,
        "dense_pairs": n * (n + 1) // 2,
    }


def run_one(model: str, impl: str, n: int, decode: int, timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", EDGEKIT_QUIET="1")
    cmd = [sys.executable, __file__, "--child", model, impl, str(n), "--decode", str(decode)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"model": model, "kernel": impl, "prompt_tokens": n, "error": f"timeout after {timeout:.0f} s"}
    if out.returncode:
        return {"model": model, "kernel": impl, "prompt_tokens": n, "error": out.stderr.strip()[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = {}
    for r in rows:
        if "error" not in r:
            series.setdefault(f"{r['model']} ({r['kernel']})", []).append(r)
    for label, rs in series.items():
        rs.sort(key=lambda r: r["prompt_tokens"])
        x = [r["prompt_tokens"] for r in rs]
        axes[0].plot(x, [r["prefill_ms_per_token"] for r in rs], "o-", label=label)
        axes[1].plot(x, [r["peak_rss_mib"] for r in rs], "o-", label=label)
        axes[2].plot(x, [r["decode_ms_per_token"] for r in rs], "o-", label=label)
    for ax, title in zip(axes, ["prefill ms / prompt token", "peak RSS (MiB)", "decode ms / token at that context"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("R1-mini routed (blocks / gather) vs masked-dense oracle vs V3-mini, torch fp32, 1 thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def ratios(rows: list[dict]) -> dict:
    def get(model, kernel, n, key):
        for r in rows:
            if (r["model"], r["kernel"], r["prompt_tokens"]) == (model, kernel, n) and "error" not in r:
                return r[key]
        return None

    out = {}
    for kernel in ("blocks", "gather"):
        r1_4k, v3_4k = get("r1-mini", kernel, 4096, "peak_rss_mib"), get("v3-mini", "dense", 4096, "peak_rss_mib")
        if r1_4k and v3_4k:
            out[f"{kernel}: r1_vs_v3_peak_rss_at_4096 (target <= 0.6)"] = r1_4k / v3_4k
        key = "prefill_ms_per_token"
        a, b = get("r1-mini", kernel, 1024, key), get("r1-mini", kernel, 4096, key)
        if a and b:
            out[f"{kernel}: r1_prefill_per_token_4096_vs_1024 (target <= 1.5)"] = b / a
        a, b = get("r1-mini", kernel, 256, "decode_ms_per_token"), get("r1-mini", kernel, 4096, "decode_ms_per_token")
        if a and b:
            out[f"{kernel}: r1_decode_4096_vs_256 (target <= 1.25)"] = b / a
    a, b = get("r1-mini", "gather", 4096, "prefill_s"), get("r1-mini", "blocks", 4096, "prefill_s")
    if a and b:
        out["r1 prefill at 4096, gather / blocks (same run)"] = a / b
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "KERNEL", "N"))
    ap.add_argument("--sizes", default="256,1024,2048,4096")
    ap.add_argument("--dense-sizes", default="256,1024", help="prompt lengths for R1's masked-dense oracle (slow)")
    ap.add_argument("--r1-kernels", default="blocks,gather", help="R1 kernels to run at every size")
    ap.add_argument("--decode", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=400)
    args = ap.parse_args()
    if args.child:
        model, impl, n = args.child
        print(json.dumps(child(model, impl, int(n), args.decode)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    dense_sizes = [int(s) for s in args.dense_sizes.split(",") if s]
    plan = [("r1-mini", k, n) for n in sizes for k in args.r1_kernels.split(",")]
    plan += [("v3-mini", "dense", n) for n in sizes]
    plan += [("r1-mini", "dense", n) for n in dense_sizes]
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_before": loadavg(),
    }
    try:
        machine["cpu"] = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    import torch

    machine["torch"] = torch.__version__
    rows = []
    for model, impl, n in plan:
        t0 = time.time()
        r = run_one(model, impl, n, args.decode, args.timeout)
        r["loadavg_after"] = loadavg()
        rows.append(r)
        print(
            f"{model:8s} {impl:6s} {n:5d}: "
            + (
                r.get("error")
                or f"prefill {r['prefill_s']:.1f} s, "
                f"peak {r['peak_rss_mib']:.0f} MiB, decode {r['decode_ms_per_token']:.1f} ms"
            )
            + f" ({time.time() - t0:.0f} s)",
            flush=True,
        )
    machine["loadavg_after"] = loadavg()
    result = {
        "what": __doc__.strip().splitlines()[0],
        "settings": {
            "dtype": "fp32",
            "threads": 1,
            "batch": 1,
            "thresholds": 0.0,
            "decode_steps": args.decode,
            "weights": "random, seed 0",
        },
        "machine": machine,
        "rows": rows,
        "ratios": ratios(rows),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "long_context.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, RESULTS / "long_context.png")
    print(json.dumps(result["ratios"], indent=1))


if __name__ == "__main__":
    main()
