"""Streamed export (issue 18): the stamped graph equals the traced one (ONNX Runtime outputs, node count), its
int8 weights are byte-identical to the in-memory quantizer's, weight sources, the layer plan of the full-size
presets, and the CLI path (random weights, interrupted export)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgekit.errors import EdgekitError
from edgekit.models import build, preset
from edgekit.spec import DecoderSpec
from edgekit.weights import RandomWeights, SafetensorsWeights, StateWeights, layer_streamed_model, lockstep
from exporters.onnx_graph import iter_nodes
from exporters.onnx_stream import layer_plan, weight_origin

RTOL = 1e-5


def _model(name: str):
    """A preset with every parameter distinct (no equal-valued tensors the exporter could merge)."""
    model = build(preset(name), seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=["r1-tiny", "v3-tiny"])
def exported(request, tmp_path_factory):
    """(cfg, traced fp32 path, traced int8 path, streamed fp32 dir, streamed int8 dir) for one model."""
    from exporters.onnx import export_graph
    from exporters.onnx_int8 import quantize_int8
    from exporters.onnx_stream import export_streamed

    name = request.param
    model = _model(name)
    d = tmp_path_factory.mktemp(name)
    export_graph(model, d / "traced.onnx")
    counts = quantize_int8(d / "traced.onnx", d / "traced_int8.onnx")
    (d / "traced_int8_counts.json").write_text(json.dumps(counts))
    source = StateWeights(model.state_dict())
    dirs = []
    for int8 in (False, True):
        out = d / ("int8" if int8 else "fp32")
        out.mkdir()
        info = export_streamed(model.cfg, source, out, int8)
        (d / f"streamed_{out.name}_info.json").write_text(json.dumps(info.get("quantization")))
        dirs.append(out)
    return model.cfg, d / "traced.onnx", d / "traced_int8.onnx", *dirs


def _outputs_equal(cfg, a, b, exact: bool):
    spec = DecoderSpec(cfg)
    sa, sb = _ort(a), _ort(b)
    settings = [None] if not spec.gated else [None, np.zeros(cfg.n_layers), np.full(cfg.n_layers, 2.0),
                                              np.array([2.0 * (i % 2) for i in range(cfg.n_layers)])]
    for shape in [(1, 1, 0), (2, 5, 37), (1, 3, 2 * cfg.block_size + 5)]:
        for thr in settings:
            feeds = spec.dummy(*shape, seed=3, thresholds=None if thr is None else thr.astype(np.float32))
            got, want = sa.run(None, feeds), sb.run(None, feeds)
            assert [o.name for o in sa.get_outputs()] == spec.output_names
            for name, x, y in zip(spec.output_names, got, want):
                assert x.shape == y.shape, name
                if exact:
                    np.testing.assert_array_equal(x, y, err_msg=name)
                else:
                    np.testing.assert_allclose(x, y, rtol=RTOL, atol=RTOL, err_msg=name)
            assert (got[0].argmax(-1) == want[0].argmax(-1)).all()


@pytest.mark.slow
def test_stamped_fp32_graph_equals_the_traced_graph(exported):
    cfg, traced, _, fp32, _ = exported
    _outputs_equal(cfg, fp32 / "model.onnx", traced, exact=False)
    stamped = onnx.load(str(fp32 / "model.onnx"), load_external_data=False)
    reference = onnx.load(str(traced), load_external_data=False)
    assert sum(1 for _ in iter_nodes(stamped.graph)) <= sum(1 for _ in iter_nodes(reference.graph))
    assert [i.name for i in stamped.graph.input] == [i.name for i in reference.graph.input]
    if cfg.family == "r1":  # one If per gated layer, shared blocks stored once
        assert sum(n.op_type == "If" for n in stamped.graph.node) == len(cfg.gated_layers)
        names = {t.name for t in stamped.graph.initializer}
        assert {int(m.group(1)) for n in names if (m := re.search(r"\.blocks\.(\d+)\.", n))} == \
            set(range(cfg.unique_blocks))


@pytest.mark.slow
def test_streamed_int8_weights_are_byte_identical_to_the_in_memory_quantizer(exported):
    cfg, _, traced_int8, _, int8 = exported
    a = {t.name: t for t in onnx.load(str(int8 / "model.onnx")).graph.initializer}
    b = {t.name: t for t in onnx.load(str(traced_int8)).graph.initializer}
    quantized = [n for n in b if re.search(r"_Q8B\d+$|_scales$", n)]
    assert quantized and all(n in a for n in quantized)
    for n in quantized:
        assert numpy_helper.to_array(a[n]).tobytes() == numpy_helper.to_array(b[n]).tobytes(), n
    _outputs_equal(cfg, int8 / "model.onnx", traced_int8, exact=False)
    # the manifest's counts are the stamped graph's, not the 2-layer template's the quantizer ran on
    want = json.loads((traced_int8.parent / "traced_int8_counts.json").read_text())
    got = json.loads((traced_int8.parent / "streamed_int8_info.json").read_text())
    keys = ("weights_quantized", "MatMulNBits_main", "MatMulNBits_branches", "GatherBlockQuantized")
    assert {k: got[k] for k in keys} == {k: want[k] for k in keys}  # r1-tiny's template held 26 weights, 18 here


@pytest.mark.slow
def test_layered_validation_reads_each_block_once_and_catches_wrong_weights(exported, monkeypatch):
    """The big-model validation (graph first, then one lockstep PyTorch sweep) on the tiny streamed artifacts."""
    from edgekit import streamed
    from edgekit.resolve import Resolved

    cfg, _, _, fp32_dir, int8_dir = exported
    monkeypatch.setattr(streamed, "FULL_REFERENCE_BYTES", 0)
    res = Resolved("preset", cfg.name, cfg)
    source = StateWeights(_model(cfg.name).state_dict())
    report = streamed.validate(res, source, fp32_dir, False, 0.999, 1e-3)["streamed"]
    gated = bool(cfg.gated_layers)
    assert [(c["setting"], c["step"]) for c in report["cases"]] == (
        [("run-all", "prefill"), ("run-all", "decode"), ("skip-all-gated", "prefill")] if gated
        else [("default", "prefill"), ("default", "decode")])
    assert report["passed"] and report["block_loads"] == cfg.n_layers  # one sweep for all cases
    assert all(c["argmax_agreement"] == 1.0 and c["max_abs_diff"] < 1e-4 for c in report["cases"])
    assert all(c["executed_equal"] for c in report["cases"]) if gated else True
    assert streamed.validate(res, source, int8_dir, True, 0.99, 1e-3)["streamed"]["passed"]
    with pytest.raises(EdgekitError, match="^validation: "):
        streamed.validate(res, StateWeights(build(cfg, seed=9).state_dict()), fp32_dir, False, 0.999, 1e-3)


def test_full_size_r1_plan_shares_blocks_and_keeps_every_gate():
    cfg = preset("r1-8.5b")
    plan = layer_plan(cfg)
    assert plan.template_cfg.n_layers == 3 and plan.template_cfg.gated_layers == [1]
    assert [plan.src(layer) for layer in (0, 1, 40, 78, 79)] == [0, 1, 1, 1, 2]
    assert plan.rename("model.blocks.1.attn.q.weight_T_Q8B128", 1, 41) == "model.blocks.1.attn.q.weight_T_Q8B128"
    assert plan.rename("model.blocks.1.mlp.up.weight", 1, 77) == "model.blocks.37.mlp.up.weight"
    assert plan.rename("model.gates.1.w", 1, 77) == "model.gates.77.w"
    v3 = layer_plan(preset("v3-13b"))
    assert v3.template_cfg.n_layers == 2 and v3.rename("model.blocks.1.attn.o.weight", 1, 39) == \
        "model.blocks.39.attn.o.weight"


def test_weight_origin_traces_quantized_names_back_to_parameters():
    params = {"blocks.3.attn.q.weight", "embed.weight"}
    assert weight_origin("model.blocks.3.attn.q.weight", params) == ("fp32", "blocks.3.attn.q.weight")
    assert weight_origin("model.blocks.3.attn.q.weight_T_Q8B128", params) == \
        ("q8", "blocks.3.attn.q.weight", True, 128)
    assert weight_origin("model.blocks.3.attn.q.weight_T_scales", params) == \
        ("scales", "blocks.3.attn.q.weight", True, 0)
    assert weight_origin("model.embed.weight_Q8B64", params) == ("q8", "embed.weight", False, 64)
    assert weight_origin("model.embed.weight_Q8B64_rows_shape", params) is None
    assert weight_origin("val_12", params) is None


def test_random_weights_are_seeded_per_tensor_at_the_init_scale():
    cfg = preset("r1-tiny")
    ref = build(cfg, seed=0).state_dict()
    shapes = {n: tuple(t.shape) for n, t in build(preset("r1-mini"), device="meta").state_dict().items()}
    a, b = RandomWeights(shapes, ref, seed=0), RandomWeights(shapes, ref, seed=1)
    q = a.get("blocks.7.attn.q.weight")
    assert q.shape == (768, 768) and q.dtype == np.float32
    np.testing.assert_array_equal(q, a.get("blocks.7.attn.q.weight"))  # deterministic
    assert not np.array_equal(q, a.get("blocks.6.attn.q.weight"))  # per tensor
    assert not np.array_equal(q, b.get("blocks.7.attn.q.weight"))  # per seed
    assert abs(float(q.std()) - 0.02) < 1e-3 and abs(float(q.mean())) < 1e-3
    assert float(np.abs(q).max()) <= np.float32(0.02 * 3 ** 0.5)  # uniform of that std: bounded
    np.testing.assert_array_equal(a.get("blocks.7.mlp_norm.weight"), np.ones(768, np.float32))
    np.testing.assert_array_equal(a.get("gates.3.b"), np.float32(2.0))


def test_safetensors_weights_read_one_tensor_at_a_time(tmp_path):
    from edgekit.checkpoint import WEIGHTS, save_checkpoint

    model = build(preset("r1-tiny"), seed=3)
    save_checkpoint(model, tmp_path)
    source = SafetensorsWeights(tmp_path / WEIGHTS)
    state = model.state_dict()
    assert set(source.names()) == set(state)
    for name in ("blocks.1.attn.k.weight", "embed.weight", "gates.2.b"):
        np.testing.assert_array_equal(source.get(name), state[name].numpy())
        assert source.shape(name) == tuple(state[name].shape)
    with pytest.raises(EdgekitError, match="lack 1 tensor"):
        source.missing(["blocks.9.attn.k.weight"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(EdgekitError, match="corrupt"):
        SafetensorsWeights(tmp_path / "bad")


@pytest.mark.parametrize("name", ["r1-tiny", "v3-tiny"])
def test_layer_streamed_reference_equals_the_whole_model(name):
    model = _model(name)
    lazy = layer_streamed_model(model.cfg, StateWeights(model.state_dict()))
    spec = DecoderSpec(model.cfg)
    feeds = spec.dummy(2, 6, 19, seed=4)
    ids = torch.from_numpy(feeds["input_ids"])
    past = [(torch.from_numpy(feeds[f"past.{i}.key"]), torch.from_numpy(feeds[f"past.{i}.value"]))
            for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        want, got = model(ids, past)[0], lazy(ids, past)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    loaded = [b.attn.q.weight.device.type for b in torch.nn.ModuleList.__iter__(lazy.blocks)]
    assert loaded.count("cpu") == 1  # one block materialised at a time


def test_lockstep_forwards_read_each_block_once_and_equal_the_whole_model():
    """Three forwards (gates open, closed, a decode step on a cache) share each block's materialisation."""
    model = _model("r1-tiny")
    cfg = model.cfg
    spec = DecoderSpec(cfg)
    reads = []

    class Counting(StateWeights):
        def get(self, name):
            reads.append(name)
            return super().get(name)

    lazy = layer_streamed_model(cfg, Counting(model.state_dict()))
    cases = [spec.dummy(1, 8, 0, seed=4, thresholds=np.zeros(4, np.float32)),
             spec.dummy(1, 8, 0, seed=4, thresholds=np.full(4, 2.0, np.float32)),
             spec.dummy(2, 1, 9, seed=5, thresholds=np.zeros(4, np.float32))]

    def forward(m, f):
        past = [(torch.from_numpy(f[f"past.{i}.key"]), torch.from_numpy(f[f"past.{i}.value"])) for i in range(4)]
        with torch.no_grad():
            return m(torch.from_numpy(f["input_ids"]), past, torch.from_numpy(f["thresholds"]))

    reads.clear()
    got = lockstep(lazy, [lambda f=f: forward(lazy, f) for f in cases])
    block_reads = [n for n in reads if n.startswith("blocks.")]
    per_block = len([n for n in model.state_dict() if n.startswith("blocks.0.")])
    assert lazy.blocks.loads == cfg.n_layers and len(block_reads) == cfg.n_layers * per_block  # 1 pass, not 3
    for f, (logits, presents, executed) in zip(cases, got):
        want = forward(model, f)
        torch.testing.assert_close(logits, want[0], rtol=0, atol=0)
        torch.testing.assert_close(executed, want[2], rtol=0, atol=0)
        for (k, v), (wk, wv) in zip(presents, want[1]):
            torch.testing.assert_close(k, wk, rtol=0, atol=0)
            torch.testing.assert_close(v, wv, rtol=0, atol=0)
    assert [bool(x) for x in got[1][2]] == [not g for g in (i in cfg.gated_layers for i in range(4))]

    def fails():
        raise ValueError("boom")
    with pytest.raises(ValueError, match="boom"):  # a failing forward does not leave the others waiting
        lockstep(lazy, [lambda: forward(lazy, cases[0]), fails])
    assert lockstep(lazy, [lambda: forward(lazy, cases[2])])[0][0].shape == (2, 1, cfg.vocab_size)

    class Broken(StateWeights):
        def get(self, name):
            if name.startswith("blocks.1."):
                raise OSError("unreadable block 1")
            return super().get(name)

    broken = layer_streamed_model(cfg, Broken(model.state_dict()))
    with pytest.raises(OSError, match="unreadable"):  # a failing read reaches every forward, none waits forever
        lockstep(broken, [lambda f=f: forward(broken, f) for f in cases])


@pytest.mark.slow
def test_weightless_template_exports_the_same_artifact(tmp_path, monkeypatch):
    """A template above CHECK_ELEMENTS is traced with zero placeholders (a sparse file, never in memory) and
    quantized reading one weight at a time: the streamed artifact is byte-identical to the one stamped from a
    template that holds its weights."""
    from exporters import onnx_stream
    from exporters.onnx_stamp import PLACEHOLDERS, trace_template

    model = _model("r1-tiny")
    source = StateWeights(model.state_dict())
    for name, limit in (("with", onnx_stream.CHECK_ELEMENTS), ("without", 0)):
        monkeypatch.setattr(onnx_stream, "CHECK_ELEMENTS", limit)
        (tmp_path / name).mkdir()
        onnx_stream.export_streamed(model.cfg, source, tmp_path / name, int8=True)
    for f in ("model.onnx", "model.onnx.data"):
        assert (tmp_path / "with" / f).read_bytes() == (tmp_path / "without" / f).read_bytes(), f
    (tmp_path / "t").mkdir()
    proto = trace_template(model, tmp_path / "t" / "model.onnx", weights=False)
    params = {f"model.{n}": p for n, p in model.named_parameters()}
    refs = {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer if t.name in params}
    assert set(refs) == set(params) and {r["location"] for r in refs.values()} == {PLACEHOLDERS}
    assert (tmp_path / "t" / PLACEHOLDERS).stat().st_size == sum(4 * p.numel() for p in params.values())
    assert not any(t.raw_data for t in proto.graph.initializer if t.name in params)


def test_segmenting_a_graph_without_layers_is_a_one_line_error():
    from onnx import TensorProto, helper

    from exporters.onnx_stamp import segment

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(EdgekitError, match="no past.N"):
        segment(helper.make_model(graph))


def test_stream_refuses_other_formats_and_no_stream_on_full_size(tmp_path):
    from edgekit import api

    with pytest.raises(EdgekitError, match="writes ONNX"):
        api.export("r1-tiny", "tensorrt", tmp_path / "a", stream=True)
    with pytest.raises(EdgekitError, match="drop --no-stream"):
        api.export("r1-8.5b", "onnx", tmp_path / "b", stream=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_cli_streamed_random_weights_export_validates_and_leaves_nothing_when_interrupted(cli, tmp_path,
                                                                                         monkeypatch):
    import json

    from edgekit.artifact import read_manifest
    from exporters import onnx_stream

    code, out, err = cli("export", "v3-tiny", "--random-weights", "--int8", "--out", tmp_path / "a", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["precision"] == "int8" and r["streamed"]["template_layers"] == 2
    assert r["validation"]["int8"]["passed"] and r["weights"].startswith("random")
    assert read_manifest(tmp_path / "a")["graph_ops"]["MatMulNBits"] == 8 * 4 + 1  # 8 per layer + the head
    from edgekit.cli import render

    with render.console.capture() as shown:  # the human output of the same result (it raised KeyError once)
        render.show_export(r)
    assert f"int8: size {r['size']['int8_bytes'] / 2**20:,.1f} MiB, logit cosine" in shown.get()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_stream, "write_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        from edgekit import api

        api.export("v3-tiny", "onnx", tmp_path / "b", stream=True)
    assert not (tmp_path / "b").exists() and list(tmp_path.iterdir()) == [tmp_path / "a"]


def test_template_of_a_custom_r1_with_gated_first_layer():
    cfg = dataclasses.replace(preset("r1-tiny"), n_layers=6, gated_layers=[0, 2, 3], n_unique_blocks=4)
    plan = layer_plan(cfg)
    assert plan.template_cfg.gated_layers == [0, 1]
    assert [plan.src(layer) for layer in range(6)] == [0, 2, 1, 1, 2, 2]
    assert plan.rename("model.blocks.2.attn.q.weight", 2, 5) == "model.blocks.1.attn.q.weight"
