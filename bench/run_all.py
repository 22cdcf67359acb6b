"""Rerun every benchmark in bench/ that writes bench/results/, one after another, and summarise.

    .venv/bin/python bench/run_all.py [--work /tmp/edgekit-bench] [--only NAME ...] [--skip NAME ...]
                                      [--quick] [--with-training] [--dry-run]

The benchmarks time things, so they run sequentially (never two at once; a lock in --work keeps a
second run_all out too). Each gets the shared --work directory where it takes one, so exports made
by one (onnx_export: the mini ONNX graphs; accuracy: the reference models' artifacts) are reused by
the next (profile_mini, peers). A script that is absent, or whose prerequisites are missing (e.g.
bench/optimum_compare.py's separate .venv-optimum), is skipped with the reason. Scripts in bench/
that mention bench/results but are not in the list below run last, with defaults.

--quick: each script's smoke-test mode (its --quick, or the quick arguments listed below, or
--rounds 1; a script with none of these is skipped). Quick runs never keep their numbers: any file
in bench/results/ a quick run changes is put back afterwards.
--with-training: also retrain the shipped reference checkpoints first (bench/train_reference.py
--force, ~18 min on the 2-core dev VM; with --quick: 10 steps into --work, the shipped ones untouched).

Exit status: 0 when every selected script succeeded (skips included), 1 otherwise; a summary table
(name, status, seconds, result files written) is printed at the end, and each script's output is
kept in WORK/logs/NAME.log.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
ARM64_ROOTFS = os.environ.get("EDGEKIT_ARM64_ROOTFS", "/work/arm64/rootfs")  # bench/arm64_check.py's default too


@dataclass(frozen=True)
class Bench:
    name: str
    script: str  # file name in bench/
    python: str | None = None  # interpreter relative to the repository root (default: this one)
    needs: tuple[str, ...] = ()  # paths relative to the repository root that must exist
    work_subdir: str | None = None  # its own directory under --work (for a script that shares nothing)
    opt_in: str | None = None  # runs only with this run_all flag (or when named in --only)
    quick_args: tuple[str, ...] = ()  # smoke-test arguments; "{quick}" becomes WORK/quick
    full_args: tuple[str, ...] = ()
    note: str = ""


REGISTRY: tuple[Bench, ...] = (
    Bench("train_reference", "train_reference.py", opt_in="--with-training", full_args=("--force",),
          quick_args=("--out", "{quick}/checkpoints", "--steps", "10", "--eval-per-cell", "1", "--force"),
          note="retrains edgekit/checkpoints/{v3,r1}-ref (the others measure them), ~18 min"),
    Bench("plan_vs_measured", "plan_vs_measured.py"),
    Bench("onnx_export", "onnx_export.py", note="exports the mini presets into --work (minutes the first time)"),
    Bench("profile_mini", "profile_mini.py", quick_args=("--quick", "--out", "{quick}/profile_mini.json")),
    Bench("accuracy", "accuracy.py", quick_args=("--per-cell", "1", "--thresholds", "0,0.5,1", "--out", "{quick}")),
    Bench("peers", "peers.py"),
    Bench("optimum_compare", "optimum_compare.py", needs=(".venv-optimum/bin/python",), work_subdir="optimum",
          note="optimum lives in its own venv: see bench/requirements-optimum.txt"),
    Bench("calibrate_skip", "calibrate_skip.py", work_subdir="calibrate_skip",
          quick_args=("--steps", "20", "--no-export")),
    Bench("build_time", "build_time.py", needs=(".venv-genai/bin/python",),
          note="ORT-GenAI's builder lives in its own venv: see bench/requirements-genai.txt"),
    Bench("export_scale", "export_scale.py", opt_in="--only export_scale",
          note="full-size exports up to r1-8.5b: ~30 min, up to 15 GiB RSS"),
    Bench("export_scale_hf", "export_scale_hf.py", opt_in="--only export_scale_hf",
          note="the 7B Hugging Face shape: ~15 min, 14 GiB RSS"),
    Bench("gpu_check", "gpu_check.py", needs=("/dev/nvidiactl",), note="an NVIDIA GPU and onnxruntime-gpu",
          quick_args=("--parts", "machine,ceilings")),
    Bench("arm64_check", "arm64_check.py", opt_in="--only arm64_check", needs=(f"{ARM64_ROOTFS}/usr/bin/python3.11",),
          note="ONNX Runtime's aarch64 build under qemu-user, ~10 min: make the arm64 rootfs with "
               "scripts/arm64_rootfs.sh (or point $EDGEKIT_ARM64_ROOTFS at one)"),
)


@dataclass
class Planned:
    bench: Bench
    command: list[str] = field(default_factory=list)
    skip: str | None = None  # why it does not run


def script_flags(path: Path) -> set[str]:
    """The long options a script's argparse declares (read from its source; nothing is imported)."""
    text = path.read_text(errors="replace")
    return set(re.findall(r"add_argument\(\s*[\"'](--[a-z0-9][a-z0-9-]*)[\"']", text))


def writes_results(path: Path) -> bool:
    text = path.read_text(errors="replace")
    return "results" in text and "add_argument" in text


def discover(bench_dir: Path = BENCH, registry: tuple[Bench, ...] = REGISTRY) -> list[Bench]:
    """The registry, then any other bench/*.py that looks like a benchmark writing results/."""
    known = {b.script for b in registry} | {Path(__file__).name}
    extra = [Bench(p.stem, p.name) for p in sorted(bench_dir.glob("*.py"))
             if p.name not in known and not p.name.startswith("_") and writes_results(p)]
    return [*registry, *extra]


def plan(benches: list[Bench], *, only: list[str], skip: list[str], quick: bool, with_training: bool,
         work: Path, bench_dir: Path = BENCH, root: Path = ROOT, python: str = sys.executable) -> list[Planned]:
    """What would run, in order, with which command; or why not. Raises ValueError on an unknown name."""
    names = [b.name for b in benches]
    for n in [*only, *skip]:
        if n not in names:
            raise ValueError(f"unknown benchmark '{n}' (known: {', '.join(names)})")
    out = []
    for b in benches:
        p = Planned(b)
        out.append(p)
        path = bench_dir / b.script
        if only and b.name not in only:
            p.skip = "not in --only"
            continue
        if b.name in skip:
            p.skip = "--skip"
            continue
        if b.opt_in and b.name not in only and not (b.opt_in == "--with-training" and with_training):
            p.skip = f"only with {b.opt_in}" + (f" ({b.note})" if b.note else "")
            continue
        if not path.is_file():
            p.skip = f"bench/{b.script} does not exist (yet)"
            continue
        interp = python
        if b.python:
            interp = str(root / b.python)
            if not Path(interp).is_file():
                p.skip = f"prerequisite missing: {b.python}" + (f" ({b.note})" if b.note else "")
                continue
        missing = [n for n in b.needs if not (root / n).exists()]
        if missing:
            p.skip = f"prerequisite missing: {', '.join(missing)}" + (f" ({b.note})" if b.note else "")
            continue
        flags = script_flags(path)
        args = ["--work", str(work / b.work_subdir if b.work_subdir else work)] if "--work" in flags else []
        quick_dir = str(work / "quick")
        if quick:
            wanted = [a for a in b.quick_args if a.startswith("--")]
            if b.quick_args and all(f in flags for f in wanted):
                args += [a.replace("{quick}", quick_dir) for a in b.quick_args]
            elif "--quick" in flags:
                args.append("--quick")
            elif "--rounds" in flags:
                args += ["--rounds", "1"]
            else:
                p.skip = "no quick mode (no --quick or --rounds)"
                continue
        else:
            args += [a for a in b.full_args if not a.startswith("--") or a in flags]
        if b.name == "profile_mini" and not quick and "--onnx-int8" in flags:
            dirs = [_onnx_int8(work, m) for m in ("r1-mini", "v3-mini")]
            if all(dirs):  # the mini int8 graphs onnx_export (or peers) left in --work
                args += ["--onnx-int8", *map(str, dirs)]
        p.command = [interp, str(path), *args]
    return out


def _onnx_int8(work: Path, model: str) -> Path | None:
    for name in (f"{model}-int8", f"{model}-onnx-int8"):
        if (work / name / "manifest.json").is_file():
            return work / name
    return None


def snapshot(directory: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} if directory.is_dir() else {}


@contextlib.contextmanager
def results_restored(directory: Path):
    """Put back any file in `directory` the block changed, and remove the ones it created."""
    before = snapshot(directory)
    try:
        yield
    finally:
        for p in (p for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else ():
            if p not in before:
                p.unlink()
        for p, data in before.items():
            if not p.is_file() or p.read_bytes() != data:
                p.write_bytes(data)


@contextlib.contextmanager
def exclusive(work: Path):
    """One run_all at a time per --work (they time things)."""
    import fcntl

    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".run_all.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another bench/run_all.py is running with --work {work}") from None
        yield


def run_one(p: Planned, log_dir: Path) -> tuple[int, float]:
    """Run it with output both on this terminal and in LOG_DIR/NAME.log; (exit status, seconds)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log_dir / f"{p.bench.name}.log", "w") as logf:
        logf.write(" ".join(p.command) + "\n")
        proc = subprocess.Popen(p.command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            logf.write(line)
        rc = proc.wait()
    return rc, time.perf_counter() - t


def changed(before: dict[Path, float], directory: Path) -> list[str]:
    now = {p: p.stat().st_mtime for p in directory.glob("*") if p.is_file()}
    return sorted(p.name for p, m in now.items() if before.get(p) != m)


def summary(rows: list[tuple[str, str, float | None, list[str]]]) -> str:
    lines = ["| benchmark | status | seconds | results written |", "|---|---|---|---|"]
    for name, status, secs, files in rows:
        lines.append(f"| {name} | {status} | {'' if secs is None else f'{secs:.0f}'} | {', '.join(files) or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-bench"),
                    help="shared directory for exports and logs, passed to every script that takes --work")
    ap.add_argument("--only", action="append", default=[], metavar="NAME", help="run only these (repeatable)")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME", help="do not run these (repeatable)")
    ap.add_argument("--quick", action="store_true", help="smoke-test modes; results/ is left as it was")
    ap.add_argument("--with-training", action="store_true",
                    help="also rerun bench/train_reference.py first (rewrites the shipped checkpoints, ~18 min)")
    ap.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    try:
        planned = plan(discover(), only=args.only, skip=args.skip, quick=args.quick,
                       with_training=args.with_training, work=work)
    except ValueError as e:
        ap.error(str(e))
    for p in planned:
        print(f"{p.bench.name:18} " + (f"skip: {p.skip}" if p.skip else " ".join(p.command)), flush=True)
    if args.dry_run:
        return 0

    rows, failed = [], False
    with exclusive(work):
        for p in planned:
            if p.skip:
                rows.append((p.bench.name, f"skipped: {p.skip}", None, []))
                continue
            if p.bench.name == "profile_mini" and not args.quick and "--onnx-int8" not in p.command:
                # onnx_export may have just made the mini int8 graphs: plan this one again
                p = plan([p.bench], only=[], skip=[], quick=False, with_training=True, work=work)[0]
            print(f"\n=== {p.bench.name}: {' '.join(p.command)}  (load average {os.getloadavg()[0]:.2f})",
                  flush=True)
            before = {q: q.stat().st_mtime for q in RESULTS.glob("*") if q.is_file()}
            guard = results_restored(RESULTS) if args.quick else contextlib.nullcontext()
            with guard:
                rc, secs = run_one(p, work / "logs")
                files = changed(before, RESULTS)
            status = "ok" if rc == 0 else f"FAILED (exit {rc}; log {work / 'logs' / (p.bench.name + '.log')})"
            failed |= rc != 0
            if args.quick and files:
                status += " (quick: results/ restored)"
            rows.append((p.bench.name, status, secs, files))
    print("\n" + summary(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
