"""Memory of a profile: this process's resident memory over the measurement (baseline before the
model is loaded, peak, peak over baseline) and, for torch on CUDA, torch's allocator peaks.

The peak is the kernel's high-water mark (ru_maxrss) when the profile raised it; when the process had
peaked higher before the profile, ru_maxrss cannot tell, and the peak is a sampling thread's maximum."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path


def process_rss() -> Callable[[], int]:
    """rss() -> this process's resident bytes now."""
    import psutil

    proc = psutil.Process()
    return lambda: proc.memory_info().rss


def process_maxrss() -> int:
    """The kernel's high-water mark of this process's resident memory, in bytes."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # Linux reports kB


class RssMonitor:
    """Peak resident memory over a `with` block.

    `rss()` (current bytes) and `maxrss()` (high-water mark in bytes) default to this process's;
    `interval_s` is the sampling thread's period, None for no thread (then `sample()` by hand)."""

    def __init__(self, interval_s: float | None = 0.01, rss: Callable[[], int] | None = None,
                 maxrss: Callable[[], int] | None = None):
        self.rss = rss or process_rss()
        self.maxrss = maxrss or process_maxrss
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> None:
        self.sampled = max(self.sampled, self.rss())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssMonitor:
        self.baseline = self.rss()
        self.sampled = self.baseline
        self.ru_before = self.maxrss()
        if self.interval_s:
            self._thread = threading.Thread(target=self._loop, name="edgekit-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
        self.sample()
        self.ru_after = self.maxrss()

    def result(self) -> dict:
        if self.ru_after > self.ru_before:
            peak, how = self.ru_after, "ru_maxrss: the kernel's high-water mark, raised during the profile"
        else:
            every = f"every {self.interval_s * 1e3:g} ms" if self.interval_s else "at the start and the end"
            peak, how = self.sampled, (f"sampled {every} (this process had peaked higher before the "
                                       "profile, so ru_maxrss cannot tell)")
        return {"baseline_rss_bytes": self.baseline, "peak_rss_bytes": peak,
                "peak_rss_delta_bytes": max(0, peak - self.baseline), "peak_from": how}


def cuda_reset(runner) -> dict | None:
    """Reset torch's CUDA peak counters when `runner` runs torch on CUDA; None otherwise."""
    dev = str(getattr(runner, "options", {}).get("device") or "")
    if not dev.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    return {"cuda_allocated_before_bytes": torch.cuda.memory_allocated()}


def cuda_peak(before: dict | None) -> dict | None:
    if before is None:
        return None
    import torch

    return {**before, "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated(),
            "cuda_max_reserved_bytes": torch.cuda.max_memory_reserved()}


def dir_bytes(path: Path | None) -> int | None:
    if path is None:
        return None
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
