"""bench/accuracy.py end to end on the tiny presets, one problem per (task, level), reusing the
session's ONNX exports (no new export; the numbers themselves are random-weight noise)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = accuracy
spec.loader.exec_module(accuracy)


def test_accuracy_bench_runs_on_tiny_presets(tmp_path, onnx_r1_tiny, onnx_r1_tiny_int8):
    work = tmp_path / "work"
    work.mkdir()
    (work / "r1-tiny-onnx-fp32").symlink_to(onnx_r1_tiny)
    (work / "r1-tiny-onnx-int8").symlink_to(onnx_r1_tiny_int8)
    out = tmp_path / "results"
    # R1 only (V3 takes the same path without gates): the four variants, agreement, a two-point sweep
    result = accuracy.main(["--per-cell", "1", "--models", "r1-tiny", "--work", str(work),
                            "--thresholds", "0,1", "--sweep", "onnx-int8", "--out", str(out)])
    assert json.loads((out / "accuracy.json").read_text())["n_problems"] == 15
    assert (out / "accuracy.png").stat().st_size > 0
    m = result["models"]["r1-tiny"]
    assert sorted(m["variants"]) == sorted(accuracy.VARIANTS)
    assert sorted(m["agreement"]) == ["onnx-fp32", "onnx-int8", "torch-int8"]
    for v in m["variants"].values():
        assert v["overall"]["n"] == 15 and v["teacher_forced_exact_match"] == v["overall"]["accuracy"]
    positions = sum(len(p.answer_ids()) for p in accuracy.tasks.test_split(1))
    assert m["agreement"]["onnx-int8"]["overall"]["positions"] == positions
    assert "gate_agreement" in m["agreement"]["onnx-int8"]["overall"]
    sweep = {r["threshold"]: r for r in m["threshold_sweep"]["onnx-int8"]}
    assert sweep[0.0]["overall"]["skipped_per_call"] == 0.0  # threshold 0 runs every layer
    assert sweep[1.0]["overall"]["skipped_per_call"] == 1.0  # a gate score (a sigmoid) is below 1
    assert set(result["claims"]) == {"int8_loses_under_2_points", "r1_skips_40pct_on_easy_keeping_95pct"}
