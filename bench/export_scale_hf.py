"""Issue 18's 7B-class Hugging Face row: `edgekit export bench/configs/deepseek-r1-distill-qwen-7b --int8
--random-weights` (the published DeepSeek-R1-Distill-Qwen-7B config.json, no weights: seeded random tensors at the
model's init scale, streamed through the 2-layer stamped template, validated against PyTorch one decoder layer at a
time), then a few greedy tokens decoded from the artifact through ONNX Runtime (edgekit's runner, token ids: the
directory has no tokenizer). Wall time and peak RSS (psutil over the process tree, export_scale.run_measured) per
step, `uptime` with each. Run it under the heavy-job lock (the artifact is ~8 GB, loaded whole by ONNX Runtime):

    flock /work/scratch/heavy.lock env PYTHONPATH=$PWD .venv/bin/python bench/export_scale_hf.py [--work DIR] [--keep]
    # adopt an export already run by hand under /usr/bin/time -v (then only decode):
    ... bench/export_scale_hf.py --adopt ARTIFACT:TIME_LOG

Writes bench/results/export_scale_hf.json. The artifact is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from export_scale import run_measured, uptime  # noqa: E402

CONFIG = HERE / "configs" / "deepseek-r1-distill-qwen-7b"
RESULTS = HERE / "results" / "export_scale_hf.json"
PROMPT = [151646, 785, 6722, 315, 9625, 374]  # token ids (any in-vocabulary ids: the weights are random)


def params() -> dict:
    import numpy as np

    from exporters.onnx_hf_stamp import hf_config, shapes

    s = shapes(hf_config(CONFIG))
    layers = sum(int(np.prod(v)) for n, v in s.items() if ".layers." in n)
    return {"total": sum(int(np.prod(v)) for v in s.values()), "per_layer": layers // 28, "tensors": len(s)}


def summarize(r: dict, wall: float, peak: float, before: str, after: str, out: Path) -> dict:
    st = r["streamed"]
    v = r["validation"].get("streamed") or r["validation"].get("int8") or {}
    return {"case": "deepseek-r1-distill-qwen-7b-int8-random", "params": params(), "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak, 2), "export_peak_rss_gib": st.get("peak_rss_gib"),
            "template_peak_rss_gib": st.get("template_peak_rss_gib"), "trace_s": st.get("trace_s"),
            "stamp_s": st.get("stamp_s"), "export_s": st.get("total_s"),
            "artifact_gib": round(sum(p.stat().st_size for p in out.glob("model.onnx*")) / 2**30, 3),
            "graph_ops": r["graph_ops"], "quantization": {k: r["quantization"].get(k) for k in
                                                          ("block", "weights_quantized", "GatherBlockQuantized")},
            "validation": {k: v.get(k) for k in ("reference", "logit_cosine_min", "passed", "cases")},
            "uptime_before": before, "uptime_after": after}


def export(work: Path) -> tuple[dict, Path]:
    out = work / "qwen7b-int8"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEKIT_QUIET": "1"}
    before = uptime()
    proc, wall, peak = run_measured([sys.executable, "-m", "edgekit.cli", "export", str(CONFIG), "--format", "onnx",
                                     "--int8", "--random-weights", "--out", str(out), "--json"], env)
    if proc.returncode != 0:
        raise SystemExit(f"export failed: {proc.stderr[-2000:]}")
    return summarize(json.loads(proc.stdout), wall, peak, before, uptime(), out), out


def adopt(spec: str) -> tuple[dict, Path]:
    """ARTIFACT:TIME_LOG: an export run by hand under /usr/bin/time -v (wall clock, max RSS from its log)."""
    art, _, log = spec.partition(":")
    text = Path(log).read_text()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1).split(":")
    wall = sum(float(x) * 60 ** i for i, x in enumerate(reversed(m)))
    from edgekit.artifact import read_manifest

    up = Path(log).with_suffix(".uptime")
    lines = up.read_text().strip().splitlines() if up.is_file() else ["", ""]
    row = summarize(read_manifest(Path(art)), wall, rss_kb / 2**20, lines[0], lines[-1], Path(art))
    row["measured_by"] = "/usr/bin/time -v (the python process's max RSS)"
    return row, Path(art)


def decode_worker(artifact: Path, tokens: int) -> None:
    """In a subprocess: load the artifact with edgekit's ONNX Runtime runner, prefill PROMPT, decode `tokens` greedily
    on the cache; prints JSON."""
    import numpy as np

    from edgekit.resolve import resolve
    from edgekit.spec import DecoderSpec
    from runtimes.onnxruntime import OnnxRuntimeRunner

    res = resolve(artifact)
    spec = DecoderSpec(res.cfg)
    t0 = time.monotonic()
    with OnnxRuntimeRunner(res) as runner:
        load_s = time.monotonic() - t0
        feeds = spec.dummy(1, len(PROMPT), 0)
        feeds["input_ids"] = np.array([PROMPT], np.int64)
        ids, steps = [], []
        for _ in range(tokens + 1):
            t = time.monotonic()
            out = runner.infer(feeds)
            steps.append(time.monotonic() - t)
            nxt = int(out["logits"][0, -1].argmax())
            ids.append(nxt)
            past = {p: out[q] for p, q in zip(spec.past_names(), spec.present_names())}
            total = past[spec.past_names()[0]].shape[2] + 1
            feeds = {"input_ids": np.array([[nxt]], np.int64), "attention_mask": np.ones((1, total), np.int64), **past}
    print(json.dumps({"load_s": round(load_s, 1), "prefill_s": round(steps[0], 2),
                      "decode_step_s": [round(s, 2) for s in steps[1:]], "tokens": ids[1:tokens + 1],
                      "first_token": ids[0], "finite": bool(np.isfinite(out["logits"]).all())}))


def decode(artifact: Path, tokens: int = 4) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEKIT_QUIET": "1"}
    before = uptime()
    proc, wall, peak = run_measured([sys.executable, str(Path(__file__).resolve()), "--decode-worker", str(artifact),
                                     "--tokens", str(tokens)], env)
    if proc.returncode != 0:
        raise SystemExit(f"decode failed: {proc.stderr[-2000:]}")
    return {"case": "deepseek-r1-distill-qwen-7b-int8-decode", "new_tokens": tokens, "wall_s": round(wall, 1),
            "peak_rss_gib": round(peak, 2), **json.loads(proc.stdout.strip().splitlines()[-1]),
            "uptime_before": before, "uptime_after": uptime()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ek-scale-hf"))
    ap.add_argument("--adopt", help="ARTIFACT:TIME_LOG of an export run by hand")
    ap.add_argument("--keep", action="store_true", help="keep the ~8 GB artifact (default: deleted)")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--decode-worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.decode_worker:
        return decode_worker(args.decode_worker, args.tokens)
    import psutil

    row, art = adopt(args.adopt) if args.adopt else export(args.work)
    print(json.dumps(row), flush=True)
    rows = [row, decode(art, args.tokens)]
    print(json.dumps(rows[1]), flush=True)
    RESULTS.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                               "mem_gib": round(psutil.virtual_memory().total / 2**30, 1)},
                                   "config": str(CONFIG.relative_to(ROOT)), "rows": rows}, indent=1))
    if not args.keep:
        shutil.rmtree(art, ignore_errors=True)


if __name__ == "__main__":
    main()
