"""Target-device profiles: one TOML file per device in this directory, plus `host` (built at run time).

Adding a device is adding one file. Every file is validated when loaded: unknown or missing fields,
wrong types, a number without a source, a derived field that does not exist, or a precision the
hardware cannot run are each a one-line EdgekitError naming the file and the field.

Units: memory capacities in GiB (marketed "GB" of HBM/GDDR/LPDDR are binary: an A100 40GB has
40 GiB); bandwidth in decimal GB/s; throughput in dense (non-sparse) TFLOPS / TOPS.
"""

from __future__ import annotations

import re
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import cache
from pathlib import Path

from edgekit.errors import EdgekitError, unknown_name
from edgekit.versions import version_tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

DIR = Path(__file__).parent
KINDS = ("gpu", "jetson", "cpu")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
RUNTIMES = ("torch", "onnxruntime", "tensorrt")
STACK_KEYS = ("jetpack", "cuda", "tensorrt")
# which throughput field a precision's matmuls run at (int4 is weight-only: W4A16 computes in fp16)
THROUGHPUT_FIELD = {"fp32": "fp32_tflops", "fp16": "fp16_tflops", "bf16": "fp16_tflops",
                    "int4": "fp16_tflops", "int8": "int8_tops", "fp8": "fp8_tflops"}


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    kind: str  # gpu | jetson | cpu
    arch: str
    memory_gib: float
    reserved_gib: float  # driver, CUDA context, OS: what a model can never use
    bandwidth_gbs: float  # peak (datasheet) or, for host, measured
    fp32_tflops: float
    tensor_cores: bool
    dla: int
    power_modes: list[str]
    precisions: list[str]
    runtimes: list[str]
    sources: list[dict]
    derived: list[str]
    sm: str | None = None  # CUDA compute capability "major.minor"
    sms: int | None = None
    memory_type: str | None = None
    bandwidth_measured_gbs: float | None = None
    fp16_tflops: float | None = None
    fp16_tflops_measured: float | None = None
    fp32_tflops_measured: float | None = None
    int8_tops: float | None = None
    fp8_tflops: float | None = None
    stacks: list[dict] = field(default_factory=list)
    detect: list[str] = field(default_factory=list)
    detect_default: bool = False
    notes: list[str] = field(default_factory=list)
    cores: int | None = None  # host only
    path: str | None = None  # the file it came from (None for host)

    # derived views --------------------------------------------------------------------------
    @property
    def sm_version(self) -> tuple[int, int] | None:
        if self.sm is None:
            return None
        major, minor = self.sm.split(".")
        return int(major), int(minor)

    @property
    def usable_gib(self) -> float:
        return self.memory_gib - self.reserved_gib

    @property
    def tensorrt_versions(self) -> list[str]:
        return [s["tensorrt"] for s in self.stacks if "tensorrt" in s]

    def max_tensorrt(self) -> tuple[int, ...] | None:
        versions = [version_tuple(v) for v in self.tensorrt_versions]
        return max(versions) if versions else None

    def throughput(self, precision: str) -> tuple[float | None, bool]:
        """(dense TFLOPS/TOPS a precision's matmuls run at, measured?) - measured wins over datasheet."""
        f = THROUGHPUT_FIELD[precision]
        measured = getattr(self, f"{f}_measured", None)
        return (measured, True) if measured else (getattr(self, f), False)

    def bandwidth(self) -> tuple[float, bool]:
        """(GB/s, measured?)."""
        if self.bandwidth_measured_gbs:
            return self.bandwidth_measured_gbs, True
        return self.bandwidth_gbs, False

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def why_unsupported(p: Profile, precision: str) -> str | None:
    """Why the hardware (not the file) cannot run `precision`, or None. Shared by validation and plan."""
    if precision not in PRECISIONS:
        return f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})"
    if p.kind == "cpu":
        if precision in ("fp32", "int8"):
            return None
        return f"{precision} on a CPU: edgekit's CPU path is fp32 or dynamic int8 (onnxruntime)"
    sm = p.sm_version or (0, 0)
    where = f"{p.title} is {p.arch} sm_{p.sm.replace('.', '') if p.sm else '?'}"
    if precision == "fp8" and sm < (8, 9):
        return f"FP8 tensor cores need Ada (sm_89), Hopper (sm_90) or newer; {where}"
    if precision == "bf16" and sm < (8, 0):
        return f"bf16 needs Ampere (sm_80) or newer; {where}"
    if precision == "int8" and not (p.tensor_cores and p.int8_tops):
        return f"no int8 tensor-core path: {where}" + ("" if p.tensor_cores else " without tensor cores")
    if precision == "int4":
        trt = p.max_tensorrt()
        if sm < (8, 0) or trt is None or trt < (10,):
            top = f"TensorRT {max(p.tensorrt_versions, key=version_tuple)}" if p.tensorrt_versions else "no TensorRT"
            return f"int4 weight-only (W4A16) needs TensorRT 10+ on Ampere (sm_80) or newer; {where} with {top}"
    if precision in ("fp16", "bf16", "int4") and not p.fp16_tflops:
        return f"no fp16 throughput figure in the profile for {p.title}"
    if precision == "fp8" and not p.fp8_tflops:
        return f"no FP8 throughput figure in the profile for {p.title}"
    return None


# validation ---------------------------------------------------------------------------------
_TYPES = {f.name: f.type for f in fields(Profile)}
_SOURCED = ("sm", "sms", "memory_gib", "reserved_gib", "bandwidth_gbs", "bandwidth_measured_gbs", "fp32_tflops",
            "fp32_tflops_measured", "fp16_tflops", "fp16_tflops_measured", "int8_tops", "fp8_tflops", "dla",
            "power_modes", "stacks", "cores")


def _required() -> list[str]:
    return [f.name for f in fields(Profile) if f.default is MISSING and f.default_factory is MISSING]


def _check_type(where: str, key: str, value) -> object:
    t = _TYPES[key]
    ok = {
        "str": isinstance(value, str), "str | None": isinstance(value, str),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "float | None": isinstance(value, int | float) and not isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "int | None": isinstance(value, int) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list[str]": isinstance(value, list) and all(isinstance(v, str) for v in value),
        "list[dict]": isinstance(value, list) and all(isinstance(v, dict) for v in value),
    }[t]
    if not ok:
        raise EdgekitError(f"{where}: field '{key}' must be {t.replace(' | None', '')}, got {value!r}")
    return float(value) if t.startswith("float") else value


def validate(data: dict, where: str, stem: str | None = None) -> Profile:
    """A Profile from parsed TOML (or the host dict), or an EdgekitError naming `where` and the field."""
    unknown = sorted(set(data) - set(_TYPES) - {"path"})
    if unknown:
        raise EdgekitError(f"{where}: unknown field '{unknown[0]}'", f"known fields: {', '.join(sorted(_TYPES))}")
    for key in _required():
        if key not in data:
            raise EdgekitError(f"{where}: missing field '{key}'")
    values = {k: _check_type(where, k, v) for k, v in data.items() if k != "path"}

    def bad(key: str, why: str) -> EdgekitError:
        return EdgekitError(f"{where}: field '{key}' {why}")

    if stem is not None and values["name"] != stem:
        raise bad("name", f"is '{values['name']}' but the file is {stem}.toml (they must match)")
    if values["kind"] not in KINDS:
        raise bad("kind", f"is '{values['kind']}', not one of {', '.join(KINDS)}")
    if values["kind"] != "cpu":
        if "sm" not in values:
            raise bad("sm", "is required for a GPU or Jetson (compute capability, e.g. \"8.7\")")
        if "fp16_tflops" not in values:
            raise bad("fp16_tflops", "is required for a GPU or Jetson")
    if "sm" in values and not re.fullmatch(r"\d+\.\d+", values["sm"]):
        raise bad("sm", f"must look like \"8.7\", got {values['sm']!r}")
    for key in ("memory_gib", "bandwidth_gbs", "fp32_tflops", "fp16_tflops", "int8_tops", "fp8_tflops",
                "bandwidth_measured_gbs", "fp16_tflops_measured", "fp32_tflops_measured"):
        if key in values and not values[key] > 0:
            raise bad(key, f"must be positive, got {values[key]}")
    if not 0 <= values["reserved_gib"] < values["memory_gib"]:
        raise bad("reserved_gib", f"must be between 0 and memory_gib ({values['memory_gib']}), got "
                                  f"{values['reserved_gib']}")
    if values["dla"] < 0:
        raise bad("dla", "must be 0 or more")
    for key, known in (("precisions", PRECISIONS), ("runtimes", RUNTIMES)):
        if not values[key]:
            raise bad(key, "must not be empty")
        for v in values[key]:
            if v not in known:
                raise bad(key, f"has unknown entry '{v}' (known: {', '.join(known)})")
    for stack in values.get("stacks", []):
        for k, v in stack.items():
            if k not in STACK_KEYS or not isinstance(v, str):
                raise bad("stacks", f"entries take string versions of {', '.join(STACK_KEYS)}; got {k} = {v!r}")
    for pattern in values.get("detect", []):
        try:
            re.compile(pattern)
        except re.error as e:
            raise bad("detect", f"has a bad regular expression {pattern!r}: {e}") from None
    if not values["sources"]:
        raise bad("sources", "must list at least one source")
    covered: set[str] = set()
    for s in values["sources"]:
        if not isinstance(s.get("title"), str) or not isinstance(s.get("fields"), list):
            raise bad("sources", f"entries are {{ title = \"...\", fields = [...] }}; got {s!r}")
        covered.update(s["fields"])
    for key in _SOURCED:
        if key in values and key not in covered:
            raise bad(key, "has no source (name it in a sources entry's fields)")
    for key in values["derived"]:
        if key not in values:
            raise bad("derived", f"names '{key}', which the profile does not have")
    profile = Profile(**values, path=None if stem is None else where)
    for precision in profile.precisions:
        reason = why_unsupported(profile, precision)
        if reason:
            raise bad("precisions", f"lists {precision}, which this hardware cannot run: {reason}")
    return profile


# loading ------------------------------------------------------------------------------------
def names() -> list[str]:
    """Every profile name: the TOML files plus 'host'."""
    return sorted([p.stem for p in DIR.glob("*.toml")] + ["host"])


def load_file(path: str | Path) -> Profile:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise EdgekitError(f"cannot read profile {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise EdgekitError(f"{path}: not valid TOML: {e}") from None
    return validate(data, str(path), stem=path.stem)


@cache
def _load_cached(name: str) -> Profile:
    return load_file(DIR / f"{name}.toml")


def load(name: str, refresh_host: bool = False) -> Profile:
    """The profile called `name` ('host' is measured on this machine, once, then cached)."""
    if name == "host":
        from profiles.host import host_profile

        return host_profile(refresh=refresh_host)
    if not (DIR / f"{name}.toml").is_file():
        raise unknown_name("device", name, names())
    return _load_cached(name)


def all_profiles(include_host: bool = False) -> list[Profile]:
    """Every TOML profile (validated), optionally followed by the host."""
    out = [load(p.stem) for p in sorted(DIR.glob("*.toml"))]
    return out + [load("host")] if include_host else out


# detection ----------------------------------------------------------------------------------
def _normalise(name: str) -> str:
    return " ".join(re.sub(r"[-_/,()]+", " ", name.lower()).split())


def match(name: str, memory_gb: float | None = None) -> str | None:
    """The profile for a detected device name, or None when unknown or ambiguous.

    `name` is what the system reports: nvidia-smi / torch.cuda.get_device_name ("NVIDIA A100-SXM4-40GB",
    "Orin") or a Jetson's /proc/device-tree/model ("NVIDIA Jetson AGX Orin Developer Kit"). Profiles
    whose `detect` patterns match are the candidates; memory (the argument, else an "NNGB" in the name)
    picks the one with the nearest memory_gib. With no memory to go on, a single candidate, or the one
    marked detect_default (the developer kit), is returned; otherwise None rather than a guess.
    """
    text = _normalise(name)
    candidates = [p for p in all_profiles() if any(re.search(pat, text) for pat in p.detect)]
    if not candidates:
        return None
    if memory_gb is None:
        m = re.search(r"\b(\d+) ?gb\b", text)
        memory_gb = float(m.group(1)) if m else None
    if memory_gb is None:
        if len(candidates) == 1:
            return candidates[0].name
        defaults = [p for p in candidates if p.detect_default]
        return defaults[0].name if len(defaults) == 1 else None
    best = min(abs(p.memory_gib - memory_gb) for p in candidates)
    nearest = [p for p in candidates if abs(p.memory_gib - memory_gb) == best]
    if len(nearest) != 1 or best > 0.35 * nearest[0].memory_gib:
        return None
    return nearest[0].name
