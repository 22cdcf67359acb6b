"""`fleet check`: reach every device — host key, login, the remote `edgekit --version` — and read its
identity (uname, Jetson device-tree model, L4T release, nvpmodel, nvidia-smi's GPU, memory) with the same
code that describes the local machine (edgekit.device), matched against the profile fleet.toml expects."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from edgekit.fleet.config import Device, load
from edgekit.fleet.run import _Context, _error, _gather, _parallel, _remote_error, run_interruptible
from edgekit.fleet.ssh import asyncssh_module

PROBE = r"""
echo @@arch; uname -m
echo @@model; cat /proc/device-tree/model 2>/dev/null | tr -d '\000'; echo
echo @@l4t; head -n 1 /etc/nv_tegra_release 2>/dev/null
echo @@nvpmodel; nvpmodel -q 2>/dev/null
echo @@meminfo; grep MemTotal /proc/meminfo 2>/dev/null
echo @@gpu; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1
"""


def identity(probe: str) -> dict:
    """What PROBE printed, read by the same code that describes the local machine (edgekit.device)."""
    import tempfile

    from edgekit import device as local

    parts: dict[str, str] = {}
    for block in probe.split("@@")[1:]:
        key, _, body = block.partition("\n")
        parts[key.strip()] = body.strip()
    with tempfile.TemporaryDirectory(prefix="edgekit-fleet-") as td:
        root = Path(td)
        for rel, key in (("proc/device-tree/model", "model"), ("etc/nv_tegra_release", "l4t"),
                         ("proc/meminfo", "meminfo")):
            if parts.get(key):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text(parts[key] + "\n")
        recorded = {"nvpmodel": parts.get("nvpmodel") or None}
        info = {"machine": parts.get("arch") or None, "memory_gib": local.mem_total_gib(root),
                "jetson": local.jetson_info(root, lambda argv: recorded.get(argv[0])), "cuda": None}
    gpu = [w.strip() for w in parts.get("gpu", "").split(",")]
    if len(gpu) == 2 and gpu[0]:
        with contextlib.suppress(ValueError):
            info["cuda"] = {"name": gpu[0], "memory_gib": round(float(gpu[1]) / 1024, 2)}
    info["profile"], info["profile_from"] = local.match_profile(info)
    return info


async def _check_device(ctx: _Context, device: Device, sem: asyncio.Semaphore) -> dict:
    result = {"device": device.name, "address": device.address, "expected_profile": device.profile,
              "status": "failed", "error": None, "host_key": None, "edgekit": None, "identity": None, "problems": [],
              "notes": []}
    async with sem:
        s = None
        try:
            async def one():
                nonlocal s
                result["host_key"] = "checked"
                s = await ctx.session(device)
                version = await s.run([*device.edgekit_argv, "--version"])
                if version.rc == 127:
                    raise _remote_error(device, "--version", version)
                words = version.stdout.split()
                result["edgekit"] = words[-1] if version.rc == 0 and words else None
                if result["edgekit"] is None:  # an edgekit without --version still runs bundles: a note
                    result["notes"].append(f"the remote edgekit gave no version ({version.last_line()})")
                result["identity"] = identity((await s.run(["sh", "-c", PROBE])).stdout)

            try:
                await asyncio.wait_for(one(), device.connect_timeout + 60)
            finally:
                if s is not None:
                    await s.close()
        except asyncio.TimeoutError:
            result["error"] = "timed out"
            return result
        except Exception as e:
            result["error"] = _error(e)
            return result
    found = result["identity"]["profile"]
    if device.profile and found != device.profile:
        result["problems"].append(f"expected {device.profile}, the device looks like {found or 'no known profile'} "
                                  f"({result['identity']['profile_from']})")
    result["status"] = "ok" if not result["problems"] else "mismatch"
    return result


async def check_async(hosts: str | Path, devices: list[str] | None = None, parallel: int = 8,
                      accept_new_host_keys: bool = False) -> dict:
    fleet = load(hosts)
    chosen = fleet.select(devices)
    sem = _parallel(parallel)
    asyncssh_module()
    ctx = _Context(fleet, accept_new_host_keys, asyncio.Lock())
    results, interrupted = await _gather({d.name: _check_device(ctx, d, sem) for d in chosen},
                                         lambda name: {"device": name, "status": "cancelled", "error": "interrupted"})
    return {"fleet": str(fleet.path), "known_hosts": str(fleet.known_hosts), "interrupted": interrupted,
            "devices": results, "ok": sum(r["status"] == "ok" for r in results)}


def check(*args, **kwargs) -> dict:
    """Reach every device: host key, login, remote edgekit version, identity against its expected profile."""
    return run_interruptible(check_async(*args, **kwargs))
