"""The `host` profile: this machine, built at run time.

Cores, RAM and CPU model come from the OS (psutil); memory bandwidth and fp32 matmul throughput are
*measured* (about a second, numpy only) and cached as JSON in $XDG_CACHE_HOME/edgekit/host.json
(default ~/.cache/edgekit/host.json), keyed by CPU model and core count, so they are measured once
per machine. `host_profile(refresh=True)` measures again.

Bandwidth follows the STREAM "copy" convention: 2 x bytes copied / time (one read, one write), split
over one thread per core (numpy releases the GIL while copying), best of several runs. That is what
batch-1 decode is bound by on a CPU. Matmul throughput is a square fp32 GEMM, best of several runs.
"""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from profiles import Profile, validate

COPY_MIB = 128  # per array, at least; 8 MiB per thread on many-core machines: beyond the last-level cache
GEMM_N = 1024  # 2.1 GFLOP per run
RUNS = 5
PROCESS_GIB = 0.5  # the edgekit process itself: Python, torch and onnxruntime libraries (typical RSS)


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgekit" / "host.json"


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo, macOS sysctl), else platform's best guess."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        import subprocess

        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or psutil.cpu_count() or os.cpu_count() or 1


def _best(fn, runs: int = RUNS) -> float:
    fn()  # warm-up: page faults, thread pool start
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth_gbs(threads: int, mib: int | None = None, runs: int = RUNS) -> float:
    """STREAM-copy bandwidth in GB/s: 2 x bytes / best time, one slice per thread."""
    import numpy as np

    mib = mib or max(COPY_MIB, 8 * threads)
    src = np.ones(mib * 2**20 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1, dtype=np.int64)
    slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        def copy() -> None:
            list(pool.map(lambda s: np.copyto(dst[s], src[s]), slices))

        seconds = _best(copy, runs)
    return 2 * src.nbytes / seconds / 1e9


def measure_matmul_tflops(n: int = GEMM_N, runs: int = RUNS) -> float:
    """Square fp32 GEMM throughput in TFLOPS (numpy's BLAS, all its threads)."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    seconds = _best(lambda: a @ b, runs)
    return 2 * n**3 / seconds / 1e12


def measure(cores: int) -> dict:
    t0 = time.perf_counter()
    bandwidth = measure_bandwidth_gbs(threads=cores)
    tflops = measure_matmul_tflops()
    return {"bandwidth_gbs": round(bandwidth, 2), "fp32_tflops": round(tflops, 4),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t0, 2),
            "method": f"numpy STREAM copy {max(COPY_MIB, 8 * cores)} MiB x {cores} threads; "
                      f"fp32 GEMM {GEMM_N}^3; best of {RUNS}"}


def _measurement(key: str, cores: int, refresh: bool) -> dict:
    path = cache_path()
    try:
        cached = json.loads(path.read_text())
        cached = cached if isinstance(cached, dict) else {}
    except (OSError, json.JSONDecodeError):
        cached = {}
    entry = cached.get(key)
    if refresh or not isinstance(entry, dict) or not {"bandwidth_gbs", "fp32_tflops"} <= set(entry):
        entry = measure(cores)
        cached[key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cached, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home still gets a profile; it is just measured again next time
    return entry


def host_profile(refresh: bool = False) -> Profile:
    """This machine as a Profile (kind "cpu"): measured bandwidth and matmul throughput, RAM from psutil.

    reserved_gib is what other processes use right now (total - available) plus the edgekit process
    itself, so the fit check is against the memory actually free.
    """
    import psutil

    model, cores = cpu_model(), _cores()
    m = _measurement(f"{model} | {cores} cores", cores, refresh)
    vm = psutil.virtual_memory()
    total_gib = vm.total / 2**30
    measured = f"measured on this machine by profiles.host ({m['method']}) at {m['measured_at']}"
    data = {
        "name": "host", "title": f"this machine: {model}, {cores} cores", "kind": "cpu",
        "arch": platform.machine() or "unknown", "cores": cores,
        "memory_gib": round(total_gib, 2), "memory_type": "system RAM",
        "reserved_gib": round(min(max(total_gib - vm.available / 2**30, 0.0) + PROCESS_GIB, total_gib * 0.99), 2),
        "bandwidth_gbs": m["bandwidth_gbs"], "bandwidth_measured_gbs": m["bandwidth_gbs"],
        "fp32_tflops": m["fp32_tflops"], "fp32_tflops_measured": m["fp32_tflops"],
        # dynamic int8 (onnxruntime) dequantizes per matmul: planned no faster than the measured fp32 GEMM
        "int8_tops": m["fp32_tflops"],
        "tensor_cores": False, "dla": 0, "power_modes": ["as configured by the OS"],
        "precisions": ["fp32", "int8"], "runtimes": ["torch", "onnxruntime"],
        "notes": [f"measurement cached in {cache_path()}; refresh with profiles.host.host_profile(refresh=True)"],
        "sources": [
            {"title": measured, "fields": ["bandwidth_gbs", "bandwidth_measured_gbs", "fp32_tflops",
                                           "fp32_tflops_measured", "int8_tops"]},
            {"title": "psutil (total and available RAM, physical cores) and /proc/cpuinfo",
             "fields": ["memory_gib", "cores", "dla", "power_modes"]},
            {"title": f"derived: total - available RAM (psutil) + {PROCESS_GIB} GiB for the edgekit process",
             "fields": ["reserved_gib"]},
        ],
        "derived": ["int8_tops", "reserved_gib"],
    }
    return validate(data, "host profile")
