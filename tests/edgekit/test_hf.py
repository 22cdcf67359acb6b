"""Hugging Face model directories: tiny random Qwen2 / Llama built in code (no downloads), exported
once per session with edgekit's own exporter and compared with transformers itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
torch = pytest.importorskip("torch")

from hf_tiny import COMMON, WORDS, save_model, write_tokenizer  # noqa: E402

from edgekit import api  # noqa: E402
from edgekit.errors import EdgekitError  # noqa: E402


def _hf_dir(root, arch: str):
    d = root / arch
    save_model(d, arch)
    write_tokenizer(d, chat=arch == "qwen2")
    return d


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """arch -> (HF dir, fp32 ONNX artifact)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ("qwen2", "llama"):
        d = _hf_dir(root, arch)
        art = root / f"{arch}-onnx"
        api.export(d, "onnx", art)
        out[arch] = (d, art)
    return out


def _reference(d):
    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, use_safetensors=True).eval()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_export_validates_and_matches_transformers(hf_models, arch):
    from runtimes import open_runner

    d, art = hf_models[arch]
    manifest = json.loads((art / "manifest.json").read_text())
    v = manifest["validation"]["fp32"]
    assert manifest["family"] == f"hf-{arch}" and v["passed"]
    assert v["max_abs_diff"] <= 1e-4 and v["argmax_agreement"] == 1.0
    # seeded random input through ONNX Runtime vs transformers' own forward
    ids = np.random.default_rng(7).integers(0, COMMON["vocab_size"], (2, 12), dtype=np.int64)
    ref = _reference(d)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    with open_runner(art) as runner:
        feeds = runner.spec.dummy(2, ids.shape[1], 0)
        got = runner.infer({**feeds, "input_ids": ids})["logits"]
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).mean() == 1.0


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_onnxruntime_greedy_equals_transformers_generate(hf_models, arch):
    from runtimes import open_runner

    d, art = hf_models[arch]
    prompt = [0, 5, 9, 17, 42, 3]
    n = 20
    ref = _reference(d)
    with torch.no_grad():
        seq = ref.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=1,
                           pad_token_id=1)[0, len(prompt):].tolist()
    with open_runner(art) as runner:
        ours = runner.generate(prompt, n, stop=1).tokens
    assert ours == seq, (ours, seq)


def test_generate_text_from_dir_and_artifact(hf_models):
    d, art = hf_models["qwen2"]
    a = api.generate(d, "the edge model runs", max_new_tokens=6)
    b = api.generate(art, "the edge model runs", max_new_tokens=6)
    assert a["runtime"] == "torch" and b["runtime"] == "onnxruntime"
    assert a["tokens"] == b["tokens"] and a["text"] == b["text"]
    assert (art / "tokenizer.json").is_file()


def test_int8_export_quantizes_every_large_weight(hf_models, tmp_path):
    from exporters.onnx_graph import large_float_weights

    d, _ = hf_models["llama"]
    text = tmp_path / "text.txt"  # the int8 check decodes this text, tokenized by the model's tokenizer.json
    text.write_text("the edge model runs on every device " * 8)
    r = api.export(d, "onnx", tmp_path / "int8", int8=True, fidelity_data=text)
    assert r["precision"] == "int8" and r["validation"]["int8"]["passed"]
    assert r["validation"]["int8"]["inputs"] == f"text from {text} (56 tokens)"  # 7 words x 8, word-level
    assert large_float_weights(tmp_path / "int8" / "model.onnx") == []
    assert r["size"]["int8_over_fp32"] < 0.45


def test_unsupported_model_type_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(EdgekitError) as e:
        api.export(tmp_path, "onnx", tmp_path / "out")
    msg = str(e.value)
    assert "gpt2" in msg and "qwen2, llama, deepseek_v3" in msg


def test_pickled_weights_refused_and_missing_library_named(tmp_path, monkeypatch):
    from edgekit import hfconfig
    from edgekit.models import hf

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", **COMMON}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(EdgekitError, match="safetensors"):
        hf.load(tmp_path)
    with pytest.raises(EdgekitError, match=r"pip install 'edgekit\[hf\]'"):
        hfconfig.require("transformers_not_installed_here")


@pytest.fixture(scope="session")
def dsv3(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsv3")
    d = root / "dsv3"
    save_model(d, "deepseek_v3", max_dim=3)
    write_tokenizer(d)
    api.export(d, "onnx", root / "onnx")
    return d, root / "onnx"


def test_deepseek_v3_export_reaches_every_expert_and_matches_transformers(dsv3):
    from runtimes import open_runner

    d, art = dsv3
    v = json.loads((art / "manifest.json").read_text())["validation"]["fp32"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 and v["argmax_agreement"] == 1.0
    assert v["experts"]["experts"] == 16 and v["experts"]["moe_layers"] == 2
    assert v["experts"]["min_tokens_per_expert"] >= 1 and v["experts"]["passed"]
    ref = _reference(d)  # transformers' own (data-dependent) expert dispatch
    ids = np.random.default_rng(11).integers(0, 256, (2, 16), dtype=np.int64)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    prompt = [0, 7, 3, 12, 9]
    with torch.no_grad():
        seq = ref.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=1,
                           pad_token_id=1)[0, len(prompt):].tolist()
    with open_runner(art) as runner:
        got = runner.infer({**runner.spec.dummy(*ids.shape, 0), "input_ids": ids})["logits"]
        ours = runner.generate(prompt, 16, stop=1).tokens
    assert np.abs(got - want).max() < 1e-4 and (got.argmax(-1) == want.argmax(-1)).mean() == 1.0
    assert ours == seq, (ours, seq)
    with open_runner(d) as runner:  # MLA's compressed cache: 1 latent head, kv_lora_rank / qk_rope_head_dim
        k, v = runner.model.empty_past(1)[0]
        assert k.shape[1:] == (1, 0, 16) and v.shape[1:] == (1, 0, 8)


def test_dropped_expert_fails_the_export(dsv3, tmp_path):
    """What optimum's tracer does silently (an expert missing from the graph) must fail edgekit's check.
    The graph is the exported one with expert 5 of layer 1 zeroed, as if the tracer had dropped it."""
    import onnx
    from onnx import numpy_helper

    from edgekit.models.hf import check_experts
    from edgekit.resolve import Resolved, resolve
    from exporters.onnx import save_external
    from runtimes.onnxruntime import OnnxRuntimeRunner

    d, art = dsv3
    proto = onnx.load(str(art / "model.onnx"))
    [init] = [t for t in proto.graph.initializer if "layers.1.mlp.experts.w_down" in t.name]
    w = numpy_helper.to_array(init).copy()
    w[5] = 0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    (tmp_path / "broken").mkdir()
    save_external(proto, tmp_path / "broken" / "model.onnx")
    res = resolve(d)
    from edgekit.checkpoint import load_model

    model = load_model(res)
    with OnnxRuntimeRunner(Resolved("onnx", "broken", res.cfg, tmp_path / "broken")) as runner:
        with pytest.raises(EdgekitError, match="dropped or froze an expert"):
            check_experts(model, runner, runner.spec)
        with OnnxRuntimeRunner(Resolved("onnx", "ok", res.cfg, art)) as good:
            assert check_experts(model, good, good.spec)["passed"]


def test_info_counts_total_and_active_parameters_from_safetensors_headers(dsv3):
    info = api.model_info(dsv3[0])
    per_layer = 16 * (2 * 32 * 64 + 64 * 32)  # routed experts: gate_up [E, 2I, d] + down [E, d, I]
    p = info["params"]
    assert info["kind"] == "hf" and info["config"]["family"] == "hf-deepseek_v3"
    assert p["routed_experts"] == 2 * per_layer
    assert p["active"] == p["total"] - p["routed_experts"] + p["routed_experts"] * 2 // 16


# chat templates and bundles -------------------------------------------------------------------------
def test_chat_renders_the_template_with_the_generation_prompt(hf_models):
    d, art = hf_models["qwen2"]
    ids = [0, WORDS.index("user"), *(WORDS.index(w) for w in "the edge model".split()), WORDS.index("assistant")]
    from edgekit.hfconfig import HFTokenizer
    from edgekit.resolve import resolve

    assert HFTokenizer(d, resolve(d).cfg).chat("the edge model") == ("<s>user the edge model assistant", ids)
    a = api.generate(d, "the edge model", max_new_tokens=5, chat=True)
    b = api.generate(art, "the edge model", max_new_tokens=5, chat=True)  # the export carries the template
    assert a["chat_prompt"] == "<s>user the edge model assistant" and a["tokens"] == b["tokens"]
    with torch.no_grad():  # the same tokens as transformers' generate on the rendered ids
        want = _reference(d).generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, eos_token_id=1,
                                      pad_token_id=1)[0, len(ids):].tolist()
    assert a["tokens"] == want


def test_chat_errors_are_one_line(hf_models, cli):
    from typer.testing import CliRunner

    from edgekit.cli import app

    llama, _ = hf_models["llama"]  # no tokenizer_config.json: no chat template
    qwen, _ = hf_models["qwen2"]
    runner = CliRunner()
    ok = runner.invoke(app, ["generate", str(qwen), "--chat", "the edge model", "--max-new-tokens", "2", "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["chat_prompt"].endswith("assistant")
    for args, message in ((["generate", str(llama), "--chat", "hi"], "llama has no chat template"),
                          (["generate", "r1-tiny", "--chat", "hi"], "r1-tiny has no chat template"),
                          (["generate", str(qwen)], "generate needs one of --prompt or --chat"),
                          (["generate", str(qwen), "--prompt", "a", "--chat", "b"], "one of --prompt or --chat"),
                          (["run", str(qwen)], "run needs one of --prompt or --chat")):
        code, out, err = cli(*args)
        assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_bundle_of_a_hf_export_carries_its_tokenizer_and_runs(hf_models, tmp_path):
    import shutil

    from edgekit import bundle as bundles

    _, art = hf_models["qwen2"]
    bundle = tmp_path / "qwen2.tar.gz"
    bundles.package(art, "cpu", bundle)
    dest = tmp_path / "installed"
    bundles.install(bundle, dest, allow_unsigned=True)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in dest.iterdir()}
    got = bundles.run(dest, "the edge model runs", max_new_tokens=6, allow_unsigned=True)
    assert got["tokens"] == api.generate(art, "the edge model runs", max_new_tokens=6)["tokens"]
    # the bundle file: verify, install, run
    chat = bundles.run(bundle, "the edge model", max_new_tokens=2, chat=True, allow_unsigned=True)
    assert chat["chat_prompt"].startswith("<s>user")
    assert chat["tokens"] == api.generate(art, "the edge model", max_new_tokens=2, chat=True)["tokens"]
    # an HF export without its tokenizer is refused, not bundled with edgekit's byte tokenizer
    bare = tmp_path / "bare"
    shutil.copytree(art, bare)
    (bare / "tokenizer.json").unlink()
    from edgekit.artifact import read_manifest, write_manifest

    m = read_manifest(bare, verify=False)
    write_manifest(bare, **{k: v for k, v in m.items() if k not in ("files", "versions", "created")})
    with pytest.raises(EdgekitError, match="without tokenizer.json"):
        bundles.package(bare, "cpu", tmp_path / "bare.tar.gz")


def test_int8_keeps_moe_routers_fp32_and_quantizes_the_rest(dsv3, tmp_path):
    """The router decides each token's top-k experts; int8 there only adds routing flips (the model itself
    routes in fp32), so it stays float; the experts and every other large weight become int8."""
    import onnx

    from exporters.onnx_graph import router_weights
    from exporters.onnx_int8 import quantize_int8

    _, art = dsv3
    routers = router_weights(art / "model.onnx")
    assert routers == {f"model.hf.model.layers.{i}.mlp.gate.weight" for i in range(2)}
    quantize_int8(art / "model.onnx", tmp_path / "model.onnx")
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    inits = {t.name: t.data_type for t in graph.initializer}
    for r in routers:
        consumers = [n for n in graph.node if any(i.startswith(r) for i in n.input)]
        assert consumers and all(n.op_type == "MatMul" for n in consumers)
        assert all(inits[i] == onnx.TensorProto.FLOAT for n in consumers for i in n.input if i in inits)
    # the 3-D expert stacks [E, K, N] have no MatMulNBits form: per-tensor int8 (MatMulInteger); the rest block int8
    quantized = {i for n in graph.node if n.op_type == "MatMulInteger" for i in n.input}
    assert any("experts.w_gate_up" in i for i in quantized) and any("experts.w_down" in i for i in quantized)
    assert any(n.op_type == "MatMulNBits" for n in graph.node)
