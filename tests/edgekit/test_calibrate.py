"""calibrate-skip: post-hoc skip gates for Hugging Face models (tiny random configs built in code, no
downloads). One qwen2 model is calibrated through the CLI and exported once (2 gated layers = 2 If
nodes, the expensive part); llama and deepseek_v3 are checked in PyTorch only."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")

from hf_tiny import WORDS as _WORDS  # noqa: E402
from hf_tiny import save_model, write_tokenizer  # noqa: E402

from edgekit import api, calibrate  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402

WORDS = [w for w in _WORDS if w not in ("user", "assistant")]  # the calibration vocabulary

SEQ = 16
NONE, ALL = 0.0, 1e9  # thresholds: nothing skipped (r_hat > 0 always), everything skipped


def _hf_dir(root, arch: str):
    """A tiny random model directory (weights std 0.2 so layers differ clearly) with a word-level tokenizer."""
    d = root / arch
    save_model(d, arch)
    write_tokenizer(d, words=WORDS, special=False)
    return d


def _text(path, n=1200, seed=0):
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(rng.choice(WORDS[3:], n)) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(HF dir, calibration text, gated dir written by the CLI, CLI stdout, ONNX artifact of the gated dir)."""
    root = tmp_path_factory.mktemp("calib")
    d = _hf_dir(root, "qwen2")
    data = _text(root / "cal.txt")
    gated = root / "gated"
    code, out, err = _cli("calibrate-skip", d, "--data", data, "--out", gated, "--seq-len", SEQ)
    assert code == 0, err
    art = root / "onnx"
    api.export(gated, "onnx", art)
    return d, data, gated, out, art


def _cli(*args):
    import contextlib
    import io
    import sys

    from edgekit import cli as cli_module

    out, err = io.StringIO(), io.StringIO()
    code = 0
    argv, sys.argv = sys.argv, ["edgekit", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_module.main()
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def _thr(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_checkpoint_files_links_and_stats(qwen):
    d, data, gated, out, _ = qwen
    assert "wrote" in out and "2 gated layers" in out
    names = sorted(p.name for p in gated.iterdir())
    assert names == ["config.json", "generation_config.json", "logs", "model.safetensors", "skip_gates.json",
                     "skip_gates.safetensors", "tokenizer.json"]
    assert [p.name for p in (gated / "logs").iterdir()] == ["calibrate.log"]  # third-party output, not the terminal
    assert os.path.samefile(gated / "model.safetensors", d / "model.safetensors")  # hard link, no copy
    assert not [p for p in gated.parent.iterdir() if p.name.endswith(".partial")]
    stats = json.loads((gated / "skip_gates.json").read_text())
    assert stats["gated_layers"] == [0, 1] and stats["weights"] == {"model.safetensors": "hard-link"}
    curve = stats["curve"]
    assert curve[0]["threshold"] == 0.0 and curve[0]["layers_skipped_mean"] == 0
    assert curve[-1]["layers_skipped_mean"] == 2  # the last candidate skips every gated layer here
    assert stats["default_threshold"] in [c["threshold"] for c in curve]
    info = api.model_info(gated)
    assert info["kind"] == "hf" and list(info["config"]["gated_layers"]) == [0, 1]
    assert info["config"]["default_threshold"] == stats["default_threshold"]


def test_measured_contribution_matches_transformers_hidden_states(qwen):
    """r_mean in the stats = mean ||h_out - h_in|| / ||h_in|| per token of transformers' own layers on
    the held-out chunks (recomputed here with forward hooks on the reference model)."""
    from edgekit.hfconfig import HFTokenizer, read_hf_config

    d, data, gated, _, _ = qwen
    stats = json.loads((gated / "skip_gates.json").read_text())
    ids = HFTokenizer(d, read_hf_config(d)).encode(data.read_text())
    chunks = calibrate.chunks_of(ids, SEQ, 65536)
    held = chunks[-stats["calibration"]["eval_chunks"]:]
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, use_safetensors=True).eval()
    rs = {0: [], 1: []}

    def hook(i):
        def f(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            rs[i].append(((h_out - h_in).norm(dim=-1) / h_in.norm(dim=-1)).reshape(-1))
        return f

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(ref.model.layers)]
    with torch.no_grad():
        ref(held)
    for h in handles:
        h.remove()
    for i in (0, 1):
        want = float(torch.cat(rs[i]).mean())
        assert stats["layers"][str(i)]["r_mean"] == pytest.approx(want, rel=1e-4)


def test_gates_are_if_nodes_with_thresholds_input_and_executed_output(qwen):
    import onnx

    *_, art = qwen
    m = onnx.load(str(art / "model.onnx"), load_external_data=False)
    assert [n.op_type for n in m.graph.node].count("If") == 2
    assert "thresholds" in [i.name for i in m.graph.input]
    assert m.graph.output[-1].name == "executed"
    manifest = json.loads((art / "manifest.json").read_text())
    v = manifest["validation"]["fp32"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 and v["distinct_skip_patterns"] >= 3
    assert (art / "skip_gates.json").is_file()  # the artifact resolves as gated too


@pytest.mark.parametrize("thresholds", [(NONE, NONE), (NONE, ALL), (ALL, NONE), (ALL, ALL), None],
                         ids=["none-skipped", "skip-1", "skip-0", "all-skipped", "default"])
def test_onnxruntime_equals_gated_pytorch(qwen, thresholds):
    """Prefill then a decode step on each side's own cache: logits, every present and executed agree."""
    from edgekit.models.hf import load
    from runtimes import open_runner

    _, _, gated, _, art = qwen
    model = load(gated)
    thr = model.default_thresholds() if thresholds is None else _thr(*thresholds)
    ids = torch.from_numpy(np.random.default_rng(3).integers(3, len(WORDS), (2, 9)))
    with open_runner(art) as runner:
        feeds = {n: v for n, v in runner.spec.dummy(2, 1, 0).items() if n != "attention_mask"}  # empty cache
        past = None
        for step in (ids[:, :7], ids[:, 7:]):  # prefill, then decode on each side's own cache
            with torch.no_grad():
                logits, past, executed = model(step, past, thr)
            got = runner.infer({**feeds, "input_ids": step.numpy(), "thresholds": thr.numpy()})
            assert np.abs(got["logits"] - logits.numpy()).max() < 1e-4
            assert got["executed"].tolist() == executed.tolist()
            for i, (k, v) in enumerate(past):
                assert np.abs(got[f"present.{i}.key"] - k.numpy()).max() < 1e-4
                assert np.abs(got[f"present.{i}.value"] - v.numpy()).max() < 1e-4
            feeds = {f"past.{i}.{kv}": got[f"present.{i}.{kv}"] for i in range(2) for kv in ("key", "value")}
    if thresholds is not None:
        assert executed.tolist() == [t == NONE for t in thresholds]


def test_token_by_token_decoding_equals_the_one_pass_per_token_evaluation(qwen):
    """Skipped layers' cached K/V are read by later tokens: decoding one token per call (each call its own
    decisions) must equal the one-pass per-token mode that calibrate-skip scores decode perplexity with."""
    from edgekit.models.hf import load

    _, _, gated, _, _ = qwen
    model = load(gated)
    stats = json.loads((gated / "skip_gates.json").read_text())
    thr = _thr(*[stats["layers"][str(i)]["r_pred_mean"] for i in range(2)])  # some tokens above, some below
    ids = torch.from_numpy(np.random.default_rng(11).integers(3, len(WORDS), (1, 24)))
    with torch.no_grad():
        model.per_token = True
        try:
            fast, _, fast_exec = model(ids, None, thr)  # executed [layers, 1, 24]
        finally:
            model.per_token = False
        assert fast_exec.any() and not fast_exec.all()
        past = None
        for t in range(ids.shape[1]):
            logits, past, executed = model(ids[:, t:t + 1], past, thr)
            assert executed.tolist() == fast_exec[:, 0, t].tolist()
            assert (logits[:, 0] - fast[:, t]).abs().max() < 1e-4


def test_generate_from_gated_dir_and_its_artifact(qwen):
    _, _, gated, _, art = qwen
    for thr in (NONE, ALL):
        a = api.generate(gated, "the edge model runs", max_new_tokens=5, threshold=thr)
        b = api.generate(art, "the edge model runs", max_new_tokens=5, threshold=thr)
        assert a["runtime"] == "torch" and b["runtime"] == "onnxruntime"
        assert a["tokens"] == b["tokens"]
        assert a["skipped"] == (0 if thr == NONE else a["layer_slots"])


def _calibrated(tmp_path, arch):
    d = _hf_dir(tmp_path, arch)
    calibrate.calibrate_skip(d, _text(tmp_path / "cal.txt", 400), tmp_path / f"{arch}-gated", seq_len=SEQ)
    return d, tmp_path / f"{arch}-gated"


@pytest.mark.parametrize("arch", ["qwen2", "llama", "deepseek_v3"])
def test_gated_model_is_the_original_when_nothing_is_skipped(tmp_path, arch):
    """Thresholds 0: logits and cache equal the ungated model's, prefill and decode. Everything skipped:
    logits = lm_head(norm(embedding)), yet every layer's cache holds the K/V of the tokens it saw."""
    from edgekit.models.hf import load

    d, gated = _calibrated(tmp_path, arch)
    plain, model = load(d), load(gated)
    assert type(model).__name__ == "GatedHFCausalLM" and type(plain).__name__ == "HFCausalLM"
    ids = torch.from_numpy(np.random.default_rng(5).integers(3, len(WORDS), (2, 10)))
    n = model.cfg.n_layers
    with torch.no_grad():
        want_logits, want_past, _ = plain(ids[:, :8])
        got_logits, got_past, executed = model(ids[:, :8], None, _thr(*[NONE] * n))
        assert executed.all()
        assert (got_logits - want_logits).abs().max() < 1e-5
        want2, want_past2, _ = plain(ids[:, 8:], want_past)
        got2, got_past2, _ = model(ids[:, 8:], got_past, _thr(*[NONE] * n))
        assert (got2 - want2).abs().max() < 1e-5
        for (wk, wv), (gk, gv) in zip(want_past2, got_past2):
            assert (wk - gk).abs().max() < 1e-5 and (wv - gv).abs().max() < 1e-5

        logits, past, executed = model(ids, None, _thr(*[ALL] * n))
        assert not executed.any()
        m = model.hf.model
        assert (logits - model.hf.lm_head(m.norm(m.embed_tokens(ids)))).abs().max() < 1e-5
        assert all(k.shape[2] == 10 and v.shape[2] == 10 for k, v in past)
        assert (past[0][0] - want_past2[0][0]).abs().max() < 1e-5  # layer 0 sees the embedding either way


def _assert_refused(tmp_path, args, *fragments):
    code, out, err = _cli("calibrate-skip", *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "(" in lines[0], err
    for f in fragments:
        assert f in lines[0], lines[0]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial") or p.name == "out"]


def test_bad_inputs_are_one_line_errors_and_write_nothing(qwen, tmp_path):
    d, data, gated, _, _ = qwen
    out = tmp_path / "out"
    _assert_refused(tmp_path, (d, "--data", tmp_path / "missing.txt", "--out", out), "does not exist", "--data")
    (tmp_path / "empty.txt").write_text("  \n")
    _assert_refused(tmp_path, (d, "--data", tmp_path / "empty.txt", "--out", out), "empty")
    (tmp_path / "short.txt").write_text("the edge kit")
    _assert_refused(tmp_path, (d, "--data", tmp_path / "short.txt", "--out", out), "fewer than 2 chunks")
    (tmp_path / "plain").mkdir()
    _assert_refused(tmp_path, (tmp_path / "plain", "--data", data, "--out", out), "not a Hugging Face model")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    _assert_refused(tmp_path, (tmp_path / "gpt2", "--data", data, "--out", out), "gpt2", "qwen2, llama, deepseek_v3")
    _assert_refused(tmp_path, (d, "--data", data, "--out", out, "--layers", "0,7"), "0..1")
    _assert_refused(tmp_path, (gated, "--data", data, "--out", out), "already has skip gates")


def test_failure_while_writing_leaves_nothing_behind(qwen, tmp_path, monkeypatch):
    import errno

    d, data, *_ = qwen

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(EdgekitError, match="no space left"):
        calibrate.calibrate_skip(d, data, tmp_path / "out", seq_len=SEQ)
    assert list(tmp_path.iterdir()) == []  # neither out nor a .partial staging directory
