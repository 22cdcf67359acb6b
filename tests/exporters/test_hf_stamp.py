"""Hugging Face llama / qwen2 through the 2-layer template + stamping (exporters/onnx_hf_stamp.py): the stamped graph
is the fully traced one (same ops, same outputs on ONNX Runtime), with a template vocabulary smaller than the
model's widened back (qwen2 here has 2000 tokens, the template 1031)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import onnx  # noqa: E402

from edgekit.spec import DecoderSpec  # noqa: E402
from exporters import onnx_hf_stamp  # noqa: E402

LAYERS = 4


def hf_dir(directory, arch: str, vocab: int = 256):
    """A seeded random 4-layer model (weights redrawn with std 0.2: distinct, not near-tied logits)."""
    import transformers
    from hf_tiny import COMMON, SEEDS, write_tokenizer

    torch.manual_seed(SEEDS[arch])
    cfg = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[arch](
        **{**COMMON, "num_hidden_layers": LAYERS, "vocab_size": vocab})
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() == 2 else p.add_(0.1 * torch.randn(p.shape))
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module", params=[("llama", 256), ("qwen2", 2000)], ids=["llama", "qwen2-vocab2000"])
def both(request, tmp_path_factory):
    """(model, traced path, stamped path, stamping info)."""
    from edgekit.models.hf import load
    from exporters.onnx import export_graph

    arch, vocab = request.param
    root = tmp_path_factory.mktemp(arch)
    model = load(hf_dir(root / "hf", arch, vocab))
    (root / "traced").mkdir()
    (root / "stamped").mkdir()
    export_graph(model, root / "traced" / "model.onnx")
    info = onnx_hf_stamp.export_graph(model, root / "stamped" / "model.onnx")
    return model, root / "traced" / "model.onnx", root / "stamped" / "model.onnx", info


def _ops(path) -> dict[str, int]:
    ops: dict[str, int] = {}
    for n in onnx.load(str(path), load_external_data=False).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


def test_the_stamped_graph_is_the_traced_one(both):
    import onnxruntime as ort

    model, traced, stamped, info = both
    assert info["template_layers"] == 2 and model.cfg.n_layers == LAYERS
    assert _ops(stamped) == _ops(traced)  # the same nodes (Transposes of weights folded as the trace's optimizer does)
    g = onnx.load(str(stamped), load_external_data=False).graph
    assert [i.name for i in g.input] == [i.name for i in onnx.load(str(traced), load_external_data=False).graph.input]
    logits = next(o for o in g.output if o.name == "logits").type.tensor_type.shape.dim[-1].dim_value
    assert logits == model.cfg.vocab_size
    assert (info["vocab_widened"] > 0) == (model.cfg.vocab_size > onnx_hf_stamp.TEMPLATE_VOCAB)
    spec = DecoderSpec(model.cfg)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (traced, stamped)]
    for shape in [(1, 1, 0), (2, 5, 7), (3, 4, 9)]:
        feeds = spec.dummy(*shape, seed=sum(shape))
        want, got = (dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds))) for s in sessions)
        assert want.keys() == got.keys()
        for name in want:
            scale = max(1.0, float(np.abs(want[name]).max()))
            assert np.abs(want[name] - got[name]).max() <= 1e-5 * scale, (name, shape)
        with torch.no_grad():  # and both are the model
            ids = torch.from_numpy(feeds["input_ids"])
            past = [(torch.from_numpy(feeds[f"past.{i}.key"]), torch.from_numpy(feeds[f"past.{i}.value"]))
                    for i in range(LAYERS)]
            ref = model(ids, past, attention_mask=torch.from_numpy(feeds["attention_mask"]))[0].numpy()
        assert np.abs(ref - got["logits"]).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_only_plain_deep_llama_and_qwen2_are_stamped():
    from edgekit.hfconfig import HFConfig

    base = dict(name="m", n_layers=4, n_heads=2, head_dim=16, value_dim=16, vocab_size=256, d_model=64, max_seq_len=64)
    assert onnx_hf_stamp.stampable(HFConfig(model_type="qwen2", **base))
    assert not onnx_hf_stamp.stampable(HFConfig(model_type="deepseek_v3", **base))  # MLA + MoE: traced whole
    assert not onnx_hf_stamp.stampable(HFConfig(model_type="llama", gated_layers=(1,), **base))  # If per gated layer
    assert not onnx_hf_stamp.stampable(HFConfig(model_type="llama", **{**base, "n_layers": 2}))  # nothing to gain


def _quantized(path) -> list[tuple]:
    """(dims, bytes) of every int8 weight (uint8) and its scales, sorted: names differ between the paths."""
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return sorted((tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in m.graph.initializer
                  if t.data_type == 2 or t.name.endswith("_scales"))


def test_streamed_export_of_a_safetensors_directory_equals_the_in_memory_int8(both, tmp_path):
    """`export --stream --int8` of the HF directory: int8 weights byte-identical to the in-memory quantizer's on the
    fully traced graph, validated against the whole PyTorch model (a small model)."""
    import json

    from edgekit import api
    from exporters.onnx_int8 import quantize_int8

    model, traced, _, _ = both
    quantize_int8(traced, tmp_path / "traced_int8.onnx")
    hf = traced.parent.parent / "hf"
    r = api.export(hf, "onnx", tmp_path / "streamed", int8=True, stream=True)
    assert r["weights"] == "Hugging Face safetensors" and r["streamed"]["template_layers"] == 2
    assert r["validation"]["int8"]["passed"] and r["validation"]["int8"]["logit_cosine_mean"] > 0.99
    want, got = _quantized(tmp_path / "traced_int8.onnx"), _quantized(tmp_path / "streamed" / "model.onnx")
    assert len(got) == 2 * (7 * LAYERS + 2) and got == want  # qkvo, gate, up, down; embedding, head
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["model_type"] == model.cfg.model_type
    fp32 = api.export(hf, "onnx", tmp_path / "fp32", stream=True)  # Transposes folded, weights written transposed
    assert fp32["validation"]["fp32"]["passed"] and fp32["validation"]["fp32"]["max_relative_diff"] < 1e-4
    assert fp32["graph_ops"] == _ops(traced)


def test_random_weights_export_of_a_config_only_directory(tmp_path, cli):
    """A directory with only config.json (the shape of a published model, no weights): `--random-weights` streams
    seeded tensors at the model's init scale, validated one decoder layer at a time; without it, a one-line error."""
    import json

    import transformers
    from hf_tiny import COMMON

    d = tmp_path / "cfg"
    d.mkdir()
    transformers.Qwen2Config(**{**COMMON, "num_hidden_layers": LAYERS, "vocab_size": 1500}).save_pretrained(d)
    assert [p.name for p in d.iterdir()] == ["config.json"]
    code, _, err = cli("export", str(d), "--format", "onnx", "--int8", "--stream", "--out", str(tmp_path / "x"))
    assert code == 1 and "no *.safetensors" in err and len(err.strip().splitlines()) == 1
    code, out, err = cli("export", str(d), "--format", "onnx", "--int8", "--random-weights", "--out",
                         str(tmp_path / "rand"), "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["weights"] == "random (seeded per tensor)" and r["streamed"]["vocab_widened"] > 0
    q = r["quantization"]  # the stamped graph's counts, not the 2-layer template's
    assert q["weights_quantized"] == 7 * LAYERS + 2 and q["template_weights_quantized"] == 7 * 2 + 2
    assert q["MatMulNBits_main"] == 7 * LAYERS + 1 == r["graph_ops"]["MatMulNBits"]
    assert r["validation"]["int8"]["passed"]
    from edgekit.weights import RandomWeights
    from exporters.onnx_hf_stamp import hf_config, weight_source

    source = weight_source(d, random_weights=True)
    assert isinstance(source, RandomWeights)
    w = source.get("hf.model.layers.3.mlp.up_proj.weight")
    assert w.shape == (COMMON["intermediate_size"], COMMON["hidden_size"]) and abs(float(w.std()) - 0.02) < 2e-3
    assert np.array_equal(w, weight_source(d, random_weights=True).get("hf.model.layers.3.mlp.up_proj.weight"))
    assert float(source.get("hf.model.layers.3.input_layernorm.weight").min()) == 1.0  # norms at their init: ones
    assert hf_config(d).vocab_size == 1500
    # the reference of models over 1 GiB: one decoder layer at a time, prefill then decode on its cache
    from edgekit import streamed
    from edgekit.resolve import resolve
    from edgekit.weights import hf_layer_streamed_model
    from runtimes.onnxruntime import OnnxRuntimeRunner

    res = resolve(tmp_path / "rand")
    model = hf_layer_streamed_model(hf_config(d), res.cfg, source)
    assert all(p.is_meta for p in model.hf.model.layers.parameters())
    spec = DecoderSpec(res.cfg)
    with OnnxRuntimeRunner(res) as runner:
        cases = streamed.graph_cases(runner, spec)
    report = streamed.layered_check(model, cases, spec, 0.99)
    assert report["passed"] and [c["step"] for c in report["cases"]] == ["prefill", "decode"]
    assert all(c["argmax_agreement"] > 0.5 for c in report["cases"])
    assert all(p.is_meta for p in model.hf.model.layers.parameters())  # each layer released after its forward
