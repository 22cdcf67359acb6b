"""Where an exported decoder's decode step spends its time: ONNX Runtime's profiler (SessionOptions.enable_profiling)
over decode steps on a 128-token cache, aggregated by op type; nodes inside If branches are counted as such.

Shares of one profiled run are what this reports (this machine is shared: a wall-clock comparison across runs is not
trustworthy, a fraction of one run is). Used for issue 14's "If overhead" and r1-mini int8 notes (bench/README.md).

    .venv/bin/python bench/onnx_decode_profile.py LABEL=ARTIFACT_DIR [...] [--threads 1] [--steps 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGEKIT_QUIET", "1")

from edgekit.config import ModelConfig  # noqa: E402
from edgekit.spec import DecoderSpec  # noqa: E402
from exporters.onnx import MODEL_FILE  # noqa: E402

PROMPT = 128


def branch_nodes(path: Path) -> set[str]:
    """Names of the nodes inside If branches."""
    import onnx

    from exporters.onnx_graph import iter_graphs

    model = onnx.load(str(path), load_external_data=False)
    return {n.name for where, g in iter_graphs(model.graph) if where != "main" for n in g.node}


def profile(art: Path, threads: int, steps: int) -> dict:
    """Per decode step (the prefill and the first decode step left out): node count, the model_run time, the time
    of the nodes by op type (an If counts only its own overhead: its branch's nodes are counted by their type)."""
    import onnxruntime as ort

    spec = DecoderSpec(ModelConfig.from_dict(json.loads((art / "config.json").read_text())))
    inside = branch_nodes(art / MODEL_FILE)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "decode")
        sess = ort.InferenceSession(str(art / MODEL_FILE), so, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        feeds = spec.dummy(1, PROMPT, 0, seed=0)
        out = dict(zip(names, sess.run(None, feeds)))
        for i in range(steps + 1):
            feeds = {**feeds, "input_ids": np.array([[i + 1]], np.int64),
                     "attention_mask": np.ones((1, PROMPT + i + 1), np.int64)}
            for past, present in zip(spec.past_names(), spec.present_names()):
                feeds[past] = out[present]
            out = dict(zip(names, sess.run(None, feeds)))
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"][2:]
    t0, t1 = runs[0]["ts"], runs[-1]["ts"] + runs[-1]["dur"]
    by_op, count = collections.Counter(), collections.Counter()
    branch_us = if_us = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or not t0 <= e["ts"] <= t1:
            continue
        op, us = e["args"].get("op_name", "?"), e["dur"] / len(runs)
        count[op] += 1 / len(runs)
        if op == "If":
            if_us += us
            continue
        by_op[op] += us
        if e["name"][:-len("_kernel_time")] in inside:
            branch_us += us
    total = sum(by_op.values())
    if_own = max(0.0, if_us - branch_us)  # the If kernels' own time: inclusive time less their branches' nodes
    by_op["If (own)"] = if_own
    total += if_own
    return {"steps": len(runs), "nodes_per_step": round(sum(count.values())),
            "model_run_us": round(sum(r["dur"] for r in runs) / len(runs)), "node_us": round(total),
            "share_by_op": {op: round(us / total, 4) for op, us in by_op.most_common()},
            "count_by_op": {op: round(c) for op, c in count.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifacts", nargs="+", help="LABEL=DIR of exported ONNX artifacts")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = {"settings": {"prompt_tokens": PROMPT, "threads": args.threads, "steps": args.steps},
              "load": os.getloadavg()[0], "profiles": {}}
    for spec in args.artifacts:
        label, _, path = spec.partition("=")
        p = result["profiles"][label] = profile(Path(path), args.threads, args.steps)
        top = ", ".join(f"{op} {100 * s:.1f}%" for op, s in list(p["share_by_op"].items())[:8])
        print(f"{label}: {p['nodes_per_step']} nodes/step; {top}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
