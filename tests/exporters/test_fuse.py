"""Fused ONNX Runtime ops (exporters/onnx_fuse.py) on a tiny random Llama built in code: the fused export has one
GroupQueryAttention per layer (RoPE inside the op) and fused norms, runs the unfused branch only for the one shape
ONNX Runtime's CPU GroupQueryAttention refuses, and equals the unfused export on every shape and in generation."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from hf_tiny import COMMON, save_model, write_tokenizer  # noqa: E402

from edgekit import api  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(HF dir, fused fp32 artifact, unfused fp32 artifact)."""
    root = tmp_path_factory.mktemp("fuse")
    d = root / "llama"
    save_model(d, "llama")
    write_tokenizer(d)
    api.export(d, "onnx", root / "fused")
    api.export(d, "onnx", root / "plain", fuse=False)
    return d, root / "fused", root / "plain"


def _branches(path):
    import onnx

    g = onnx.load(str(path / "model.onnx"), load_external_data=False).graph
    ifs = [n for n in g.node if n.op_type == "If"]
    assert len(ifs) == 1, [n.op_type for n in g.node]
    return {a.name: [n.op_type for n in a.g.node] for a in ifs[0].attribute}


def test_fused_export_has_one_attention_op_per_layer_and_an_unfused_fallback(llama):
    _, fused, plain = llama
    report = json.loads((fused / "manifest.json").read_text())["fusion"]
    layers = COMMON["num_hidden_layers"]
    assert report["fused"] and report["GroupQueryAttention"] == layers and report["rotary_in_op"] == layers
    assert report["norms"] == "fused" and report["SkipSimplifiedLayerNormalization"] == 2 * layers
    ops = _branches(fused)
    then, other = ops["then_branch"], ops["else_branch"]
    assert then.count("GroupQueryAttention") == layers and "Softmax" not in then and "Neg" not in then  # RoPE in op
    assert other.count("Softmax") == layers and "GroupQueryAttention" not in other
    # one q/k/v projection per layer: the op reads it packed, the unfused branch splits it
    assert report["qkv_packed"] == layers and "Split" not in then and other.count("Split") == layers
    assert then.count("MatMul") == other.count("MatMul") - 2 * layers == 5 * layers + 1  # qkv, o, gate, up, down; head
    assert len(then) < len(other) / 2
    # the weights are stored once: the fused artifact's data file is the unfused one's plus the rotary tables
    data = [(d / "model.onnx.data").stat().st_size for d in (fused, plain)]
    assert 0 < data[0] - data[1] <= 2 * COMMON["max_position_embeddings"] * 8 * 4 + 4096, data
    plain_manifest = json.loads((plain / "manifest.json").read_text())
    assert "fusion" not in plain_manifest and "GroupQueryAttention" not in plain_manifest["graph_ops"]


@pytest.mark.parametrize("batch,seq,past,pads", [
    (1, 9, 0, None), (1, 1, 11, None), (3, 1, 11, None), (2, 6, 0, None), (1, 4, 7, None),
    (3, 4, 7, None),  # GroupQueryAttention refuses it on the CPU: the unfused branch
    (3, 1, 11, (0, 4, 9)),  # decode of left-padded rows: fused, each row rotated at its own positions
    (3, 6, 0, (0, 2, 5)),  # a left-padded prefill: the op would ignore the rows' positions, so unfused
    (1, 3, 6, (2,))])
def test_fused_equals_unfused_on_every_shape(llama, batch, seq, past, pads):
    from runtimes import open_runner

    _, fused, plain = llama
    with open_runner(fused) as a, open_runner(plain) as b:
        feeds = a.spec.dummy(batch, seq, past, seed=batch * 100 + seq * 10 + past, pads=pads)
        got, want = a.infer(feeds), b.infer(feeds)
    assert got.keys() == want.keys()
    for name in want:
        scale = max(1.0, float(np.abs(want[name]).max()))
        assert np.abs(got[name] - want[name]).max() <= 1e-5 * scale, name
    assert (got["logits"].argmax(-1) == want["logits"].argmax(-1)).all()


def test_fused_and_unfused_generate_the_same_tokens(llama):
    from runtimes import open_runner

    _, fused, plain = llama
    prompt = [0, 5, 9, 17, 42, 3, 8]
    with open_runner(fused) as a, open_runner(plain) as b:
        assert a.generate(prompt, 24).tokens == b.generate(prompt, 24).tokens


def test_int8_of_the_fused_graph_quantizes_each_weight_once(llama, tmp_path):
    from exporters.onnx_graph import graph_ops, large_float_weights

    d, _, _ = llama
    text = tmp_path / "text.txt"
    text.write_text("the edge model runs on every device " * 8)
    fused = api.export(d, "onnx", tmp_path / "fused8", int8=True, fidelity_data=text)
    plain = api.export(d, "onnx", tmp_path / "plain8", int8=True, fidelity_data=text, fuse=False)
    q, p = fused["quantization"], plain["quantization"]
    layers = COMMON["num_hidden_layers"]
    # q, k, v packed into one weight per layer, which both branches read (one int8 copy of every weight)
    assert q["weights_quantized"] == p["weights_quantized"] - 2 * layers
    assert q["MatMulNBits_branches"] == 2 * (p["MatMulNBits_main"] - 2 * layers) and q["MatMulNBits_main"] == 0
    assert large_float_weights(tmp_path / "fused8" / "model.onnx") == []
    assert graph_ops(tmp_path / "fused8" / "model.onnx")["GroupQueryAttention"] == COMMON["num_hidden_layers"]
    # the weights' file grows only by the rotary cos/sin tables [max positions, head_dim / 2] (fp32, both)
    head_dim = COMMON["hidden_size"] // COMMON["num_attention_heads"]
    tables = 2 * COMMON["max_position_embeddings"] * head_dim // 2 * 4
    data = [(tmp_path / x / "model.onnx.data").stat().st_size for x in ("fused8", "plain8")]
    assert 0 < data[0] - data[1] <= tables + 4096, data
    assert fused["validation"]["int8"]["passed"]


def test_a_graph_without_the_pattern_is_left_as_it_is():
    import onnx
    from onnx import TensorProto, helper

    from exporters.onnx_fuse import fuse

    x = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["input_ids"], ["logits"])], "g", [x], [y]))
    out, report = fuse(model, num_heads=4)
    assert out is model and report == {"fused": False, "why": "no past.N.key inputs", "nodes": 1}
    onnx.checker.check_model(out)


@pytest.mark.parametrize("batch", [1, 2, 3])
@pytest.mark.parametrize("seq", [1, 4])
@pytest.mark.parametrize("past", [0, 5])
@pytest.mark.parametrize("padded", [False, True])
def test_takes_fused_is_the_graphs_own_branch_condition(llama, batch, seq, past, padded):
    """The runner picks the branch with `takes_fused`; the If decides with its condition nodes. Both agree."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    from exporters.onnx_fused_if import takes_fused

    _, fused, _ = llama
    model = onnx.load(str(fused / "model.onnx"), load_external_data=False)
    g = model.graph
    cond = [n for n in g.node if n.name.startswith("fallback_cond_")]
    read = {i for n in cond for i in n.input}
    ins = [i for i in g.input if i.name in read]
    out = helper.make_tensor_value_info("fb_cond", onnx.TensorProto.BOOL, [])
    m = helper.make_model(helper.make_graph(cond, "cond", ins, [out], [t for t in g.initializer if t.name in read]),
                          opset_imports=model.opset_import)
    mask = np.ones((batch, past + seq), np.int64)
    if padded:
        mask[-1, 0] = 0
    feeds = {"input_ids": np.zeros((batch, seq), np.int64), "attention_mask": mask,
             **{i.name: np.zeros((batch, 2, past, 16), np.float32) for i in ins if i.name.startswith("past.")}}
    got = bool(ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0])
    assert got == takes_fused(batch, seq, past, not padded)


def test_the_runner_runs_the_fused_branch_as_its_own_session(llama):
    """Decode and unpadded prefills run the fused branch as a session of its own, bit for bit what the whole
    model computes through its If; the whole model is loaded only when a call needs the general branch."""
    import onnxruntime as ort

    from runtimes import open_runner

    _, fused, _ = llama
    whole = ort.InferenceSession(str(fused / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in whole.get_outputs()]
    with open_runner(fused) as r:
        d = r.describe()
        assert d["fused_session"] and d["shared_cache"] and "model" not in r.sessions
        for batch, seq, past, pads in [(1, 9, 0, None), (1, 1, 11, None), (3, 1, 11, (0, 4, 9)), (2, 6, 0, None),
                                       (1, 4, 7, None)]:
            feeds = r.spec.dummy(batch, seq, past, seed=seq + past, pads=pads)
            got = r.infer(feeds)
            want = dict(zip(names, whole.run(names, feeds)))
            for name in names:
                assert np.array_equal(got[name], want[name]), (batch, seq, past, name)
        assert "model" not in r.sessions  # no call needed the general branch yet
        r.infer(r.spec.dummy(3, 6, 0, pads=(0, 2, 5)))  # a left-padded prefill: the whole model, loaded now
        assert "model" in r.sessions
    # fused_session=False (export's validation): one session on the file as stored, through its If
    with open_runner(fused, fused_session=False) as r:
        assert not r.describe()["fused_session"] and list(r.sessions) == ["model"] and r.fused_session is None
        feeds = r.spec.dummy(1, 1, 11, seed=12)
        got, want = r.infer(feeds), dict(zip(names, whole.run(names, feeds)))
        assert all(np.array_equal(got[n], want[n]) for n in names) and list(r.sessions) == ["model"]


def _steps(runner, batch, prompt_pads, n_decode, chunk=None):
    """Logits of a prefill (left-padded by prompt_pads, optional) then n_decode greedy steps, batch rows."""
    sess = runner.session(batch)
    rng = np.random.default_rng(batch)
    ids = rng.integers(2, 256, (batch, 7))
    mask = None if prompt_pads is None else (np.arange(7)[None] >= np.asarray(prompt_pads)[:, None]).astype(np.int64)
    logits, _ = sess.step(ids, mask)
    rows = [logits]
    if chunk:  # a batch-1 continuation of several tokens on the cache
        logits, _ = sess.step(rng.integers(2, 256, (batch, chunk)))
        rows.append(logits)
    for _ in range(n_decode):
        logits, _ = sess.step(logits.argmax(-1)[:, None])
        rows.append(logits)
    return rows, sess


@pytest.mark.parametrize("batch,pads,chunk", [(1, None, 5), (3, (0, 2, 5), None), (2, None, None)])
def test_the_shared_cache_equals_the_copying_cache_exactly(llama, batch, pads, chunk):
    """SharedCacheSession (one cache buffer that GroupQueryAttention writes in place, bound as past and present)
    gives exactly the logits of the session that feeds the cache as arrays and gets a new, longer one per step:
    a left-padded prefill (the general branch, its cache copied into the buffer), a continuation, and 70 decode
    steps, past the first capacity of 64 positions (the buffer grows once, copying what it holds)."""
    from runtimes import open_runner
    from runtimes.onnxruntime import SharedCacheSession

    _, fused, _ = llama
    with open_runner(fused) as shared, open_runner(fused, shared_cache=False) as copying:
        assert shared.describe()["shared_cache"] and not copying.describe()["shared_cache"]
        got, sess = _steps(shared, batch, pads, 70, chunk)
        want, plain = _steps(copying, batch, pads, 70, chunk)
        assert isinstance(sess, SharedCacheSession) and not isinstance(plain, SharedCacheSession)
        assert sess.capacity == 128 and sess.length == plain.length == 7 + (chunk or 0) + 70
        for i, (a, b) in enumerate(zip(got, want)):
            assert np.array_equal(a, b), i
        # the buffer holds what the copying session's cache holds, and nothing after it
        for name, value in plain.cache.items():
            assert np.array_equal(sess.buffers[name][:, :, :sess.length], value)
            assert not sess.buffers[name][:, :, sess.length:].any()


def test_a_graph_fused_before_the_shared_cache_still_runs_its_fused_branch(llama, tmp_path):
    """An artifact whose fused branch reads the past's length from the cache (exported before the shared cache):
    its own session for the fused branch, the cache copied per step as before, the same tokens."""
    import shutil

    import onnx

    from runtimes import open_runner

    _, fused, _ = llama
    old = tmp_path / "old"
    shutil.copytree(fused, old)
    model = onnx.load(str(old / "model.onnx"), load_external_data=False)
    del model.metadata_props[:]
    onnx.save(model, str(old / "model.onnx"))
    from edgekit.artifact import sha256_file

    manifest = json.loads((old / "manifest.json").read_text())  # re-listed, as an older export wrote it
    manifest["files"]["model.onnx"].update(size=(old / "model.onnx").stat().st_size,
                                           sha256=sha256_file(old / "model.onnx"))
    (old / "manifest.json").write_text(json.dumps(manifest))
    prompt = [0, 5, 9, 17, 42, 3, 8]
    with open_runner(old) as a, open_runner(fused) as b:
        assert a.describe()["fused_session"] and not a.describe()["shared_cache"] and b.describe()["shared_cache"]
        assert a.generate(prompt, 12).tokens == b.generate(prompt, 12).tokens
