"""`fleet profile`: every device in parallel, one asyncio task each, at most N at a time
(an asyncio.Semaphore; no scheduler of our own). One device's failure is recorded with its error and
never stops the others; Ctrl-C cancels every task, and each stops its remote command and cleans its run
directory before the function returns what finished.

On the device, fleet touches only its work directory:

    WORKDIR/bundle.tar.gz       the bundle, kept between runs: copied again only when its sha256 differs
    WORKDIR/cache/              XDG_CACHE_HOME of the remote edgekit (its measured host bandwidth), kept
    WORKDIR/run-ID/             this run: install/, report.json, tmp/ (TMPDIR) — removed at the end, also
                                after a failure, a timeout or Ctrl-C (with --purge the whole WORKDIR goes)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fleet.config import Device, Fleet, load
from edgekit.fleet.ssh import Completed, Dropped, Session, asyncssh_module, is_dropped

REMOTE_BUNDLE = "bundle.tar.gz"
SUMMARY = "fleet.json"
DEVICES = "devices"
BUNDLE_DIR = "bundle"  # bundle.json and config.json of the profiled bundle, for plan's estimate in the report
FLEET_FORMAT = 1
CLEAN_TIMEOUT = 20.0


@dataclass(frozen=True)
class ProfileOptions:
    """The `edgekit profile` options passed to every device (None: the bundle's own setting or profile's)."""

    prompt_len: int = 64
    new_tokens: int = 32
    batch: int = 1
    warmup: int = 1
    runs: int = 5
    threshold: float | None = None
    runtime: str | None = None
    provider: str | None = None
    threads: int | None = None
    energy: bool = True

    def argv(self, settings: dict) -> list[str]:
        out = ["--prompt-len", str(self.prompt_len), "--new-tokens", str(self.new_tokens), "--batch",
               str(self.batch), "--warmup", str(self.warmup), "--runs", str(self.runs)]
        # the bundle's runtime, threads and threshold unless overridden: profile it as it would run
        for flag, value in (("--runtime", self.runtime or settings.get("runtime")),
                            ("--threads", self.threads or settings.get("threads")),
                            ("--threshold", self.threshold if self.threshold is not None
                             else settings.get("threshold")),
                            ("--provider", self.provider)):
            if value is not None:
                out += [flag, str(value)]
        return out + ([] if self.energy else ["--no-energy"])


# ------------------------------------------------------------------------------------------------
# local side: the bundle, the output directory
# ------------------------------------------------------------------------------------------------


def bundle_facts(bundle: Path) -> dict:
    """Verify the bundle here first (a damaged file never travels), then its sha256 and small members."""
    from edgekit import bundle as bundles

    if not bundle.is_file():
        raise EdgekitError(f"{bundle} does not exist", "pass a bundle written by 'edgekit package'")
    report = bundles.verify(bundle)
    h = hashlib.sha256()
    with open(bundle, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    small = {}
    with tarfile.open(bundle, "r:gz") as tf:  # verified above: regular files with plain names
        for m in tf:
            if m.name in ("bundle.json", "config.json") and m.size < (16 << 20):
                small[m.name] = tf.extractfile(m).read()
    return {"path": str(bundle), "sha256": h.hexdigest(), "bytes": bundle.stat().st_size, "model": report["model"],
            "target": report["device"], "settings": report["settings"], "signature": report["signature"],
            "members": small}


def write_json(path: Path, data) -> None:
    """Atomically: a reader sees the old file or the new one, never half."""
    from edgekit.artifact import os_error

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise os_error(e, path) from None


def _prepare_out(out: Path, bundle: dict) -> None:
    from edgekit.artifact import os_error

    if out.exists() and not out.is_dir():
        raise EdgekitError(f"{out} is a file", "pass a directory to --out")
    try:
        (out / DEVICES).mkdir(parents=True, exist_ok=True)
        (out / BUNDLE_DIR).mkdir(exist_ok=True)
    except OSError as e:
        raise os_error(e, out) from None
    for name, data in bundle["members"].items():
        (out / BUNDLE_DIR / name).write_bytes(data)


# ------------------------------------------------------------------------------------------------
# one device
# ------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    fleet: Fleet
    accept_new: bool
    lock: asyncio.Lock
    run_id: str = ""
    bundle: dict | None = None
    options: ProfileOptions | None = None
    out: Path | None = None
    public_key: Path | None = None
    allow_unsigned: bool = False
    purge: bool = False
    timeout: float | None = None

    async def session(self, device: Device) -> Session:
        return await Session.open(device, self.fleet.known_hosts, self.accept_new, self.lock)


def _paths(device: Device, run_id: str) -> dict[str, str]:
    w = device.workdir
    run = f"{w}/run-{run_id}"
    return {"workdir": w, "bundle": f"{w}/{REMOTE_BUNDLE}", "partial": f"{w}/.{REMOTE_BUNDLE}.{run_id}.partial",
            "cache": f"{w}/cache", "run": run, "install": f"{run}/install", "report": f"{run}/report.json",
            "tmp": f"{run}/tmp", "public_key": f"{run}/edgekit.pub"}


def _env(p: dict[str, str]) -> dict[str, str]:
    """The remote edgekit's caches and temporary files go to the work directory too."""
    return {"XDG_CACHE_HOME": p["cache"], "MPLCONFIGDIR": f"{p['cache']}/matplotlib", "TMPDIR": p["tmp"],
            "EDGEKIT_QUIET": "1"}


def _remote_error(device: Device, step: str, done: Completed) -> EdgekitError:
    if done.rc == 127:
        return EdgekitError(f"{device.name}: the remote command '{device.edgekit}' was not found",
                            "set edgekit = \"/path/to/venv/bin/edgekit\" for this device in fleet.toml")
    return EdgekitError(f"{device.name}: remote 'edgekit {step}' failed: {done.last_line()}")


async def _remote_sha256(s: Session, path: str) -> str | None:
    done = await s.run(["sh", "-c", 'sha256sum -- "$1" 2>/dev/null || shasum -a 256 -- "$1" 2>/dev/null', "sh",
                        path])
    word = done.stdout.split()[0] if done.rc == 0 and done.stdout.split() else ""
    return word.lower() if re.fullmatch(r"[0-9a-fA-F]{64}", word) else None


async def _upload(s: Session, ctx: _Context, p: dict[str, str]) -> bool:
    """Copy the bundle unless the device already holds one with the same sha256; True when copied."""
    if await _remote_sha256(s, p["bundle"]) == ctx.bundle["sha256"]:
        return False
    await s.sftp_call(f"copying the bundle to {p['partial']}", s.sftp.put(ctx.bundle["path"], p["partial"]))
    if await _remote_sha256(s, p["partial"]) not in (None, ctx.bundle["sha256"]):
        raise EdgekitError(f"{s.device.name}: the copied bundle's sha256 differs from the local one",
                           "check the device's disk space and the link, then run again")
    try:
        await s.sftp.posix_rename(p["partial"], p["bundle"])
    except asyncssh_module().SFTPError:  # a server without the posix-rename extension
        with contextlib.suppress(asyncssh_module().SFTPError):
            await s.sftp.remove(p["bundle"])
        await s.sftp_call("renaming the bundle into place", s.sftp.rename(p["partial"], p["bundle"]))
    return True


async def _edgekit(s: Session, step: str, args: list[str], p: dict[str, str]) -> dict:
    done = await s.run([*s.device.edgekit_argv, step, *args], env=_env(p))
    if done.rc != 0:
        raise _remote_error(s.device, step, done)
    try:
        return json.loads(done.stdout)
    except ValueError:
        return {}


def check_report(device: Device, data: bytes) -> dict:
    try:
        report = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{device.name}: the remote report is not JSON ({e})") from None
    if not isinstance(report, dict) or report.get("edgekit_profile") != 1 or not isinstance(report.get("latency"),
                                                                                              dict):
        raise EdgekitError(f"{device.name}: the remote report is not an edgekit profile report (format 1)",
                           "install the same edgekit version on the device")
    return report


async def _attempt(s: Session, ctx: _Context, p: dict[str, str], result: dict) -> None:
    t = time.monotonic()
    sftp = s.sftp
    await s.sftp_call(f"creating {p['workdir']}", sftp.makedirs(p["workdir"], exist_ok=True))
    if await sftp.exists(p["run"]):  # the previous attempt's, after a dropped connection
        await s.sftp_call(f"removing {p['run']}", sftp.rmtree(p["run"]))
    for d in (p["run"], p["tmp"], p["cache"]):
        await s.sftp_call(f"creating {d}", sftp.makedirs(d, exist_ok=True))
    result["uploaded"] = await _upload(s, ctx, p)
    result["seconds"]["upload"] = round(time.monotonic() - t, 3)
    key = []
    if ctx.public_key:
        await s.sftp_call("copying the public key", sftp.put(str(ctx.public_key), p["public_key"]))
        key = ["--public-key", p["public_key"]]
    unsigned = ["--allow-unsigned"] if ctx.allow_unsigned and not key else []
    for step, args in (("verify", [p["bundle"], *key, "--json"]),
                       ("install", [p["bundle"], "--dest", p["install"], *key, *unsigned, "--json"])):
        t = time.monotonic()
        out = await _edgekit(s, step, args, p)
        result["seconds"][step] = round(time.monotonic() - t, 3)
        if step == "verify":
            result["signature"] = out.get("signature")
        else:
            result["machine"], result["engine"] = out.get("machine"), out.get("engine")
    t = time.monotonic()
    await _edgekit(s, "profile", [p["install"], *ctx.options.argv(ctx.bundle["settings"]), "--json", "--out",
                                  p["report"]], p)
    result["seconds"]["profile"] = round(time.monotonic() - t, 3)
    report = check_report(s.device, await s.read_file(p["report"]))
    write_json(ctx.out / DEVICES / f"{s.device.name}.json", report)
    result["report"] = f"{DEVICES}/{s.device.name}.json"


async def _clean(s: Session, p: dict[str, str], purge: bool) -> None:
    sftp = s.sftp
    with contextlib.suppress(Exception):
        if await sftp.exists(p["run"]):
            await sftp.rmtree(p["run"])
        with contextlib.suppress(Exception):
            await sftp.remove(p["partial"])
        if purge:  # only what fleet puts there, then the directory if nothing else is in it
            with contextlib.suppress(Exception):
                await sftp.remove(p["bundle"])
            if await sftp.exists(p["cache"]):
                await sftp.rmtree(p["cache"])
            with contextlib.suppress(Exception):
                await sftp.rmdir(p["workdir"])


async def _clean_after_drop(ctx: _Context, device: Device, p: dict[str, str]) -> None:
    """A dropped connection could not clean up: one short session to do it."""
    with contextlib.suppress(Exception):
        s = await asyncio.wait_for(ctx.session(device), device.connect_timeout)
        try:
            await asyncio.wait_for(_clean(s, p, ctx.purge), CLEAN_TIMEOUT)
        finally:
            await s.close()


def _error(e: BaseException) -> str:
    if isinstance(e, EdgekitError | Dropped):
        return str(e)
    return f"{type(e).__name__}: {e}"


async def _profile_device(ctx: _Context, device: Device, sem: asyncio.Semaphore) -> dict:
    """One device, start to finish; always returns its record (ok, failed or cancelled), never raises."""
    p = _paths(device, ctx.run_id)
    timeout = ctx.timeout or device.timeout
    result = {"device": device.name, "address": device.address, "profile": device.profile, "status": "waiting",
              "error": None, "attempts": 0, "uploaded": None, "seconds": {}, "report": None}
    start = time.monotonic()
    try:
        async with sem:
            start = time.monotonic()
            for attempt in (1, 2):  # one retry, only after a dropped connection
                result["attempts"], result["status"] = attempt, "running"
                try:
                    await asyncio.wait_for(_attempt_session(ctx, device, p, result), timeout)
                    result["status"], result["error"] = "ok", None
                    break
                except asyncio.TimeoutError:
                    result["status"] = "failed"
                    result["error"] = f"timed out after {timeout:g} s (the remote command was stopped)"
                    break
                except Exception as e:
                    result["status"], result["error"] = "failed", _error(e)
                    if not is_dropped(e):
                        break
                    if attempt == 2:
                        result["error"] += " (after one retry)"
                        await _clean_after_drop(ctx, device, p)
    except asyncio.CancelledError:  # Ctrl-C: the session below already stopped the remote command and cleaned
        result["status"], result["error"] = "cancelled", "interrupted (Ctrl-C) before it finished"
    result["seconds"]["total"] = round(time.monotonic() - start, 3)
    return result


async def _attempt_session(ctx: _Context, device: Device, p: dict[str, str], result: dict) -> None:
    t = time.monotonic()
    s = await ctx.session(device)
    try:
        result["seconds"]["connect"] = round(time.monotonic() - t, 3)
        await _attempt(s, ctx, p, result)
    finally:  # also when cancelled or timed out: the run directory goes, then the connection
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_clean(s, p, ctx.purge), CLEAN_TIMEOUT)
        await s.close()


# ------------------------------------------------------------------------------------------------
# the fleet
# ------------------------------------------------------------------------------------------------


async def _gather(coros_by_device: dict[str, object], placeholder) -> tuple[list[dict], bool]:
    """Run the device tasks; on cancellation (Ctrl-C) cancel them all, wait for their clean-up, and return
    what finished plus a placeholder for the rest."""
    tasks = {name: asyncio.ensure_future(c) for name, c in coros_by_device.items()}
    interrupted = False
    try:
        await asyncio.gather(*tasks.values())
    except asyncio.CancelledError:
        interrupted = True
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    out = []
    for name, t in tasks.items():
        if t.done() and not t.cancelled() and t.exception() is None:
            out.append(t.result())
        else:
            out.append(placeholder(name))
    return out, interrupted


def _parallel(parallel: int) -> asyncio.Semaphore:
    if parallel < 1:
        raise EdgekitError(f"--parallel {parallel} must be at least 1", "pass the number of devices to run at once")
    return asyncio.Semaphore(parallel)


async def profile_async(bundle: str | Path, hosts: str | Path, out: str | Path, devices: list[str] | None = None,
                        parallel: int = 4, accept_new_host_keys: bool = False, options: ProfileOptions | None = None,
                        public_key: str | Path | None = None, allow_unsigned: bool = False, purge: bool = False,
                        timeout: float | None = None) -> dict:
    """Profile `bundle` on the devices of fleet.toml `hosts` (all, or those named in `devices`), at most
    `parallel` at once; reports to `out`. The remote install checks the bundle's signature against
    `public_key`; without one it refuses unless `allow_unsigned` (like `edgekit install`)."""
    if public_key is None and not allow_unsigned:
        raise EdgekitError("no --public-key to check the bundle's signature against on the devices",
                           "pass --public-key with the publisher's edgekit.pub, or --allow-unsigned to install it "
                           "without checking who made it")
    fleet = load(hosts)
    chosen = fleet.select(devices)
    sem = _parallel(parallel)
    if public_key is not None and not Path(public_key).is_file():
        raise EdgekitError(f"--public-key {public_key} does not exist", "pass the edgekit.pub of the signer")
    asyncssh_module()
    facts = bundle_facts(Path(bundle))
    out = Path(out)
    _prepare_out(out, facts)
    ctx = _Context(fleet, accept_new_host_keys, asyncio.Lock(), run_id=secrets.token_hex(6), bundle=facts,
                   options=options or ProfileOptions(), out=out, public_key=Path(public_key) if public_key else None,
                   allow_unsigned=allow_unsigned, purge=purge, timeout=timeout)
    t = time.monotonic()
    results, interrupted = await _gather(
        {d.name: _profile_device(ctx, d, sem) for d in chosen},
        lambda name: {"device": name, "status": "cancelled", "error": "interrupted (Ctrl-C) before it finished"})
    summary = {"edgekit_fleet": FLEET_FORMAT, "bundle": {k: v for k, v in facts.items() if k != "members"},
               "fleet": str(fleet.path), "parallel": parallel, "options": asdict(ctx.options),
               "wall_s": round(time.monotonic() - t, 3), "interrupted": interrupted, "devices": results,
               "ok": sum(r["status"] == "ok" for r in results), "failed": sum(r["status"] != "ok" for r in results)}
    write_json(out / SUMMARY, summary)
    return summary


# the synchronous API (the CLI's) ----------------------------------------------------------------
def run_interruptible(coro) -> dict:
    """asyncio.run with Ctrl-C cancelling the main task (so every session cleans up and the result says
    'interrupted') on any Python >= 3.10, instead of a KeyboardInterrupt raised at a random await."""

    async def main():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        installed = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, task.cancel)
            installed = True
        try:
            return await coro
        finally:
            if installed:
                loop.remove_signal_handler(signal.SIGINT)

    return asyncio.run(main())


def profile(*args, **kwargs) -> dict:
    """Profile one bundle on every device of fleet.toml (see profile_async for the arguments)."""
    return run_interruptible(profile_async(*args, **kwargs))
