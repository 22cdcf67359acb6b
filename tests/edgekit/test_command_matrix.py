"""Every read-only command x every kind of MODEL: it works, or it is one line `error: ... (fix)` and exit 1 —
never a traceback (issue 13: `edgekit profile HF_DIR` used to end in KeyError 'hf-qwen2')."""

from __future__ import annotations

import json

import pytest
from hf_tiny import save_model, write_tokenizer

FAST_PROFILE = ("--prompt-len", "4", "--new-tokens", "2", "--runs", "1", "--warmup", "0")
COMMANDS = {
    "info": ("info", "{m}"),
    "plan": ("plan", "{m}", "--device", "jetson-orin-nano-8gb"),
    "generate": ("generate", "{m}", "--prompt", "the edge", "--max-new-tokens", "2"),
    "profile": ("profile", "{m}", *FAST_PROFILE),
}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory, onnx_v3_tiny):
    hf = tmp_path_factory.mktemp("matrix") / "qwen2"
    hf.mkdir()
    save_model(hf, "qwen2")
    write_tokenizer(hf)
    return {"preset": "r1-tiny", "checkpoint": "v3-ref", "hf": str(hf), "onnx": str(onnx_v3_tiny)}


@pytest.mark.parametrize("kind", ["preset", "checkpoint", "hf", "onnx"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_works_or_is_one_line(command, kind, kinds, cli):
    args = [a.format(m=kinds[kind]) for a in COMMANDS[command]]
    code, out, err = cli(*args, "--json")
    assert "Traceback" not in err, err[-2000:]
    if code == 0:
        assert isinstance(json.loads(out), dict), f"{command} on a {kind}: {out[:200]}"
    else:
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "(" in err, err
    # every pair works today: a regression to a refusal is a defect too
    assert code == 0, (command, kind, err)
