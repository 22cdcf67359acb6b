"""edgekit fleet: three loopback devices profiled in parallel vs one (issue 19's target: <= 1.5x).

Loopback SSH devices are the test suite's in-process asyncssh servers (tests/edgekit/test_fleet.py: Lab,
127.0.0.1 only; real SSH protocol, real SFTP copy, the remote commands really run in subprocesses).
Two remote commands:

1. stand-in: answers verify / install at once and spends SLEEP seconds in `profile` (the device's own
   work: on real boards that happens on each board, not here), then a canned report. The ratio measures
   fleet's own cost and its parallelism: connect, host-key check, sha256, SFTP copy, three remote edgekit
   calls, report fetch, clean-up.
2. real: this venv's edgekit verifies, installs and profiles a real tiny ONNX bundle (v3-tiny). All three
   "devices" share this machine's cores, so CPU contention shows up in this ratio; reported, not the target.

Each configuration: one device alone, then three devices with --parallel 3, alternating, ROUNDS times;
the median wall time of each. Every run uses --purge, so every device copies the bundle every time (the
worst case; a second run of the same bundle copies nothing). Writes bench/results/fleet.json (with the
machine's load average).

    .venv/bin/python bench/fleet.py [--rounds 3] [--sleep 3] [--no-real]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("EDGEKIT_QUIET", "1")

from edgekit import fleet, package  # noqa: E402
from edgekit.fleet import ProfileOptions  # noqa: E402
from tests.edgekit.test_fleet import Lab  # noqa: E402

RESULTS = ROOT / "bench" / "results"
OPTIONS = ProfileOptions(prompt_len=8, new_tokens=4, warmup=0, runs=2, energy=False)


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def make_bundles(work: Path, real: bool) -> dict[str, Path]:
    from edgekit import api
    from edgekit.artifact import staging, write_manifest
    from edgekit.checkpoint import save_checkpoint
    from edgekit.models import build
    from edgekit.tokenizer import ByteTokenizer

    art = work / "v3-tiny"
    with staging(art) as tmp:
        save_checkpoint(build("v3-tiny"), tmp)
        ByteTokenizer().save(tmp)
        write_manifest(tmp, format="checkpoint", model="v3-tiny")
    out = {"stand-in": work / "v3-tiny.tar.gz"}
    package.package(art, "cpu", out["stand-in"])
    if real:
        onnx = work / "v3-tiny-onnx"
        api.export("v3-tiny", "onnx", onnx)
        out["real"] = work / "v3-tiny-onnx.tar.gz"
        package.package(onnx, "cpu", out["real"])
    return out


def measure(kind: str, bundle: Path, rounds: int, sleep: float, work: Path) -> dict:
    (work / kind).mkdir()
    lab = Lab(work / kind)
    try:
        env = {"FLEET_SLEEP": str(sleep)} if kind == "stand-in" else {}
        for n in ("d1", "d2", "d3"):
            lab.add(n, **env)
        extra = {n: {"edgekit": str(Path(sys.executable).with_name("edgekit"))} for n in ("d1", "d2", "d3")} \
            if kind == "real" else {}
        hosts = lab.fleet_toml(["d1", "d2", "d3"], **extra)
        one, three, runs = [], [], []
        for i in range(rounds):
            for names, into in ((["d1"], one), (["d1", "d2", "d3"], three)):
                t = time.perf_counter()
                r = fleet.profile(bundle, hosts, work / kind / f"out-{i}-{len(names)}", names, parallel=3,
                                  options=OPTIONS, purge=True, allow_unsigned=True)  # purge: copy every time
                into.append(time.perf_counter() - t)
                bad = [d for d in r["devices"] if d["status"] != "ok"]
                if bad:
                    return {"error": [f"{d['device']}: {d['error']}" for d in bad]}
                runs.append({"devices": len(names), "wall_s": round(into[-1], 3),
                             "uploaded": [d["uploaded"] for d in r["devices"]],
                             "seconds": {d["device"]: d["seconds"] for d in r["devices"]}})
        m1, m3 = statistics.median(one), statistics.median(three)
        return {"one_device_s": [round(x, 3) for x in one], "three_devices_s": [round(x, 3) for x in three],
                "median_one_s": round(m1, 3), "median_three_s": round(m3, 3), "ratio": round(m3 / m1, 3),
                "target": "<= 1.5", "meets_target": m3 / m1 <= 1.5, "runs": runs}
    finally:
        lab.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=3.0, help="seconds the stand-in's profile takes")
    ap.add_argument("--no-real", action="store_true", help="skip the real-edgekit configuration")
    args = ap.parse_args()
    result = {"machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                          "loadavg_before": loadavg()},
              "settings": {"rounds": args.rounds, "stand_in_sleep_s": args.sleep, "parallel": 3,
                           "profile": vars(OPTIONS)}}
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-fleet-") as td:
        work = Path(td)
        bundles = make_bundles(work, real=not args.no_real)
        for kind, bundle in bundles.items():
            print(f"{kind}: {args.rounds} rounds of 1 device then 3 devices", file=sys.stderr)
            result[kind] = measure(kind, bundle, args.rounds, args.sleep, work)
            print(f"{kind}: {result[kind].get('ratio', result[kind].get('error'))}", file=sys.stderr)
    result["machine"]["loadavg_after"] = loadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: {kk: v[kk] for kk in ("median_one_s", "median_three_s", "ratio")} for k, v in result.items()
                      if isinstance(v, dict) and "ratio" in v}, indent=1))


if __name__ == "__main__":
    main()
