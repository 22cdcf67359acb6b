"""A bundle's device target and this machine: what the target needs (compatibility) and whether this
machine offers it (host_facts, check_machine)."""

from __future__ import annotations

from edgekit.bundle.format import WEIGHT_SUFFIXES
from edgekit.device import host_facts  # the one reader of this machine (edgekit/device.py)
from edgekit.errors import EdgekitError, unknown_name
from edgekit.versions import compatible, version_tuple

GENERIC_CPU = "cpu"  # a target with no profile: any CPU machine; only memory is checked


def _device_profile(device: str):
    """The device's profile (profiles.load: a TOML in profiles/, or 'host'), None for the generic 'cpu'.

    The one place that reads device facts: edgekit.bundle never writes device numbers itself.
    """
    if device == GENERIC_CPU:
        return None
    import profiles

    try:
        return profiles.load(device)  # unknown names: one line with the nearest match
    except EdgekitError as e:
        if e.message.startswith("unknown device"):
            raise unknown_name("device", device, [*profiles.names(), "host", GENERIC_CPU]) from None
        raise


def _weights_bytes(table: dict[str, dict]) -> int:
    return sum(m["size"] for rel, m in table.items() if rel.endswith(WEIGHT_SUFFIXES))


def compatibility(device: str, res, table: dict[str, dict], settings: dict) -> dict:
    """What a machine must offer to run this bundle: from the device profile and `edgekit plan`.

    Minimum memory is plan's estimate (weights + KV cache + activations + the device's reserve) at the
    model's full context, so any prompt the bundle accepts fits; for the generic 'cpu' target (no
    profile) it is the weight bytes, a lower bound.
    """
    profile = _device_profile(device)
    if profile is None:
        return {"device": device, "kind": "cpu", "profile": None, "min_memory_bytes": _weights_bytes(table),
                "min_memory_source": "weight bytes (a lower bound: the generic 'cpu' target has no profile)"}
    from edgekit import plan

    precision = res.manifest.get("precision") or "fp32"
    context = res.cfg.max_seq_len
    if precision not in profile.precisions:
        raise EdgekitError(f"{res.name} is {precision}, which {profile.name} does not run (it runs "
                           f"{', '.join(profile.precisions)})", "package an artifact in one of those precisions "
                           "(export --int8, or export --format tensorrt), or choose another --device")
    row = plan.plan(res.path, profile.name, precision=precision, context=context)["rows"][0]
    if not row["fits"]:
        raise EdgekitError(f"{res.name} ({precision}) does not fit {profile.name}: edgekit plan estimates "
                           f"{row['total_gib']:.2f} GiB at {context} tokens, the device has {profile.memory_gib:g} GiB",
                           "quantize it (edgekit quantize, or export --int8) or choose a larger --device")
    compat = {"device": profile.name, "title": profile.title, "kind": profile.kind, "profile": profile.path or "host",
              "device_memory_bytes": int(profile.memory_gib * 2**30),
              "min_memory_bytes": int(row["total_gib"] * 2**30),
              "min_memory_source": f"edgekit plan estimate ({precision}, {context} tokens, batch 1)"}
    if profile.kind == "jetson":
        compat["arch"] = "aarch64"  # every Jetson runs an aarch64 L4T
    elif profile.kind == "cpu" and profile.arch in ("x86_64", "amd64", "aarch64", "arm64"):
        compat["arch"] = profile.arch
    if profile.sm:
        compat["sm"] = profile.sm
    if profile.tensorrt_versions:
        compat["tensorrt"] = sorted(set(profile.tensorrt_versions), key=version_tuple)
    jetpack = [st["jetpack"] for st in profile.stacks if "jetpack" in st]
    if jetpack:
        compat["jetpack"] = jetpack
    return compat


def check_machine(compat: dict, settings: dict, host: dict | None = None) -> tuple[list[str], list[str]]:
    """(what matches, what does not) for this machine against a bundle's compatibility block.

    Always: memory (GPU memory on a discrete GPU, RAM elsewhere) and CPU arch where the target names
    one. A Jetson target needs a Jetson. A GPU target needs a CUDA GPU of at least the target's SM. A
    TensorRT runtime needs TensorRT in the target's range and exactly the target's SM (engines are
    built per architecture).
    """
    kind = compat.get("kind", "cpu")
    trt = settings.get("runtime") == "tensorrt"
    if host is None:
        host = host_facts(need_gpu=kind == "gpu" or trt, need_tensorrt=trt)
    ok, bad = [], []
    want_arch = compat.get("arch")
    if want_arch:
        arm = {"aarch64", "arm64"}
        arch_ok = host["arch"] in arm if want_arch in arm else host["arch"] == want_arch
        (ok if arch_ok else bad).append(f"CPU {host['arch']} (target {want_arch})")
    if kind == "jetson":
        if host.get("jetson"):
            ok.append("a Jetson")
        else:
            bad.append(f"not a Jetson (no /etc/nv_tegra_release on this {host['arch']} machine)")
    if kind == "gpu" or trt:
        want_sm = compat.get("sm")
        if host.get("sm") is None:
            bad.append("no CUDA GPU visible" + (f" (target SM {want_sm})" if want_sm else ""))
        elif want_sm is not None:
            have, want = version_tuple(host["sm"]), version_tuple(want_sm)
            sm_ok = have == want if trt else have >= want
            (ok if sm_ok else bad).append(f"GPU SM {host['sm']} (target SM {want_sm}{'' if trt else ' or newer'})")
        else:
            ok.append(f"GPU SM {host['sm']}")
    if trt:
        if "tensorrt" not in host:
            bad.append("TensorRT is not installed (JetPack, or pip install 'edgekit[tensorrt]')")
        elif compat.get("tensorrt") and not compatible(host["tensorrt"], compat["tensorrt"]):
            bad.append(f"TensorRT {host['tensorrt']} (target {compat['tensorrt']})")
        else:
            ok.append(f"TensorRT {host['tensorrt']}")
        if kind == "jetson" and compat.get("jetpack") and host.get("jetson"):
            if "jetpack" not in host:
                ok.append("JetPack version not found (nvidia-jetpack package); TensorRT checked instead")
            elif compatible(host["jetpack"], compat["jetpack"]):
                ok.append(f"JetPack {host['jetpack']}")
            else:
                bad.append(f"JetPack {host['jetpack']} (target {', '.join(compat['jetpack'])})")
    need = int(compat.get("min_memory_bytes") or 0)
    gpu_mem = kind == "gpu" and "gpu_memory_bytes" in host
    have = int(host.get("gpu_memory_bytes" if gpu_mem else "memory_bytes", 0))
    (ok if have >= need else bad).append(f"{'GPU memory' if gpu_mem else 'memory'} {_gib(have)} (needs {_gib(need)})")
    return ok, bad


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
