"""bench/run_all.py: which scripts run, with which arguments, in which order (nothing is run)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


run_all = load("run_all")
Bench = run_all.Bench


@pytest.fixture
def bench_dir(tmp_path):
    d = tmp_path / "bench"
    d.mkdir()
    (d / "a.py").write_text('ap.add_argument("--work")\nap.add_argument("--rounds", type=int)\n# results/\n')
    (d / "b.py").write_text('ap.add_argument("--quick", action="store_true")\n')
    (d / "c.py").write_text('ap.add_argument("--out")\n')  # no quick mode
    (d / "t.py").write_text('ap.add_argument("--force")\nap.add_argument("--out")\n')
    (d / "extra.py").write_text('ap.add_argument("--x")\nout = "bench/results/extra.json"\n')
    (d / "helper.py").write_text("def f(): pass\n")  # not a benchmark
    return d


REG = (Bench("t", "t.py", opt_in="--with-training", full_args=("--force",), quick_args=("--out", "{quick}/ck")),
       Bench("a", "a.py"), Bench("b", "b.py"), Bench("c", "c.py"), Bench("missing", "missing.py"),
       Bench("venv", "b.py", python=".venv-other/bin/python"),
       Bench("needs", "a.py", needs=(".venv-x/bin/python",), work_subdir="own"))


def plan(bench_dir, **kw):
    opts = dict(only=[], skip=[], quick=False, with_training=False, work=Path("/w"), python="py")
    opts.update(kw)
    benches = run_all.discover(bench_dir, REG)
    return {p.bench.name: p for p in run_all.plan(benches, bench_dir=bench_dir, root=bench_dir.parent, **opts)}


def test_default_selection_and_commands(bench_dir):
    p = plan(bench_dir)
    assert list(p) == ["t", "a", "b", "c", "missing", "venv", "needs", "extra"]  # registry order, then discovered
    assert "--with-training" in p["t"].skip
    assert p["a"].command == ["py", str(bench_dir / "a.py"), "--work", "/w"]
    assert p["b"].command == ["py", str(bench_dir / "b.py")]
    assert "does not exist" in p["missing"].skip
    assert ".venv-other" in p["venv"].skip
    assert p["needs"].skip.startswith("prerequisite missing: .venv-x/bin/python")
    assert p["extra"].command == ["py", str(bench_dir / "extra.py")]
    assert all(not p[n].skip for n in ("a", "b", "c", "extra"))


def test_only_skip_and_training(bench_dir):
    p = plan(bench_dir, only=["a", "t"])
    assert [n for n, x in p.items() if not x.skip] == ["t", "a"]  # --only names training explicitly
    assert p["t"].command[-1] == "--force"
    p = plan(bench_dir, skip=["a"], with_training=True)
    assert p["a"].skip == "--skip" and not p["t"].skip
    with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
        plan(bench_dir, only=["nope"])


def test_quick_modes(bench_dir):
    p = plan(bench_dir, quick=True, with_training=True)
    assert p["a"].command[2:] == ["--work", "/w", "--rounds", "1"]
    assert p["b"].command[2:] == ["--quick"]
    assert p["c"].skip.startswith("no quick mode")
    assert p["t"].command[2:] == ["--out", "/w/quick/ck"]  # never the shipped checkpoints


def test_venv_interpreter_used_when_present(bench_dir):
    py = bench_dir.parent / ".venv-other" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text("")
    assert plan(bench_dir)["venv"].command[0] == str(py)
    (bench_dir.parent / ".venv-x" / "bin").mkdir(parents=True)
    (bench_dir.parent / ".venv-x" / "bin" / "python").write_text("")
    assert plan(bench_dir)["needs"].command[2:] == ["--work", "/w/own"]  # its own corner of --work


def test_real_registry_plans():
    benches = run_all.discover()
    assert "run_all" not in [b.name for b in benches]
    for p in run_all.plan(benches, only=[], skip=[], quick=False, with_training=False, work=Path("/w")):
        exists = (ROOT / "bench" / p.bench.script).is_file()
        assert p.skip or (exists and p.command), p.bench.name  # an absent script is skipped, never run
        if not exists:
            assert "does not exist" in p.skip or p.bench.opt_in


def test_results_restored(tmp_path):
    d = tmp_path / "results"
    d.mkdir()
    (d / "keep.json").write_text("old")
    with run_all.results_restored(d):
        (d / "keep.json").write_text("new")
        (d / "made.json").write_text("x")
    assert (d / "keep.json").read_text() == "old" and not (d / "made.json").exists()


def test_summary_and_dry_run(capsys):
    text = run_all.summary([("a", "ok", 1.2, ["a.json"]), ("b", "skipped: x", None, [])])
    assert "| a | ok | 1 | a.json |" in text and "| b | skipped: x |  | - |" in text
    assert run_all.main(["--dry-run", "--only", "peers"]) == 0
    out = capsys.readouterr().out
    assert "peers.py" in out and "skip: not in --only" in out


def test_run_one_reports_failure_and_keeps_the_log(tmp_path, capsys):
    p = run_all.Planned(Bench("boom", "boom.py"),
                        command=[sys.executable, "-c", "import sys; print('hello'); sys.exit(3)"])
    rc, secs = run_all.run_one(p, tmp_path / "logs")
    assert rc == 3 and secs >= 0
    assert "hello" in (tmp_path / "logs" / "boom.log").read_text() and "hello" in capsys.readouterr().out


def test_main_exits_nonzero_when_a_script_fails(tmp_path, monkeypatch, capsys):
    ok = run_all.Planned(Bench("fine", "fine.py"), command=[sys.executable, "-c", "pass"])
    bad = run_all.Planned(Bench("boom", "boom.py"), command=[sys.executable, "-c", "raise SystemExit(2)"])
    gone = run_all.Planned(Bench("gone", "gone.py"), skip="bench/gone.py does not exist (yet)")
    monkeypatch.setattr(run_all, "plan", lambda *a, **k: [ok, bad, gone])
    monkeypatch.setattr(run_all, "RESULTS", tmp_path / "results")
    assert run_all.main(["--work", str(tmp_path / "w")]) == 1
    out = capsys.readouterr().out
    assert "| fine | ok |" in out and "| boom | FAILED (exit 2" in out and "| gone | skipped: bench/gone.py" in out
    monkeypatch.setattr(run_all, "plan", lambda *a, **k: [ok, gone])
    assert run_all.main(["--work", str(tmp_path / "w")]) == 0
