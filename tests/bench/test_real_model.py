"""bench/real_model.py's workers on a tiny fused Llama (no peers, no timing asserted): edgekit's worker runs the
artifact through edgekit's own runner (fused-branch session, shared KV cache) and answers what the plain
onnxruntime worker answers for the same file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torch")

from hf_tiny import save_model, write_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "real_model.py"


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    from edgekit import api

    root = tmp_path_factory.mktemp("real_model")
    save_model(root / "llama", "llama")
    write_tokenizer(root / "llama")
    api.export(root / "llama", "onnx", root / "fused")
    return root / "fused"


def _ask(kind: str, model: Path, requests: list[dict]) -> list[dict]:
    lines = "".join(json.dumps(r) + "\n" for r in [*requests, {"op": "quit"}])
    out = subprocess.run([sys.executable, str(SCRIPT), "--worker", kind, str(model), "1"], input=lines,
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    replies = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
    assert all(r["ok"] for r in replies), replies
    return replies


def test_edgekit_worker_runs_the_runner_and_matches_a_plain_session(fused):
    from runtimes import open_runner

    prompt, n = [0, 5, 9, 17, 42, 3, 8], 6
    window = list(range(2, 40))
    asks = [{"op": "info"}, {"op": "speed", "threads": 1, "prompt": prompt, "decode": n},
            {"op": "ppl", "windows": [window]}]
    info, speed, ppl = _ask("edgekit", fused, asks)
    _, plain_speed, plain_ppl = _ask("ort", fused / "model.onnx", asks)
    assert info["runner"]["fused_session"] and info["runner"]["shared_cache"]
    with open_runner(fused) as r:
        assert speed["tokens"] == plain_speed["tokens"] == r.generate(prompt, n).tokens
    assert len(speed["decode_step_s"]) == n and speed["prefill_s"] > 0
    # the fused branch's own session computes what the whole model computes through its If, bit for bit
    assert ppl["argmax"] == plain_ppl["argmax"] and ppl["nll"] == plain_ppl["nll"]


def test_an_unknown_variant_is_one_line():
    out = subprocess.run([sys.executable, str(SCRIPT), "--only", "edgekit int9", "--skip-peers"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "unknown variant(s) ['edgekit int9']" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
