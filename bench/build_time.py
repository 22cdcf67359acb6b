"""Issue 14's build-time target, side by side: `edgekit export HF --format onnx --int8` (export, fusion, int8,
validation against PyTorch, perplexity gate) and ONNX Runtime GenAI's model builder (`-p int8 -e cpu`, its own
venv) on SmolLM2-135M-Instruct, fresh builds alternated (GenAI, edgekit, GenAI, edgekit, ...) so both see the same
machine load; wall and CPU seconds per build, the 1-minute load average before and after each. The commands and
the HF directory are bench/real_model.py's (its --work directory is reused for the GGUF and the HF directory).

    PYTHONPATH=$PWD .venv/bin/python bench/build_time.py [--rounds 2] [--work /tmp/edgekit-real-model]

Writes bench/results/build_time.json (the ratio is the median edgekit build over the median GenAI build).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import real_model as rm  # noqa: E402

RESULTS = HERE / "results" / "build_time.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-real-model"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--genai-venv", type=Path, default=rm.GENAI_VENV)
    ap.add_argument("--hf-dir", type=Path, default=None, help="a ready HF directory (default: made from the GGUF)")
    args = ap.parse_args()
    sys.path.insert(0, str(rm.ROOT))
    os.environ.setdefault("EDGEKIT_QUIET", "1")
    py = rm.venv_python(args.genai_venv, "genai", "import onnxruntime_genai, onnxruntime, torch")
    w = args.work
    logs = w / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    hf = args.hf_dir or w / "hf"
    if not args.hf_dir:
        rm.gguf_to_hf_dir(rm.find_gguf(w), hf)
    rows = []
    for r in range(args.rounds):
        for kind in ("genai", "edgekit"):
            out = w / f"build-{kind}"
            shutil.rmtree(out, ignore_errors=True)
            builds = rm.Builds(w / f"build-time-{kind}.json")  # never reused: the output was just deleted
            before = rm.loadavg()
            rec = (rm.genai_build(py, hf, out, builds, logs) if kind == "genai"
                   else rm.edgekit_build(hf, out, True, builds, logs))
            row = {"round": r, "builder": kind, "seconds": rec["seconds"], "cpu_seconds": rec["cpu_seconds"],
                   "refused": rec["refused"], "load_before": before, "load_after": rm.loadavg()}
            if kind == "edgekit" and not rec["refused"]:
                m = json.loads((out / "manifest.json").read_text())
                row["perplexity_increase"] = m["validation"]["int8"]["perplexity"]["increase"]
                row["GroupQueryAttention"] = m["fusion"]["GroupQueryAttention"]
            rows.append(row)
            rm.log(json.dumps(row))
            shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(x["seconds"] for x in rows if x["builder"] == k) for k in ("genai", "edgekit")}
    cpu = {k: statistics.median(x["cpu_seconds"] for x in rows if x["builder"] == k) for k in ("genai", "edgekit")}
    data = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "model": "SmolLM2-135M-Instruct",
            "rows": rows, "median_seconds": med, "median_cpu_seconds": cpu,
            "edgekit_over_genai": round(med["edgekit"] / med["genai"], 2),
            "edgekit_over_genai_cpu": round(cpu["edgekit"] / cpu["genai"], 2)}
    RESULTS.write_text(json.dumps(data, indent=1))
    print(json.dumps({k: data[k] for k in ("median_seconds", "median_cpu_seconds", "edgekit_over_genai",
                                           "edgekit_over_genai_cpu")}))


if __name__ == "__main__":
    main()
