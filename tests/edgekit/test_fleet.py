"""edgekit fleet over real SSH, on loopback only.

Every "device" is an in-process asyncssh server on 127.0.0.1 (host and client keys generated here) whose
process factory runs the requested command locally in a subprocess, so the fleet's remote commands —
the stop-when-the-session-ends wrapper, sha256sum, and edgekit — really run. The remote edgekit is a
small stand-in (STAND_IN) that answers --version, verify, install and profile with a canned but valid
report; one slow test uses the real edgekit on a real tiny ONNX bundle. No other address is contacted.

Each device has its own root: ROOT/home (HOME and working directory of every command) and ROOT/work (the
fleet work directory). The SFTP server logs every path it writes, and the stand-in every file it writes,
so "nothing outside the work directory" is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

asyncssh = pytest.importorskip("asyncssh")

from edgekit import fleet  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.fleet import ProfileOptions  # noqa: E402

LOOPBACK = "127.0.0.1"  # the only address these tests ever use
BARRIER_WAIT = 30.0  # seconds the stand-in waits for its peers (a bound, not a timing assertion)

STAND_IN = r'''#!PYTHON
"""A stand-in for the remote edgekit: the commands fleet uses, canned but valid answers."""
import hashlib, json, os, sys, time
args = sys.argv[1:]
name = os.environ["FLEET_DEVICE"]
log = os.environ["FLEET_LOG"]

def wrote(path):
    with open(log, "a") as f:
        f.write(os.path.abspath(path) + "\n")

def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    wrote(path)

if args == ["--version"]:
    print("edgekit 0.1.0")
    sys.exit(0)
cmd = args[0]
if cmd == "verify":
    data = open(args[1], "rb").read()
    if not data.startswith(b"\x1f\x8b"):
        print("error: not a gzip file (get it again)", file=sys.stderr)
        sys.exit(1)
    print(json.dumps({"bundle": args[1], "signature": "unsigned", "sha256": hashlib.sha256(data).hexdigest()}))
elif cmd == "install":
    dest = args[args.index("--dest") + 1]
    if "--public-key" not in args and "--allow-unsigned" not in args:
        print("error: no --public-key (pass --public-key or --allow-unsigned)", file=sys.stderr)
        sys.exit(1)
    write(os.path.join(dest, "bundle.json"), "{}")
    print(json.dumps({"installed": dest, "machine": ["stand-in machine"], "engine": "not needed"}))
elif cmd == "profile":
    target, out = args[1], args[args.index("--out") + 1]
    assert os.path.isfile(os.path.join(target, "bundle.json")), "profile before install"
    with open(os.path.join(os.environ["FLEET_PIDS"], name), "w") as f:  # test bookkeeping, outside the device
        f.write(str(os.getpid()))
    # what an edgekit profile writes through its environment: the host cache and a temporary file
    write(os.path.join(os.environ["XDG_CACHE_HOME"], "edgekit", "host.json"), "{}")
    write(os.path.join(os.environ["TMPDIR"], "scratch"), "x")
    barrier = os.environ.get("FLEET_BARRIER")
    if barrier:  # wait, boundedly, until every device of the barrier has started its profile
        open(os.path.join(barrier, name), "w").close()
        need, wait = int(os.environ["FLEET_BARRIER_N"]), float(os.environ["FLEET_BARRIER_WAIT"])
        deadline = time.monotonic() + wait
        while len(os.listdir(barrier)) < need:
            if time.monotonic() > deadline:
                print(f"error: only {len(os.listdir(barrier))} of {need} devices were profiling at once",
                      file=sys.stderr)
                sys.exit(3)
            time.sleep(0.02)
    if os.environ.get("FLEET_HANG"):
        time.sleep(3600)
    time.sleep(float(os.environ.get("FLEET_SLEEP", "0")))  # bench/fleet.py: the device's own work
    tps = float(os.environ.get("FLEET_TPS", "100"))
    lat = lambda ms: {"p50": ms, "p90": ms * 1.1, "p99": ms * 1.2, "mean": ms, "min": ms, "max": ms * 1.3, "n": 5}
    report = {
        "edgekit_profile": 1,
        "target": {"name": "v3-tiny", "kind": "checkpoint", "path": target, "family": "v3"},
        "settings": {"prompt_len": int(args[args.index("--prompt-len") + 1]),
                     "new_tokens": int(args[args.index("--new-tokens") + 1]), "batch": 1, "runs": 5},
        "runtime": {"runtime": "torch", "precision": "fp32", "dtype": "fp32", "device": "cpu"},
        "device": {"profile": "host", "hostname": name},
        "latency": {"ttft_ms": lat(5.0), "decode_ms_per_token": lat(1000.0 / tps), "e2e_ms": lat(50.0),
                    "decode_tokens_per_s": tps, "measured_runs": 5},
        "memory": {"baseline_rss_bytes": 100 << 20, "peak_rss_bytes": 150 << 20, "peak_rss_delta_bytes": 50 << 20},
        "size": {"precision": "fp32"},
        "roofline": {"fraction_of_roofline": 0.25},
        "energy": {"available": False, "reason": "no power sensor (stand-in)"},
        "interrupted": False,
    }
    write(out, json.dumps(report))
    print(json.dumps(report))
else:
    print(f"error: unknown command {cmd}", file=sys.stderr)
    sys.exit(2)
'''


# ------------------------------------------------------------------------------------------------
# the loopback devices
# ------------------------------------------------------------------------------------------------


@dataclass
class Dev:
    name: str
    root: Path
    host_key: object
    env: dict = field(default_factory=dict)
    drops: int = 0  # connections to abort while 'edgekit profile' runs (then behave)
    port: int = 0
    server: object = None
    writes: list = field(default_factory=list)  # every path the SFTP server wrote, created or removed
    commands: list = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def work(self) -> Path:
        return self.root / "work"


class Lab:
    """Loopback SSH servers on a background event loop; the fleet API runs its own loop in the test thread."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client_key = asyncssh.generate_private_key("ssh-ed25519")
        self.key_path = tmp / "client_key"
        self.client_key.write_private_key(str(self.key_path))
        self.authorized = asyncssh.import_authorized_keys(self.client_key.export_public_key().decode())
        self.known_hosts = tmp / "known_hosts"
        self.known_hosts.write_text("")
        self.pids = tmp / "pids"
        self.pids.mkdir()
        self.stand_in = tmp / "edgekit-stand-in"
        self.stand_in.write_text(STAND_IN.replace("PYTHON", sys.executable, 1))
        self.stand_in.chmod(0o755)
        self.devices: dict[str, Dev] = {}

    def call(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, name: str, known: bool = True, drops: int = 0, **env) -> Dev:
        root = self.tmp / "devices" / name
        (root / "home").mkdir(parents=True)
        dev = Dev(name, root, asyncssh.generate_private_key("ssh-ed25519"), env, drops)
        dev.env.update(FLEET_DEVICE=name, FLEET_LOG=str(self.tmp / f"{name}.writes"), FLEET_PIDS=str(self.pids))
        self.call(self._start(dev))
        if known:
            self.trust(dev, dev.host_key)
        self.devices[name] = dev
        return dev

    def trust(self, dev: Dev, key) -> None:
        with open(self.known_hosts, "a") as f:
            f.write(f"[{LOOPBACK}]:{dev.port} {key.export_public_key().decode()}")

    async def _start(self, dev: Dev) -> None:
        lab = self

        class LoggingSFTP(asyncssh.SFTPServer):
            def open(self, path, pflags, attrs):
                if pflags & (asyncssh.FXF_WRITE | asyncssh.FXF_CREAT):
                    dev.writes.append(os.fsdecode(path))
                return super().open(path, pflags, attrs)

            def mkdir(self, path, attrs):
                if not os.path.exists(self.map_path(path)):  # makedirs tries every parent: log what is made
                    dev.writes.append(os.fsdecode(path))
                return super().mkdir(path, attrs)

            def remove(self, path):
                dev.writes.append(os.fsdecode(path))
                return super().remove(path)

            def rmdir(self, path):
                dev.writes.append(os.fsdecode(path))
                return super().rmdir(path)

            def rename(self, old, new):
                dev.writes += [os.fsdecode(old), os.fsdecode(new)]
                return super().rename(old, new)

            def posix_rename(self, old, new):
                dev.writes += [os.fsdecode(old), os.fsdecode(new)]
                return super().posix_rename(old, new)

        async def handle(process) -> None:
            cmd = process.command
            cmd = cmd.decode() if isinstance(cmd, bytes) else cmd
            dev.commands.append(cmd)
            env = {**os.environ, "HOME": str(dev.home), **dev.env}
            proc = await asyncio.create_subprocess_shell(
                cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                cwd=dev.home, env=env)

            async def pump_stdin():  # the channel's stdin to the command's, end of file included (like sshd)
                try:
                    while data := await process.stdin.read(65536):
                        proc.stdin.write(data)
                except Exception:
                    pass
                finally:
                    proc.stdin.close()

            pump = asyncio.ensure_future(pump_stdin())
            if dev.drops and " profile " in cmd:
                dev.drops -= 1
                await asyncio.sleep(0.5)  # mid-run: the profile has started
                process.channel.get_connection().abort()
            out, err = await asyncio.gather(proc.stdout.read(), proc.stderr.read())
            rc = await proc.wait()
            pump.cancel()
            with contextlib.suppress(Exception):
                proc.stdin.close()
            with contextlib.suppress(Exception):
                process.stdout.write(out)
                process.stderr.write(err)
                process.exit(rc)

        dev.server = await asyncssh.create_server(
            lambda: asyncssh.SSHServer(), LOOPBACK, 0, server_host_keys=[dev.host_key],
            authorized_client_keys=lab.authorized, process_factory=handle, sftp_factory=LoggingSFTP, encoding=None)
        dev.port = dev.server.sockets[0].getsockname()[1]

    def fleet_toml(self, names: list[str], **extra) -> Path:
        lines = [f'known_hosts = "{self.known_hosts}"', "", "[defaults]", f'user = "{os.environ.get("USER", "me")}"',
                 f'key = "{self.key_path}"', f'edgekit = "{self.stand_in}"', "connect_timeout = 10", ""]
        for n in names:
            d = self.devices[n]
            lines += [f"[devices.{n}]", f'host = "{LOOPBACK}"', f"port = {d.port}", f'workdir = "{d.work}"']
            lines += [f"{k} = {json.dumps(v)}" for k, v in extra.get(n, {}).items()] + [""]
        path = self.tmp / "fleet.toml"
        path.write_text("\n".join(lines))
        return path

    def close(self) -> None:
        async def stop():
            for d in self.devices.values():
                d.server.close()

        with contextlib.suppress(Exception):
            self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    lab.close()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A real (tiny, checkpoint) bundle: fleet verifies it locally before anything travels."""
    from tiny_bundle import v3_tiny_bundle

    return v3_tiny_bundle(tmp_path_factory.mktemp("fleet-bundle"))


FAST = ProfileOptions(prompt_len=8, new_tokens=4, warmup=0, runs=2)
RUN = {"options": FAST, "allow_unsigned": True}  # the test bundle is unsigned


def outside_work(lab: Lab, dev: Dev) -> list[str]:
    """Every path written on the device outside its work directory (SFTP log, stand-in log, HOME)."""
    logged = list(dev.writes)
    log = lab.tmp / f"{dev.name}.writes"
    if log.exists():
        logged += log.read_text().split()
    bad = [p for p in logged if not (p == str(dev.work) or p.startswith(str(dev.work) + "/"))]
    return bad + [str(p) for p in dev.home.rglob("*")]


def left_in_work(dev: Dev) -> list[str]:
    """What the work directory holds after a run: only the cached bundle and edgekit's cache may stay."""
    if not dev.work.exists():
        return []
    return sorted(p.name for p in dev.work.iterdir())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_dead(pid: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------------------------
# profile
# ------------------------------------------------------------------------------------------------


def test_three_devices_profiled_in_parallel(lab, bundle, tmp_path):
    """The stand-in's profile waits (boundedly) until all three devices are profiling: only a parallel run
    passes. Then: reports fetched, nothing written outside the work directories, the run directories gone,
    and a second run copies nothing (the remote sha256 matches)."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    env = dict(FLEET_BARRIER=str(barrier), FLEET_BARRIER_N="3", FLEET_BARRIER_WAIT=str(BARRIER_WAIT))
    for i, n in enumerate(("a", "b", "c")):
        lab.add(n, FLEET_TPS=str(100 + 10 * i), **env)
    hosts = lab.fleet_toml(["a", "b", "c"])
    out = tmp_path / "run1"
    r = fleet.profile(bundle, hosts, out, parallel=3, **RUN)
    assert [d["status"] for d in r["devices"]] == ["ok", "ok", "ok"], r["devices"]
    assert all(d["uploaded"] and d["attempts"] == 1 for d in r["devices"])
    for n in ("a", "b", "c"):
        dev = lab.devices[n]
        rep = json.loads((out / "devices" / f"{n}.json").read_text())
        assert rep["edgekit_profile"] == 1 and rep["device"]["hostname"] == n
        assert outside_work(lab, dev) == []
        assert left_in_work(dev) == ["bundle.tar.gz", "cache"]
        assert (dev.work / "bundle.tar.gz").read_bytes() == bundle.read_bytes()
    # the profile options and the bundle's settings reached the remote command
    assert any("--prompt-len 8" in c for c in lab.devices["a"].commands)

    for f in barrier.iterdir():
        f.unlink()
    r2 = fleet.profile(bundle, hosts, tmp_path / "run2", parallel=3, **RUN, purge=True)
    assert [d["status"] for d in r2["devices"]] == ["ok", "ok", "ok"]
    assert [d["uploaded"] for d in r2["devices"]] == [False, False, False]
    for dev in lab.devices.values():  # --purge: the work directory itself is gone
        assert not dev.work.exists() and outside_work(lab, dev) == []


def test_a_sequential_run_would_fail_the_barrier(lab, bundle, tmp_path):
    """The same barrier with --parallel 1: each device waits alone, gives up, and is recorded as failed —
    the parallel test above cannot pass by accident."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    for n in ("a", "b", "c"):
        lab.add(n, FLEET_BARRIER=str(barrier), FLEET_BARRIER_N="3", FLEET_BARRIER_WAIT="0.5")
    r = fleet.profile(bundle, lab.fleet_toml(["a", "b", "c"]), tmp_path / "out", parallel=1, **RUN)
    statuses = [d["status"] for d in r["devices"]]
    assert statuses[0] == "failed" and "devices were profiling at once" in r["devices"][0]["error"]
    assert r["ok"] < 3


def test_failures_are_isolated(lab, bundle, tmp_path):
    """One good device, one that drops once (retried: ok), one that always drops (retried once, then
    recorded), one whose host key changed and one with no known key (both refused, never retried)."""
    good = lab.add("good")
    flaky = lab.add("flaky", drops=1)
    dead = lab.add("dead", drops=99)
    changed = lab.add("changed", known=False)
    lab.trust(changed, asyncssh.generate_private_key("ssh-ed25519"))  # a different key was recorded
    unknown = lab.add("unknown", known=False)
    r = fleet.profile(bundle, lab.fleet_toml(list(lab.devices)), tmp_path / "out", parallel=5, **RUN)
    by = {d["device"]: d for d in r["devices"]}
    assert by["good"]["status"] == "ok" and by["good"]["attempts"] == 1
    assert by["flaky"]["status"] == "ok" and by["flaky"]["attempts"] == 2
    assert by["dead"]["status"] == "failed" and by["dead"]["attempts"] == 2
    assert "after one retry" in by["dead"]["error"]
    assert by["changed"]["status"] == "failed" and by["changed"]["attempts"] == 1
    assert "does not match the one recorded" in by["changed"]["error"]
    assert by["unknown"]["status"] == "failed" and "host key is unknown" in by["unknown"]["error"]
    assert (r["ok"], r["failed"]) == (2, 3)
    assert sorted(p.name for p in (tmp_path / "out" / "devices").iterdir()) == ["flaky.json", "good.json"]
    for dev in (good, flaky, dead):
        assert outside_work(lab, dev) == [] and left_in_work(dev) == ["bundle.tar.gz", "cache"]
    for dev in (flaky, dead):  # the dropped profiles were stopped on the device
        assert wait_dead(int((lab.pids / dev.name).read_text()))
    for dev in (changed, unknown):  # refused before anything ran
        assert dev.commands == [] and not dev.work.exists()
    assert str(unknown.port) not in lab.known_hosts.read_text().split("\n")[-2]  # nothing recorded for it

    summary = json.loads((tmp_path / "out" / "fleet.json").read_text())
    assert summary["ok"] == 2 and {d["device"] for d in summary["devices"]} == set(lab.devices)


def test_accept_new_host_keys_records_the_key(lab, bundle, tmp_path):
    dev = lab.add("new", known=False)
    hosts = lab.fleet_toml(["new"])
    r = fleet.profile(bundle, hosts, tmp_path / "out", **RUN, accept_new_host_keys=True)
    assert r["devices"][0]["status"] == "ok", r["devices"][0]["error"]
    line = f"[{LOOPBACK}]:{dev.port} {dev.host_key.export_public_key().decode().split()[0]} " \
           f"{dev.host_key.export_public_key().decode().split()[1]}"
    assert line in lab.known_hosts.read_text()
    # recorded: the next run needs no flag; a changed key is refused even with it
    assert fleet.profile(bundle, hosts, tmp_path / "out2", **RUN)["devices"][0]["status"] == "ok"
    lab.known_hosts.write_text("")
    lab.trust(dev, asyncssh.generate_private_key("ssh-ed25519"))
    r3 = fleet.profile(bundle, hosts, tmp_path / "out3", **RUN, accept_new_host_keys=True)
    assert r3["devices"][0]["status"] == "failed" and "does not match" in r3["devices"][0]["error"]


def test_ctrl_c_cancels_every_session(lab, bundle, tmp_path):
    """Cancel while three remote profiles run: each remote command is stopped, each run directory removed,
    and the result says what happened."""
    names = ["h1", "h2", "h3"]
    for n in names:
        lab.add(n, FLEET_HANG="1")
    hosts = lab.fleet_toml(names)

    async def go():
        task = asyncio.ensure_future(fleet.profile_async(bundle, hosts, tmp_path / "out", parallel=3, **RUN))
        deadline = time.monotonic() + 60
        while len(list(lab.pids.iterdir())) < 3:
            assert time.monotonic() < deadline and not task.done(), "the profiles never started"
            await asyncio.sleep(0.05)
        task.cancel()
        return await task

    r = asyncio.run(go())
    assert r["interrupted"] and [d["status"] for d in r["devices"]] == ["cancelled"] * 3
    for n in names:
        assert wait_dead(int((lab.pids / n).read_text())), f"{n}: the remote profile kept running"
        assert left_in_work(lab.devices[n]) == ["bundle.tar.gz", "cache"]
        assert outside_work(lab, lab.devices[n]) == []
    assert json.loads((tmp_path / "out" / "fleet.json").read_text())["interrupted"] is True


def test_sigint_through_the_synchronous_api(lab, bundle, tmp_path):
    """A real SIGINT (what Ctrl-C sends) during fleet.profile: the API returns 'interrupted', nothing left."""
    import signal

    lab.add("h1", FLEET_HANG="1")
    lab.add("h2", FLEET_HANG="1")
    hosts = lab.fleet_toml(["h1", "h2"])

    def press_ctrl_c():
        deadline = time.monotonic() + 60
        while len(list(lab.pids.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=press_ctrl_c, daemon=True).start()
    r = fleet.profile(bundle, hosts, tmp_path / "out", parallel=2, **RUN)
    assert r["interrupted"] and {d["status"] for d in r["devices"]} == {"cancelled"}
    for n in ("h1", "h2"):
        assert wait_dead(int((lab.pids / n).read_text()))
        assert left_in_work(lab.devices[n]) == ["bundle.tar.gz", "cache"]


def test_per_device_timeout(lab, bundle, tmp_path):
    lab.add("slow", FLEET_HANG="1")
    lab.add("fine")
    hosts = lab.fleet_toml(["slow", "fine"], slow={"timeout": 3})
    r = fleet.profile(bundle, hosts, tmp_path / "out", parallel=2, **RUN)
    by = {d["device"]: d for d in r["devices"]}
    assert by["slow"]["status"] == "failed" and "timed out after 3 s" in by["slow"]["error"]
    assert by["fine"]["status"] == "ok"
    assert wait_dead(int((lab.pids / "slow").read_text()))
    assert left_in_work(lab.devices["slow"]) == ["bundle.tar.gz", "cache"]


def test_remote_command_errors_are_recorded(lab, bundle, tmp_path):
    lab.add("nocmd")
    lab.add("ok")
    hosts = lab.fleet_toml(["nocmd", "ok"], nocmd={"edgekit": "/nonexistent/edgekit"})
    r = fleet.profile(bundle, hosts, tmp_path / "out", parallel=2, **RUN)
    by = {d["device"]: d for d in r["devices"]}
    assert "was not found" in by["nocmd"]["error"] and by["ok"]["status"] == "ok"
    assert left_in_work(lab.devices["nocmd"]) == ["bundle.tar.gz", "cache"]


# ------------------------------------------------------------------------------------------------
# check and report
# ------------------------------------------------------------------------------------------------


def test_check(lab):
    lab.add("cpu1")
    lab.add("orin")
    hosts = lab.fleet_toml(["cpu1", "orin"], cpu1={"profile": "host"}, orin={"profile": "jetson-orin-nano-8gb"})
    r = fleet.check(hosts)
    by = {d["device"]: d for d in r["devices"]}
    assert by["cpu1"]["status"] == "ok" and by["cpu1"]["edgekit"] == "0.1.0"
    assert by["cpu1"]["identity"]["profile"] == "host" and by["cpu1"]["identity"]["memory_gib"] > 0
    assert by["orin"]["status"] == "mismatch" and "expected jetson-orin-nano-8gb" in by["orin"]["problems"][0]
    for dev in lab.devices.values():
        assert outside_work(lab, dev) == [] and not dev.work.exists()


def test_identity_reads_a_jetson_probe():
    probe = ("@@arch\naarch64\n@@model\nNVIDIA Jetson Orin Nano Developer Kit\n@@l4t\n# R36 (release), REVISION: "
             "4.3, GCID: 1, BOARD: generic, EABI: aarch64\n@@nvpmodel\nNV Power Mode: 15W\n0\n@@meminfo\nMemTotal:"
             "        7802136 kB\n@@gpu\n\n")
    from edgekit.fleet.check import identity

    info = identity(probe)
    assert info["jetson"]["model"].startswith("NVIDIA Jetson Orin Nano") and info["jetson"]["l4t"] == "36.4.3"
    assert info["jetson"]["nvpmodel"] == {"mode": "15W", "id": 0}
    assert info["profile"] == "jetson-orin-nano-8gb"


def test_report_table_png_and_estimates(lab, bundle, tmp_path):
    lab.add("cpu1")
    lab.add("orin", FLEET_TPS="40")
    lab.add("gone", drops=99)
    hosts = lab.fleet_toml(["cpu1", "orin", "gone"], orin={"profile": "jetson-orin-nano-8gb"})
    out = tmp_path / "out"
    fleet.profile(bundle, hosts, out, parallel=3, **RUN)
    r = fleet.report(out)
    by = {row["device"]: row for row in r["rows"]}
    assert by["cpu1"]["tokens_per_s"] == 100 and by["cpu1"]["decode_ms_p99"] == pytest.approx(12.0)
    assert by["cpu1"]["peak_memory_mib"] == 150 and by["cpu1"]["joules_per_token"] is None
    assert by["cpu1"]["fraction_of_roofline"] == 0.25 and by["cpu1"]["estimate"] is None
    est = by["orin"]["estimate"]  # plan's estimate for the expected Jetson profile, beside the measurement
    assert est["decode_tokens_per_s"] > 0 and est["ttft_ms"] > 0 and by["orin"]["measured_over_estimate"] > 0
    assert by["gone"]["status"] == "failed" and by["gone"]["error"]
    png = Path(r["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_errors(tmp_path):
    with pytest.raises(EdgekitError, match="does not exist"):
        fleet.report(tmp_path / "nope")
    with pytest.raises(EdgekitError, match="holds no fleet results"):
        fleet.report(tmp_path)


# ------------------------------------------------------------------------------------------------
# fleet.toml
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, message", [
    ("", "lists no devices"),
    ("[devices.a]\nport = 22\n", "has no host"),
    ("[devices.a]\nhost = 'x'\nhots = 1\n", "did you mean 'host'"),
    ("[devices.a]\nhost = 'x'\nport = 'ssh'\n", "port must be a int"),
    ("[devices.a]\nhost = 'x'\nworkdir = 'relative'\n", "must be an absolute path"),
    ("[devices.a]\nhost = 'x'\nworkdir = '/'\n", "must be an absolute path"),
    ("[devices.a]\nhost = 'x'\nprofile = 'orin-nano'\n", "unknown device profile"),
    ("[devices.a]\nhost = 'x'\nkey = 'missing_key'\n", "does not exist"),
    ("[devices.'a b']\nhost = 'x'\n", "device name"),
    ("[devices.a]\nhost = 'x'\nedgekit = '\"unclosed'\n", "cannot be split"),
    ("[devices.a\n", "not valid TOML"),
    ("hosts = 1\n", "unknown top-level key"),
])
def test_fleet_toml_mistakes_are_one_line(tmp_path, body, message):
    path = tmp_path / "fleet.toml"
    path.write_text(body)
    with pytest.raises(EdgekitError, match=message) as e:
        fleet.load(path)
    assert "\n" not in str(e.value) and e.value.fix


def test_fleet_toml_defaults_and_selection(tmp_path):
    (tmp_path / "k").write_text("key")
    path = tmp_path / "fleet.toml"
    path.write_text("[defaults]\nuser = 'nvidia'\nkey = 'k'\nworkdir = '/tmp/ek/'\n[devices.a]\nhost = 'x'\n"
                    "[devices.b]\nhost = 'y'\nport = 2222\nuser = 'root'\ntimeout = 60\n")
    f = fleet.load(path)
    a, b = f.devices
    assert (a.user, a.port, a.key, a.workdir) == ("nvidia", 22, str(tmp_path / "k"), "/tmp/ek")
    assert (b.user, b.port, b.timeout) == ("root", 2222, 60.0)
    assert f.known_hosts == Path("~/.ssh/known_hosts").expanduser()
    assert [d.name for d in f.select(["b"])] == ["b"]
    with pytest.raises(EdgekitError, match="unknown device 'c'"):
        f.select(["c"])


def test_fleet_never_imports_torch():
    import subprocess

    code = "import sys, edgekit.fleet, edgekit.fleet.report, edgekit.fleet.ssh; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------------


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_cli_profile_report_and_check(cli, lab, bundle, tmp_path):
    lab.add("good")
    lab.add("dead", drops=99)
    hosts = lab.fleet_toml(["good", "dead"], good={"profile": "host"})
    out = tmp_path / "out"
    code, stdout, err = cli("fleet", "profile", bundle, "--hosts", hosts, "--out", out, "--parallel", "2",
                            "--prompt-len", "8", "--new-tokens", "4", "--runs", "2", "--warmup", "0",
                            "--allow-unsigned")
    assert code == 1 and "good" in stdout and "failed: dead: the connection ended" in stdout, stdout + err
    one_line_error(code, err, "1 of 2 devices failed", "--only NAME")
    code, stdout, err = cli("fleet", "report", out, "--json")
    assert code == 0, err
    rows = {r["device"]: r for r in json.loads(stdout)["rows"]}
    assert rows["good"]["tokens_per_s"] == 100 and rows["dead"]["status"] == "failed"
    code, stdout, err = cli("fleet", "check", "--hosts", hosts, "--only", "good", "--json")
    assert code == 0 and json.loads(stdout)["devices"][0]["edgekit"] == "0.1.0", err


@pytest.mark.parametrize("args, fragments", [
    (["check", "--hosts", "missing.toml"], ["missing.toml does not exist", "write a fleet.toml"]),
    (["report", "nowhere"], ["nowhere does not exist"]),
    (["profile", "missing.tar.gz", "--hosts", "HOSTS", "--allow-unsigned"], ["missing.tar.gz does not exist"]),
    (["profile", "BUNDLE", "--hosts", "HOSTS", "--only", "nope", "--allow-unsigned"], ["unknown device 'nope'"]),
    (["profile", "BUNDLE", "--hosts", "HOSTS"], ["no --public-key", "--allow-unsigned"]),
])
def test_cli_mistakes_are_one_line(cli, tmp_path, bundle, args, fragments):
    hosts = tmp_path / "fleet.toml"
    hosts.write_text("[devices.a]\nhost = '127.0.0.1'\nport = 9\n")
    args = [str(hosts) if a == "HOSTS" else str(bundle) if a == "BUNDLE" else a for a in args]
    code, _, err = cli("fleet", *args)
    one_line_error(code, err, *fragments)


# ------------------------------------------------------------------------------------------------
# the real edgekit, end to end
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_edgekit_verifies_installs_and_profiles(lab, onnx_v3_tiny, tmp_path):
    """The real /work/main/.venv/bin/edgekit (this interpreter's) as the remote command: a real ONNX bundle
    is verified, installed and profiled over SSH, and the merged report reads the real report."""
    from edgekit import bundle as bundles

    real = Path(sys.executable).with_name("edgekit")
    if not real.is_file():
        pytest.skip(f"no edgekit script beside {sys.executable}")
    b = tmp_path / "v3-tiny-onnx.tar.gz"
    bundles.package(onnx_v3_tiny, "cpu", b)
    dev = lab.add("real")
    hosts = lab.fleet_toml(["real"], real={"edgekit": str(real)})
    r = fleet.profile(b, hosts, tmp_path / "out", options=ProfileOptions(prompt_len=8, new_tokens=4, warmup=0,
                                                                         runs=2, energy=False), allow_unsigned=True)
    d = r["devices"][0]
    assert d["status"] == "ok", d
    rep = json.loads((tmp_path / "out" / d["report"]).read_text())
    assert rep["edgekit_profile"] == 1 and rep["runtime"]["runtime"] == "onnxruntime"
    assert rep["latency"]["decode_tokens_per_s"] > 0
    assert outside_work(lab, dev) == [] and left_in_work(dev) == ["bundle.tar.gz", "cache"]
    assert (dev.work / "cache" / "edgekit" / "host.json").is_file()  # the remote edgekit's cache stayed inside
    row = fleet.report(tmp_path / "out")["rows"][0]
    assert row["runtime"].startswith("onnxruntime") and row["tokens_per_s"] > 0
