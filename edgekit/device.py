"""What machine are we on: CPU model and cores, memory, CUDA GPU (name, SM, memory), Jetson model
(device tree), L4T release, nvpmodel mode and jetson_clocks state, library versions, and the matching
profile in `profiles/`.

Everything read from the file system goes through `root` and every command through `run`, so tests
point them at recorded contents (tests/data/device/) instead of this machine.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from edgekit.errors import EdgekitError

Run = Callable[[list[str]], "str | None"]

# (implementer, part) -> core name, for ARM CPUs whose /proc/cpuinfo has no "model name"
# (the same table util-linux's lscpu uses)
ARM_PARTS = {(0x41, 0xD07): "Cortex-A57", (0x41, 0xD08): "Cortex-A72", (0x41, 0xD0B): "Cortex-A76",
             (0x41, 0xD0C): "Neoverse-N1", (0x41, 0xD40): "Neoverse-V1", (0x41, 0xD42): "Cortex-A78AE",
             (0x41, 0xD4F): "Neoverse-V2", (0x41, 0xD8E): "Neoverse-N3", (0x4E, 0x004): "NVIDIA Carmel"}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container or taskset may allow fewer)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def check_threads(threads, where: str = "--threads") -> int | None:
    """None, or a thread count between 1 and this machine's usable cores (more only oversubscribes the
    CPU; a huge value crashes the thread pools). `where` names the option or setting in the message."""
    if threads is None:
        return None
    cores = usable_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cores:
        raise EdgekitError(f"{where} {threads!r} is not between 1 and this machine's {cores} usable CPU cores",
                           f"pass --threads 1..{cores}, or leave it out to use the runtime's default")
    return threads


def run_command(argv: list[str], timeout: float = 5.0) -> str | None:
    """stdout of a command, or None if it is missing, fails or hangs (nvpmodel can be slow under load)."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _read(root: Path, rel: str) -> str | None:
    try:
        return (root / rel).read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def cpu_info(root: Path) -> dict:
    """Model and logical core count from /proc/cpuinfo."""
    text = _read(root, "proc/cpuinfo") or ""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    fields: dict[str, str] = {}
    logical = 0
    for block in blocks:
        kv = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}
        if "processor" in kv:
            logical += 1
        for k, v in kv.items():
            fields.setdefault(k, v)
    model = fields.get("model name") or fields.get("Model") or fields.get("Hardware")
    if "CPU implementer" in fields and "CPU part" in fields:
        try:
            core = ARM_PARTS.get((int(fields["CPU implementer"], 16), int(fields["CPU part"], 16)))
        except ValueError:
            core = None
        # arm64 kernels print no model name (some print a generic "ARMv8 Processor rev 1 (v8l)")
        if core and (not model or model.startswith("ARMv8")):
            model = core
    return {"model": model or platform.processor() or "unknown", "logical_cores": logical or None}


def mem_total_gib(root: Path) -> float | None:
    m = re.search(r"^MemTotal:\s+(\d+) kB", _read(root, "proc/meminfo") or "", re.M)
    return round(int(m.group(1)) / 2**20, 2) if m else None


def l4t_release(root: Path) -> str | None:
    """'36.4.3' from /etc/nv_tegra_release ('# R36 (release), REVISION: 4.3, ...')."""
    m = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", _read(root, "etc/nv_tegra_release") or "")
    return f"{m.group(1)}.{m.group(2)}" if m else None


def parse_nvpmodel(text: str | None) -> dict | None:
    """`nvpmodel -q` prints 'NV Power Mode: MAXN' and the mode's number on the next line."""
    if not text:
        return None
    m = re.search(r"NV Power Mode:[ \t]*(\S+)[ \t]*(?:\r?\n\s*(\d+))?", text)
    return {"mode": m.group(1), "id": int(m.group(2)) if m.group(2) else None} if m else None


def parse_jetson_clocks_show(text: str | None) -> str | None:
    """'on' when `jetson_clocks --show` reports every CPU and the GPU pinned (MinFreq == MaxFreq)."""
    if not text:
        return None
    pairs = re.findall(r"^(cpu\d+|GPU)\b.*?MinFreq=(\d+) MaxFreq=(\d+)", text, re.M)
    if not pairs:
        return None
    return "on" if all(lo == hi for _, lo, hi in pairs) else "off"


def jetson_clocks_from_sysfs(root: Path) -> str | None:
    """jetson_clocks pins every online CPU's and the GPU's minimum frequency to its maximum (readable
    without root, unlike `jetson_clocks --show`)."""
    pinned = []
    for cpu in sorted((root / "sys/devices/system/cpu").glob("cpu[0-9]*")):
        lo, hi = _read(cpu, "cpufreq/scaling_min_freq"), _read(cpu, "cpufreq/scaling_max_freq")
        if (_read(cpu, "online") or "1").strip() == "1" and lo and hi:
            pinned.append(lo.strip() == hi.strip())
    for dev in sorted((root / "sys/class/devfreq").glob("*")):
        if re.search(r"gpu|gv11b|ga10b|gb10b|gp10b", dev.name):
            lo, hi = _read(dev, "min_freq"), _read(dev, "max_freq")
            if lo and hi:
                pinned.append(lo.strip() == hi.strip())
    if not pinned:
        return None
    return "on" if all(pinned) else "off"


def jetson_model(root: Path) -> str | None:
    """The device-tree model of a Jetson ('NVIDIA Jetson Orin Nano ...'), None on anything else."""
    raw = _read(root, "proc/device-tree/model")
    model = raw.replace("\x00", "").strip() if raw else ""
    return model if model and re.search(r"jetson|orin|xavier|tegra|p37\d\d", model, re.I) else None


def is_jetson(root: Path) -> bool:
    """A Jetson board: an L4T release file or a Jetson device-tree model."""
    return (root / "etc/nv_tegra_release").exists() or jetson_model(root) is not None


def jetpack_version(run: Run) -> str | None:
    """'6.2' from the nvidia-jetpack package's version ('6.2+b77'), None where it is not installed."""
    text = run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
    return text.strip().split("-")[0].split("+")[0] if text and text.strip() else None


def jetson_info(root: Path, run: Run) -> dict | None:
    model = jetson_model(root)
    if model is None:
        return None
    clocks = parse_jetson_clocks_show(run(["jetson_clocks", "--show"]))
    clocks_from = "jetson_clocks --show"
    if clocks is None:
        clocks, clocks_from = jetson_clocks_from_sysfs(root), "cpufreq/devfreq min == max"
    return {"model": model, "l4t": l4t_release(root), "nvpmodel": parse_nvpmodel(run(["nvpmodel", "-q"])),
            "jetson_clocks": clocks or "unknown", "jetson_clocks_from": clocks_from if clocks else None}


def cuda_info() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(i)
    return {"name": props.name, "sm": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 2), "memory_bytes": props.total_memory,
            "multiprocessors": props.multi_processor_count, "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda}


def versions() -> dict[str, str]:
    import contextlib
    import importlib.metadata as md

    from edgekit.artifact import versions as tool_versions

    out = tool_versions()
    for pkg in ("numpy", "psutil", "pynvml", "nvidia-ml-py", "jetson-stats"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def tensorrt_version() -> str | None:
    """The installed TensorRT Python package's version (any of its wheel names), without importing it."""
    import contextlib
    import importlib.metadata as md

    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-libs"):
        with contextlib.suppress(md.PackageNotFoundError):
            return md.version(dist)
    return None


def host_facts(need_gpu: bool = False, need_tensorrt: bool = False, root: str | Path = "/",
               run: Run | None = None) -> dict:
    """The facts a bundle's compatibility check reads (edgekit.bundle.compat.check_machine): CPU arch, memory in
    bytes, Jetson or not; the GPU's SM and memory and TensorRT / JetPack versions only when asked (probing CUDA
    imports torch). The same readers as `identify`."""
    import psutil

    root, run = Path(root), run or run_command
    facts = {"arch": platform.machine().lower(), "memory_bytes": psutil.virtual_memory().total,
             "jetson": is_jetson(root)}
    cuda = cuda_info() if need_gpu else None
    if cuda:
        facts["sm"], facts["gpu_memory_bytes"] = cuda["sm"], cuda["memory_bytes"]
    if need_tensorrt:
        if facts["jetson"] and (jetpack := jetpack_version(run)):
            facts["jetpack"] = jetpack
        if trt := tensorrt_version():
            facts["tensorrt"] = trt
    return facts


def match_profile(info: dict) -> tuple[str | None, str]:
    """The profiles/ entry for this device: the Jetson (device-tree model + memory), else the CUDA GPU,
    else 'host' (this CPU, measured)."""
    try:
        import profiles
    except ImportError:
        return None, "the profiles package is not installed"
    if info.get("jetson"):
        name = profiles.match(info["jetson"]["model"], info.get("memory_gib"))
        return name, f"Jetson model '{info['jetson']['model']}'" if name else "no profile matches this Jetson"
    if info.get("cuda"):
        c = info["cuda"]
        name = profiles.match(c["name"], c["memory_gib"])
        return name, f"CUDA device '{c['name']}'" if name else f"no profile matches '{c['name']}'"
    return "host", "CPU: the host profile (measured on this machine)"


def identify(root: str | Path = "/", run: Run | None = None, probe_cuda: bool | None = None) -> dict:
    """Describe the machine. With root != "/" (tests), CUDA is not probed unless asked."""
    root = Path(root)
    run = run or run_command
    live = str(root) == "/"
    cpu = cpu_info(root)
    if live:
        import psutil

        cpu["physical_cores"] = psutil.cpu_count(logical=False)
        cpu["logical_cores"] = cpu["logical_cores"] or psutil.cpu_count()
        cpu["usable_cores"] = usable_cores()
    info = {"hostname": platform.node() if live else None, "os": f"{platform.system()} {platform.release()}"
            if live else None, "machine": platform.machine() if live else None, "cpu": cpu,
            "memory_gib": mem_total_gib(root), "jetson": jetson_info(root, run),
            "cuda": cuda_info() if (live if probe_cuda is None else probe_cuda) else None}
    info["profile"], info["profile_from"] = match_profile(info)
    info["versions"] = versions() if live else {}
    return info
