"""Power telemetry for energy per token: only where the device reports power, nothing invented elsewhere.

Sources (DESIGN.md, "Jetson telemetry"):

- NVML (pynvml, imported lazily) on data-centre / desktop GPUs: the total-energy counter (Volta and
  newer), else power samples. NVML's power queries return NOT_SUPPORTED on Jetson (Orin), so it is
  never used there.
- Jetson INA3221 power monitors through hwmon (JetPack 5+: .../hwmon/hwmonN/inK_label, inK_input mV,
  currK_input mA) or the older ina3221x iio files (JetPack 4: rail_name_K, in_powerK_input mW).
- Jetson `tegrastats` lines: the power rails at the end of each line, in every format seen in the
  wild (tests/data/tegrastats/ has recorded lines with their sources):
      Nano (JetPack 4)          POM_5V_IN 4520/4680 POM_5V_GPU 0/0 POM_5V_CPU 1078/1205
      TX2 / Xavier NX (JP 4)    VDD_IN 2003/2658 VDD_CPU 320/518 ...          (mW, current/average)
      AGX Xavier (JP 4)         GPU 0/0 CPU 216/216 SOC 864/864 CV 0/0 VDDRQ 144/144 SYS5V 1889/1889
      Orin (JetPack 5/6)        VDD_IN 4915mW/4915mW VDD_CPU_GPU_CV 449mW/449mW VDD_SOC 1431mW/1431mW
      AGX Orin (JetPack 5/6)    VDD_GPU_SOC 2801mW/2801mW VDD_CPU_CV 400mW/400mW VIN_SYS_5V0 ... VDDQ_VDD2_1V8AO ...
      AGX Orin (JetPack 7)      VDD_GPU_SOC 5139mW/5139mW/5139mW ...           (current/average/max)

Board total: the input rail where the module has one (VDD_IN, or POM_5V_IN on the Nano); otherwise
(AGX Xavier, AGX Orin) the sum of every monitored rail, as jetson-stats (jtop) and energymon do. Those
rails cover the module, not the carrier board; reports name the rails they used.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

INPUT_RAILS = ("VDD_IN", "POM_5V_IN")

# NAME current[mW]/average[mW][/max[mW]] followed by a space or the end (RAM 4722/7844MB does not match)
_RAIL = re.compile(r"(?<![\w@])([A-Z0-9][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?:/(\d+)(?:mW)?)?(?=\s|$)")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%")


def board_total(rails: dict[str, float]) -> tuple[float | None, str]:
    """(total mW, how) from rail name -> mW."""
    for name in INPUT_RAILS:
        if name in rails:
            return rails[name], name
    if not rails:
        return None, "no power rails"
    return sum(rails.values()), "sum of " + "+".join(rails)


def parse_tegrastats(line: str) -> dict:
    """One tegrastats line -> {"rails": {name: mW now}, "rails_avg": {...}, "total_mw", "total_from",
    "ram_used_mb", "ram_total_mb", "gpu_load_pct"}; fields the line lacks are absent or None."""
    rails, avg = {}, {}
    for name, now, mean, _peak in _RAIL.findall(line):
        rails[name], avg[name] = float(now), float(mean)
    total, how = board_total(rails)
    out: dict = {"rails": rails, "rails_avg": avg, "total_mw": total, "total_from": how}
    if m := _RAM.search(line):
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    if m := _GR3D.search(line):
        out["gpu_load_pct"] = int(m.group(1))
    return out


# INA3221 ----------------------------------------------------------------------------------------------
def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def ina3221_channels(root: str | Path = "/") -> dict[str, dict[str, Path]]:
    """Rail name -> files to read, for every INA3221 the kernel exposes under `root`.

    hwmon (JetPack 5+): {"mv": inK_input, "ma": currK_input}; iio (JetPack 4): {"mw": in_powerK_input}.
    Channels labelled NC (not connected) and the "sum of shunt voltages" channel (7) are skipped.
    """
    root = Path(root)
    found: dict[str, dict[str, Path]] = {}
    for hw in sorted((root / "sys/class/hwmon").glob("hwmon*")):
        if "ina3221" not in (_read(hw / "name") or ""):
            continue
        for label in sorted(hw.glob("in*_label")):
            k = label.name[2:].split("_")[0]
            name = _read(label) or ""
            if not k.isdigit() or k == "7" or not name or "NC" in name.split() or "sum of shunt" in name.lower():
                continue
            found[name] = {"mv": hw / f"in{k}_input", "ma": hw / f"curr{k}_input"}
    for dev in sorted((root / "sys/bus/i2c/drivers/ina3221x").glob("*/iio:device*")):
        for label in sorted(dev.glob("rail_name_*")):
            k = label.name.rsplit("_", 1)[1]
            name = _read(label)
            if name and name not in found:
                found[name] = {"mw": dev / f"in_power{k}_input"}
    return found


def read_ina3221(channels: dict[str, dict[str, Path]]) -> dict[str, float]:
    """Rail name -> mW now (unreadable channels are left out)."""
    out = {}
    for name, files in channels.items():
        try:
            if "mw" in files:
                out[name] = float(_read(files["mw"]).split()[0])
            else:
                out[name] = float(_read(files["mv"]).split()[0]) * float(_read(files["ma"]).split()[0]) / 1000.0
        except (AttributeError, ValueError, IndexError):
            continue
    return out


# meters -----------------------------------------------------------------------------------------------
class PowerMeter:
    """start() ... stop() -> {"joules", "seconds", "mean_power_w", "samples", "source", "rails"}."""

    source = "none"
    interval_s = 0.02

    def __init__(self):
        self._samples: list[tuple[float, float]] = []  # (time, watts)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rails: str = ""

    def sample_w(self) -> float | None:
        raise NotImplementedError

    def _loop(self) -> None:
        while not self._stop.is_set():
            w = self.sample_w()
            if w is not None:
                self._samples.append((time.perf_counter(), w))
            self._stop.wait(self.interval_s)

    def start(self) -> PowerMeter:
        self._samples.clear()
        self._stop.clear()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name=f"edgekit-{self.source}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict | None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return integrate(self._samples, self._t0, time.perf_counter(), self.source, self.rails)


def integrate(samples: list[tuple[float, float]], t0: float, t1: float, source: str, rails: str = "") -> dict | None:
    """Energy over [t0, t1] from (time, watts) samples: trapezoids between samples, the first and last
    sample held to the ends. None without samples (nothing measured: nothing reported)."""
    pts = sorted((t, w) for t, w in samples if t0 <= t <= t1) or sorted(samples)[-1:]
    if not pts or t1 <= t0:
        return None
    joules = pts[0][1] * (pts[0][0] - t0) + pts[-1][1] * (t1 - pts[-1][0])
    for (ta, wa), (tb, wb) in zip(pts, pts[1:]):
        joules += 0.5 * (wa + wb) * (tb - ta)
    seconds = t1 - t0
    return {"joules": joules, "seconds": seconds, "mean_power_w": joules / seconds, "samples": len(pts),
            "source": source, **({"rails": rails} if rails else {})}


class Ina3221Meter(PowerMeter):
    source = "ina3221"

    def __init__(self, channels: dict[str, dict[str, Path]]):
        super().__init__()
        self.channels = channels
        _, self.rails = board_total(read_ina3221(channels))

    def sample_w(self) -> float | None:
        total, _ = board_total(read_ina3221(self.channels))
        return None if total is None else total / 1000.0


class TegrastatsMeter(PowerMeter):
    """Runs `tegrastats --interval MS` and integrates the board total of each line."""

    source = "tegrastats"

    def __init__(self, command: str = "tegrastats", interval_ms: int = 100):
        super().__init__()
        self.command, self.interval_ms = command, interval_ms

    def _loop(self) -> None:
        try:
            proc = subprocess.Popen([self.command, "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
        except OSError:
            return
        self._proc = proc
        try:
            for line in proc.stdout:
                parsed = parse_tegrastats(line)
                if parsed["total_mw"] is not None:
                    self.rails = parsed["total_from"]
                    self._samples.append((time.perf_counter(), parsed["total_mw"] / 1000.0))
                if self._stop.is_set():
                    break
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()

    def stop(self) -> dict | None:
        self._stop.set()
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return integrate(self._samples, self._t0, time.perf_counter(), self.source, self.rails)


class NvmlMeter(PowerMeter):
    """NVML: the total-energy counter (mJ, Volta+) when supported, else power samples (mW)."""

    source = "nvml"

    def __init__(self, index: int = 0):
        super().__init__()
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.rails = f"GPU {index} ({_text(pynvml.nvmlDeviceGetName(self.handle))})"
        try:
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.counter = True
        except pynvml.NVMLError:
            self.counter = False
        pynvml.nvmlDeviceGetPowerUsage(self.handle)  # raises NVMLError where power is not reported

    def sample_w(self) -> float | None:
        try:
            return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0
        except self.nvml.NVMLError:
            return None

    def start(self) -> PowerMeter:
        if self.counter:
            self._t0 = time.perf_counter()
            self._e0 = self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            return self
        return super().start()

    def stop(self) -> dict | None:
        if not self.counter:
            return super().stop()
        joules = (self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) - self._e0) / 1000.0
        seconds = time.perf_counter() - self._t0
        return {"joules": joules, "seconds": seconds, "mean_power_w": joules / seconds if seconds else None,
                "samples": 2, "source": "nvml energy counter", "rails": self.rails}


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def power_meter(device: dict, root: str | Path = "/", gpu_index: int = 0) -> tuple[PowerMeter | None, str]:
    """The meter for this device (from edgekit.device.identify), or (None, why there is none)."""
    if device.get("jetson"):
        channels = ina3221_channels(root)
        if channels and read_ina3221(channels):
            return Ina3221Meter(channels), "INA3221 power monitor (hwmon)"
        exe = shutil.which("tegrastats")
        if exe:
            return TegrastatsMeter(exe), "tegrastats power rails"
        return None, "Jetson without readable INA3221 files or tegrastats: no power reading"
    if device.get("cuda") and device.get("runs_on_gpu"):
        try:
            return NvmlMeter(gpu_index), "NVML"
        except ImportError:
            return None, "pynvml is not installed (pip install 'edgekit[gpu]' for NVML power)"
        except Exception as e:  # NVMLError and friends: the GPU does not report power
            return None, f"NVML reports no power for this GPU ({type(e).__name__}: {e})"
    return None, "this device reports no power to edgekit (CPU host: no RAPL reading); energy is not estimated"
