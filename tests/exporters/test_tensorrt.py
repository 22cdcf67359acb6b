"""The TensorRT exporter on the CPU: operator check (exporters/trt_ops.py: per TensorRT version, into every If
branch), conditionals, graph transforms (exporters/trt_transforms.py: opset 17, fp16 storage, int4 weight-only
Q/DQ) and their numerics in ONNX Runtime, the recipe (exporters/trt_recipe.py: profiles derived from device
memory, trtexec), refusals (of export, and of build-engine: edgekit/engine.py), and one real export. Building and
running engines is in tests/runtimes/test_tensorrt.py (marked tensorrt: skipped without TensorRT and a GPU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import exporters.tensorrt as T
import exporters.trt_ops as ops
import exporters.trt_recipe as R
import exporters.trt_transforms as tx
import profiles
import runtimes.tensorrt as rt
import runtimes.tensorrt_build as tb
from edgekit import engine
from edgekit.errors import EdgekitError
from edgekit.models import preset
from edgekit.versions import compatible

F, I64, B = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL


def model_of(nodes, inputs, outputs, inits=(), opset=18):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def branch(name, nodes, out, elem=F, shape=("n", 4)):
    return helper.make_graph(nodes, name, [], [vi(out, elem, list(shape))])


def run(model, feeds):
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def if_model(then_nodes, then_out, else_nodes=None, else_out="e_out", cond_shape=(), extra_inits=()):
    """x [n, 4] -> If(sum(x) > 0) -> y; branches read x and outer initializers."""
    else_nodes = else_nodes or [helper.make_node("Identity", ["x"], [else_out], name="e_id")]
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Greater", ["s", "zero"], ["c0"], name="gt")]
    cond = "c0"
    if cond_shape == (1,):
        nodes.append(helper.make_node("Unsqueeze", ["c0", "ax0"], ["c1"], name="unsq"))
        cond = "c1"
    nodes.append(helper.make_node("If", [cond], ["y"], name="gate",
                                  then_branch=branch("then", then_nodes, then_out),
                                  else_branch=branch("else", else_nodes, else_out)))
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0"), *extra_inits]
    return model_of(nodes, [vi("x", F, ["n", 4])], [vi("y", F, ["n", 4])], inits)


# ------------------------------------------------------------------------------------------------
# operator support data and the check
# ------------------------------------------------------------------------------------------------
def test_op_tables_are_complete_and_sourced():
    text = ops.OPS_FILE.read_text()
    assert "onnx/onnx-tensorrt" in text and "Changelog.md" in text
    tables = ops.op_support()
    assert set(tables) == {"8.2", "8.5", "8.6", "10.3", "10.13"}
    for key, t in tables.items():
        assert {"max_opset", "opset_hard", "supported", "if_rule"} <= set(t), key
        assert "If" in t["supported"] and "MatMul" in t["supported"]
        assert "DynamicQuantizeLinear" not in t["supported"] and "MatMulInteger" not in t["supported"]


@pytest.mark.parametrize("stack,table", [("8.2.1", "8.2"), ("8.5.2", "8.5"), ("8.6.2", "8.6"), ("8.6", "8.6"),
                                         ("10.3", "10.3"), ("10.7", "10.3"), ("10.x", "10.3"), ("10.13", "10.13"),
                                         ("11.0", "10.13"), ("7.1", None)])
def test_stack_version_maps_to_a_table(stack, table):
    assert ops.data_version(stack) == table


def test_unsupported_and_ort_only_ops_are_named_with_their_place():
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"], name="dq"),
             helper.make_node("MatMulNBits", ["x", "w"], ["y"], domain="com.microsoft", name="mmnb"),
             helper.make_node("Relu", ["x"], ["r"], name="ok")]
    m = model_of(nodes, [vi("x", F, [2, 4])], [vi("y", F, [2, 4]), vi("r", F, [2, 4])])
    r = ops.check_ops(m, "10.3")
    assert not r["ok"]
    found = {(i["op"], i["node"], i["where"]) for i in r["issues"]}
    assert ("DynamicQuantizeLinear", "dq", "main") in found
    assert ("MatMulNBits", "mmnb", "main") in found
    assert "Relu" not in {i["op"] for i in r["issues"]}
    assert "com.microsoft" in ops.describe_issues(r)


def test_unsupported_op_inside_an_if_branch_is_found():
    m = if_model([helper.make_node("Unique", ["x"], ["u"], name="uniq"),
                  helper.make_node("Identity", ["x"], ["t_out"], name="t_id")], "t_out")
    r = ops.check_ops(m, "10.13")
    assert not r["ok"]
    (issue,) = r["issues"]
    assert issue["op"] == "Unique" and issue["node"] == "uniq" and issue["where"] == "main/gate.then_branch"
    assert "main/gate.then_branch/uniq" in ops.describe_issues(r)


def test_topk_with_run_time_k_needs_tensorrt_8_6():
    """R1's routing argsort exports as TopK with K = the block count (computed from a Shape): TensorRT 8.5
    requires K as an initializer (and float input); 8.6 added dynamic K (Changelog 8.6 EA)."""
    nodes = [helper.make_node("Shape", ["x"], ["shp"], name="shape"),
             helper.make_node("Gather", ["shp", "one"], ["k0"], axis=0, name="g"),
             helper.make_node("Unsqueeze", ["k0", "ax0"], ["k"], name="u"),
             helper.make_node("TopK", ["x", "k"], ["v", "idx"], axis=-1, name="sort"),
             helper.make_node("TopK", ["idx", "k"], ["v2", "rank"], axis=-1, name="argsort_of_argsort")]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    m = model_of(nodes, [vi("x", F, [3, "nb"])], [vi("v", F, [3, "nb"]), vi("rank", I64, [3, "nb"])], inits, opset=17)
    r85 = ops.check_ops(m, "8.5.2")
    whys = [i["why"] for i in r85["issues"]]
    assert any("must be an initializer" in w for w in whys)
    assert any("INT64 (imported as INT32) not supported" in w for w in whys)
    assert ops.check_ops(m, "8.6.2")["ok"] and ops.check_ops(m, "10.3")["ok"]
    assert not ops.check_ops(m, "10.3", topk_k_bound=5000)["ok"]  # "K input must be less than 3840"


def test_reciprocal_is_not_in_tensorrt_8_2():
    """RMSNorm's rsqrt exports as Sqrt + Reciprocal; the 8.2/8.4 tables list Reciprocal as unsupported
    (Jetson Nano's JetPack 4.6 ships TensorRT 8.2)."""
    m = model_of([helper.make_node("Reciprocal", ["x"], ["y"], name="rcp")], [vi("x", F, [2])], [vi("y", F, [2])],
                 opset=13)
    assert not ops.check_ops(m, "8.2.1")["ok"]
    assert ops.check_ops(m, "8.5.2")["ok"]


def test_opset_above_the_documented_one_is_an_error_for_8x_and_a_note_for_10x():
    m = model_of([helper.make_node("Relu", ["x"], ["y"], name="r")], [vi("x", F, [2])], [vi("y", F, [2])], opset=21)
    r8, r10 = ops.check_ops(m, "8.6.2"), ops.check_ops(m, "10.3")
    assert not r8["ok"] and r8["issues"][0]["op"] == "opset"
    assert r10["ok"] and "opset 21" in r10["notes"][0]


# ------------------------------------------------------------------------------------------------
# conditionals
# ------------------------------------------------------------------------------------------------
def test_conditionals_accept_a_scalar_bool_and_identical_branches():
    m = if_model([helper.make_node("Relu", ["x"], ["t_out"], name="t")], "t_out")
    (c,) = ops.check_conditionals(m)
    assert c == {"node": "main/gate", "condition": "0-D bool", "outputs": 1}


def test_conditional_with_a_1d_condition_fails_loudly():
    m = if_model([helper.make_node("Relu", ["x"], ["t_out"], name="t")], "t_out", cond_shape=(1,))
    with pytest.raises(EdgekitError, match="main/gate: condition 'c1' is BOOL with shape \\[1\\].*0-D bool"):
        ops.check_conditionals(m)


def test_conditional_with_differently_shaped_branches_fails_loudly():
    m = if_model([helper.make_node("Relu", ["x"], ["t_out"], name="t")], "t_out")
    m.graph.node[-1].attribute[1].g.output[0].type.tensor_type.shape.dim[1].dim_value = 8  # else: [n, 8]
    with pytest.raises(EdgekitError, match="branch outputs differ.*identically shaped"):
        ops.check_conditionals(m)


def test_conditional_with_one_output_name_for_both_branches_fails():
    m = if_model([helper.make_node("Relu", ["x"], ["same"], name="t")], "same",
                 else_nodes=[helper.make_node("Identity", ["x"], ["same"], name="e")], else_out="same")
    with pytest.raises(EdgekitError, match="distinct branch output names"):
        ops.check_conditionals(m)


# ------------------------------------------------------------------------------------------------
# graph transforms and their numerics in ONNX Runtime
# ------------------------------------------------------------------------------------------------
def test_opset18_reduce_is_rewritten_for_opset17_with_identical_results():
    nodes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=1, name="mean"),
             helper.make_node("Pad", ["x", "pads"], ["p"], name="pad")]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array([0, 1, 0, 1], np.int64), "pads")]
    m = model_of(nodes, [vi("x", F, [2, 3])], [vi("y", F, [2, 1]), vi("p", F, [2, 5])], inits)
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    want = run(m, {"x": x})
    m17 = tx.downgrade_to_opset17(m)
    assert m17.opset_import[0].version == 17
    assert [a.name for a in m17.graph.node[0].attribute] == ["keepdims", "axes"]
    for a, b in zip(want, run(m17, {"x": x})):
        np.testing.assert_array_equal(a, b)


def test_opset17_rewrite_refuses_what_it_does_not_know():
    m = model_of([helper.make_node("Split", ["x"], ["a", "b"], num_outputs=2, axis=0, name="split")],
                 [vi("x", F, [4])], [vi("a", F, [2]), vi("b", F, [2])])
    with pytest.raises(EdgekitError, match="Split changed in opset 18"):
        tx.downgrade_to_opset17(m)


def shared_weight_model(rng, k=64, n=48, vocab=40):
    """R1's shape in miniature: an embedding (Gather), a weight W [in, out] read by a MatMul in the main graph
    and by MatMuls inside both If branches, a weight read through a Transpose (not quantizable: the DESIGN.md
    case of nn.Linear's [out, in] weight), and a bias."""
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
    emb = rng.standard_normal((vocab, k)).astype(np.float32) * 0.02
    bias = rng.standard_normal((n,)).astype(np.float32)
    add_w = rng.standard_normal((k, k)).astype(np.float32) * 0.02
    then = helper.make_graph([helper.make_node("MatMul", ["h2", "W"], ["t_mm"], name="t_mm"),
                              helper.make_node("Add", ["t_mm", "bias"], ["t_out"], name="t_add")],
                             "then", [], [vi("t_out", F, ["n", n])])
    els = helper.make_graph([helper.make_node("MatMul", ["h", "W"], ["e_out"], name="e_mm")],
                            "else", [], [vi("e_out", F, ["n", n])])
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h"], axis=0, name="embed"),
             helper.make_node("Transpose", ["A"], ["At"], perm=[1, 0], name="t_a"),
             helper.make_node("MatMul", ["h", "At"], ["hA"], name="mm_a"),
             helper.make_node("Add", ["h", "hA"], ["h2"], name="add_a"),
             helper.make_node("MatMul", ["h", "W"], ["main_mm"], name="main_mm"),
             helper.make_node("If", ["flag"], ["branch_out"], name="gate", then_branch=then, else_branch=els),
             helper.make_node("Add", ["main_mm", "branch_out"], ["y"], name="out")]
    inits = [numpy_helper.from_array(a, nm) for a, nm in ((w, "W"), (emb, "E"), (bias, "bias"), (add_w, "A"))]
    m = model_of(nodes, [vi("ids", I64, ["n"]), vi("flag", B, [])], [vi("y", F, ["n", n])], inits)
    return m, {"W": w, "E": emb, "bias": bias, "A": add_w}


def reference(weights, ids, flag):
    h = weights["E"][ids]
    mm = h @ weights["W"]
    br = ((h + h @ weights["A"].T) @ weights["W"] + weights["bias"]) if flag else h @ weights["W"]
    return mm + br


def test_fp16_storage_keeps_fp32_compute_and_outer_scope_readers():
    rng = np.random.default_rng(1)
    m, w = shared_weight_model(rng)
    info = tx.store_fp16(m)
    assert info["fp16_weights"] == 4
    assert tx.stored_bytes(m) == sum(a.size * 2 for a in w.values())
    ids = np.array([1, 5, 39], np.int64)
    for flag in (True, False):
        (y,) = run(m, {"ids": ids, "flag": np.array(flag)})
        half = {k: v.astype(np.float16).astype(np.float32) for k, v in w.items()}
        np.testing.assert_allclose(y, reference(half, ids, flag), rtol=1e-5, atol=1e-6)


def test_fp16_storage_keeps_out_of_range_weights_fp32():
    big = numpy_helper.from_array(np.full((4, 4), 1e6, np.float32), "big")
    m = model_of([helper.make_node("MatMul", ["x", "big"], ["y"], name="mm")], [vi("x", F, [1, 4])],
                 [vi("y", F, [1, 4])], [big])
    assert tx.store_fp16(m)["kept_fp32_out_of_range"] == ["big"]


def test_int4_qdq_numerics_in_onnxruntime_and_shared_weights_stored_once(tmp_path):
    rng = np.random.default_rng(2)
    m, w = shared_weight_model(rng, k=192, n=64, vocab=300)  # K = 192: two blocks of 128, the second padded
    fp16_bytes = tx.fp16_reference_bytes(m)
    info = tx.quantize_int4(m, min_elements=1024)
    tx.store_fp16(m)
    assert m.opset_import[0].version == 21
    quantized = {q["name"]: q for q in info["quantized"]}
    assert quantized["W"]["axis"] == 0 and quantized["W"]["readers"] == 3  # main MatMul + both branches
    assert quantized["E"]["axis"] == 1  # the embedding table: blocks along each row
    assert "A" in info["left_float"]  # read by a Transpose: stays float (fp16 storage)
    # every DequantizeLinear sits in the graph of the MatMul it feeds, blocked along K
    for where, _g, node, _t, _c in ops.walk(m.graph):
        if node.op_type == "MatMul" and node.input[1].startswith("W"):
            (dq,) = [n for w2, _g2, n, _t2, _c2 in ops.walk(m.graph) if w2 == where and node.input[1] in n.output]
            attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
            assert dq.op_type == "DequantizeLinear" and attrs == {"axis": 0, "block_size": 128}
    # W's int4 bytes are stored once although main graph and branches each hold an initializer for them
    w_bytes = 192 * 64 // 2 + 2 * 64 * 4  # int4 W + fp32 scales (2 blocks x 64 columns)
    e_bytes = 300 * 192 // 2 + 300 * 2 * 4  # int4 E + its row-block scales
    expected = w_bytes + e_bytes + 192 * 192 * 2 + 64 * 2  # + fp16 A and bias
    assert tx.stored_bytes(m) == expected < fp16_bytes
    tx.save_deduplicated(m, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").stat().st_size < expected + 64 * 6  # W once, not three times (+ alignment)
    assert tx.stored_bytes(m) == expected  # also counted from the saved external-data ranges
    deq = {"W": tx.int4_dequantized(w["W"], 0), "E": tx.int4_dequantized(w["E"], 1),
           "A": w["A"].astype(np.float16).astype(np.float32), "bias": w["bias"].astype(np.float16).astype(np.float32)}
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([0, 7, 299], np.int64)
    for flag in (True, False):
        (y,) = sess.run(None, {"ids": ids, "flag": np.array(flag)})
        np.testing.assert_allclose(y, reference(deq, ids, flag), rtol=1e-3, atol=1e-4)  # ORT: MatMulNBits
        exact = reference(w, ids, flag)
        cos = (y * exact).sum() / np.linalg.norm(y) / np.linalg.norm(exact)
        assert cos > 0.97


def test_int4_blocks_are_symmetric_within_range_and_close():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 5)).astype(np.float32)
    q, scale = tx._int4_blocks(w, 0, 128)
    assert q.min() >= -8 and q.max() <= 7 and scale.shape == (3, 5)
    err = np.linalg.norm(tx.int4_dequantized(w, 0) - w) / np.linalg.norm(w)
    assert err < 0.12


# ------------------------------------------------------------------------------------------------
# recipe: profiles from device memory, trtexec
# ------------------------------------------------------------------------------------------------
def test_profiles_grow_with_device_memory_and_stay_within_the_context():
    cfg = preset("r1-mini")
    weights = 2 * 57_126_254
    small = R.derive_profiles(cfg, 3 * R.GIB, weights, 2048)["dims"]
    large = R.derive_profiles(cfg, 60 * R.GIB, weights, 2048)["dims"]
    assert small["decode"]["batch"][2] < large["decode"]["batch"][2]
    for dims in (small, large):
        for d in dims.values():
            for lo, opt, hi in d.values():
                assert 0 <= lo <= opt <= hi
        assert dims["decode"]["seq"] == [1, 1, 1]
        assert dims["decode"]["past"][2] == 2047
        assert dims["prefill"]["seq"][2] + dims["prefill"]["past"][2] == 2048  # keys never exceed the context


def test_tight_memory_gives_chunked_prefill():
    cfg = preset("r1-mini")
    d = R.derive_profiles(cfg, int(0.6 * R.GIB), 2 * 57_126_254, 2048)["dims"]["prefill"]
    assert d["seq"][2] < 2048 and d["past"][2] == 2048 - d["seq"][2]


def test_v3_decode_past_is_its_segment_memory():
    cfg = preset("v3-mini")
    d = R.derive_profiles(cfg, 16 * R.GIB, 300_000_000, 2048)["dims"]["decode"]
    assert d["past"][2] == cfg.memory_len


def test_model_too_big_or_context_too_long_is_a_clear_error():
    cfg = preset("r1-8.5b")
    with pytest.raises(EdgekitError, match="does not fit on nano.*--int4"):
        R.derive_profiles(cfg, 4 * R.GIB, 17 * R.GIB, 8192, "nano")
    with pytest.raises(EdgekitError, match="context 8192 does not fit.*lower --context"):
        R.derive_profiles(cfg, int(1.5 * R.GIB), 1 * R.GIB, 8192, "tiny-gpu")


def test_recipe_for_a_jetson_and_its_trtexec_command():
    cfg = preset("r1-tiny")
    orin = profiles.load("jetson-orin-nano-8gb")
    recipe = R.make_recipe(cfg, orin, "fp16", 512, 300_000, 17, ["8.6.2", "10.3"], {"8.5.2": "TopK ..."})
    json.dumps(recipe)
    assert recipe["sm"] == "8.7" and recipe["builder_flags"] == ["FP16"]
    assert recipe["tensorrt"] == {"versions": ["8.6.2", "10.3"], "refused": {"8.5.2": "TopK ..."}}
    assert recipe["timing_cache"] == "timing.cache" and recipe["workspace_bytes"] >= 64 * R.MIB
    assert [p["name"] for p in recipe["profiles"]] == ["decode", "prefill"]
    names = ["input_ids", "attention_mask"] + [f"past.{i}.{kv}" for i in range(cfg.n_layers) for kv in ("key", "value")]
    for p in recipe["profiles"]:
        assert list(p["shapes"]) == names
        assert p["shapes"]["past.3.value"]["max"] == [p["dims"]["batch"][2], 4, p["dims"]["past"][2], 16]
        d = p["dims"]
        assert p["shapes"]["attention_mask"]["max"] == [d["batch"][2], d["past"][2] + d["seq"][2]]  # past + seq
    cmd = recipe["trtexec"]
    assert cmd.startswith("trtexec --onnx=model.onnx --fp16 --minShapes=input_ids:1x1,attention_mask:1x1,"
                          "past.0.key:1x4x0x16")
    assert "--maxShapes=" in cmd and "--timingCacheFile=timing.cache" in cmd and "--saveEngine=model.engine" in cmd
    assert f"--memPoolSize=workspace:{recipe['workspace_bytes'] // R.MIB}" in cmd
    assert R.make_recipe(cfg, orin, "int4", 512, 100_000, 21, ["10.3"], {})["builder_flags"] == ["FP16", "INT4"]


# ------------------------------------------------------------------------------------------------
# refusals
# ------------------------------------------------------------------------------------------------
def test_int8_on_tensorrt_is_refused_naming_what_works():
    with pytest.raises(EdgekitError) as e:
        R.check_precision("int8", profiles.load("a100-40gb"))
    msg = str(e.value)
    assert "DynamicQuantizeLinear" in msg and "fp16" in msg and "--precision int4" in msg


def test_int4_is_refused_where_tensorrt_10_or_ampere_is_missing():
    with pytest.raises(EdgekitError, match="int4 weight-only.*TensorRT 10"):
        R.check_precision("int4", profiles.load("jetson-nano"))
    assert R.check_precision("int4", profiles.load("jetson-agx-orin-64gb"))["flags"] == ["FP16", "INT4"]
    with pytest.raises(EdgekitError, match="unknown TensorRT precision 'bf8'"):
        R.check_precision("bf8", profiles.load("a100-40gb"))


def test_export_refusals_come_before_any_work(tmp_path):
    from edgekit.models import build

    model = build("r1-tiny")
    with pytest.raises(EdgekitError, match="needs --device"):
        T.export(model, tmp_path, None)
    with pytest.raises(EdgekitError, match="--int8 is ONNX Runtime's dynamic int8"):
        T.export(model, tmp_path, "jetson-agx-orin-64gb", precision="int8")
    with pytest.raises(EdgekitError, match="--context 4096 is outside 2..1024"):
        T.export(model, tmp_path, "jetson-agx-orin-64gb", context=4096)
    with pytest.raises(EdgekitError, match="unknown device"):
        T.export(model, tmp_path, "jetson-orin-nanoo")


def test_cli_refuses_int8_for_tensorrt_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from edgekit.cli import app

    r = CliRunner().invoke(app, ["export", "r1-tiny", "--format", "tensorrt", "--device", "a100-40gb", "--int8",
                                 "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "dynamic int8" in str(r.exception) and not (tmp_path / "x").exists()


def fake_artifact(tmp_path, sm="8.7", versions=("10.3",), onnx: bool = False):
    """A TensorRT artifact directory as export writes it, with a recipe for `sm` / `versions` (no real ONNX
    needed: the refusals come first; `onnx` lists an empty model.onnx, since loading refuses unlisted files)."""
    from edgekit.artifact import write_manifest

    art = tmp_path / "art"
    art.mkdir()
    (art / "config.json").write_text(json.dumps(preset("r1-tiny").to_dict()))
    recipe = {"edgekit_recipe": tb.RECIPE_VERSION, "sm": sm, "device": "jetson-agx-orin-64gb", "onnx": "model.onnx",
              "engine": "model.engine", "timing_cache": "timing.cache", "precision": "fp16",
              "tensorrt": {"versions": list(versions), "refused": {}}, "builder_flags": ["FP16"]}
    (art / tb.RECIPE_FILE).write_text(json.dumps(recipe))
    if onnx:
        (art / "model.onnx").write_bytes(b"")
    write_manifest(art, format="tensorrt", model="r1-tiny", precision="fp16")
    return art


def test_build_engine_refuses_without_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)  # as if not installed
    art = fake_artifact(tmp_path)
    with pytest.raises(EdgekitError, match="TensorRT is not installed"):
        engine.build_engine(art)
    assert rt.tensorrt_available().startswith("TensorRT is not installed")


def test_build_engine_refuses_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "load_tensorrt", lambda: type("trt", (), {"__version__": "10.3.0"}))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(EdgekitError, match="no CUDA GPU is visible"):
        engine.build_engine(fake_artifact(tmp_path))


def test_build_engine_refuses_another_sm_or_tensorrt_unless_forced(tmp_path, monkeypatch):
    built = []

    def fake_build(directory, recipe, log=None):  # what build_from_recipe leaves in its directory
        built.append(directory)
        (Path(directory) / recipe["engine"]).write_bytes(b"engine")
        (Path(directory) / recipe["timing_cache"]).write_bytes(b"cache")
        return {"status": "built", "sm": "8.0", "tensorrt": "10.7.0"}

    monkeypatch.setattr(engine, "tensorrt_environment", lambda: (None, "10.7.0", "8.0"))
    monkeypatch.setattr(engine, "build_from_recipe", fake_build)
    monkeypatch.setattr(engine, "_validate_engine_vs_onnx", lambda *a: {"passed": True})
    art = fake_artifact(tmp_path, onnx=True)
    with pytest.raises(EdgekitError, match="TensorRT 10.7.0 here, recipe made for 10.3; GPU sm_80 here, recipe "
                                           "made for sm_87.*--force"):
        engine.build_engine(art)
    assert not built and not (art / "model.engine").exists()
    r = engine.build_engine(art, force=True)
    assert r["forced"] and len(r["mismatch"]) == 2
    assert (art / "model.engine").read_bytes() == b"engine" and (art / "engine.json").is_file()
    assert json.loads((art / "engine.json").read_text())["forced"]
    monkeypatch.setattr(engine, "tensorrt_environment", lambda: (None, "10.3.0.26", "8.7"))  # the recipe's target
    with pytest.raises(EdgekitError, match="already has model.engine.*--force"):
        engine.build_engine(art)
    from edgekit.artifact import read_manifest

    read_manifest(art)  # the hashed manifest is untouched: still verifies


def test_build_engine_refuses_other_artifacts_and_bundle_files(tmp_path):
    from edgekit.artifact import write_manifest

    write_manifest(tmp_path, format="onnx", model="r1-tiny")
    with pytest.raises(EdgekitError, match="is a onnx artifact, not a TensorRT one"):
        engine.build_engine(tmp_path)
    bundle = tmp_path / "b.tar.gz"
    bundle.write_bytes(b"x")
    with pytest.raises(EdgekitError, match="is a bundle file.*edgekit install"):
        engine.build_engine(bundle)


def test_cli_build_engine_fails_cleanly(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edgekit.cli import app

    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)
    r = CliRunner().invoke(app, ["build-engine", str(fake_artifact(tmp_path))])
    assert r.exit_code != 0 and isinstance(r.exception, EdgekitError)
    assert "TensorRT is not installed" in str(r.exception)


@pytest.mark.parametrize("installed,versions,ok", [("10.3.0.26", ["10.3"], True), ("10.3.1", ["8.6.2", "10.3"], True),
                                                   ("10.7.0", ["10.3"], False), ("8.6.2.3", ["8.6.2"], True),
                                                   ("10.13.0", ["10.x"], True), ("8.5.2", ["10.x"], False)])
def test_tensorrt_compatibility(installed, versions, ok):
    assert compatible(installed, versions) is ok


# ------------------------------------------------------------------------------------------------
# one real export of r1-tiny's graph as the TensorRT path traces it, shared by the tests below
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trt_graph(tmp_path_factory):
    """r1-tiny's fp32 graph with a constant routing TopK k (static_route_slots), exported once."""
    from edgekit.models import build
    from exporters.onnx import export_graph

    d = tmp_path_factory.mktemp("trt-graph")
    model = build("r1-tiny")
    model.static_route_slots = True
    export_graph(model, d / "model.onnx")
    return d


@pytest.fixture()
def reuse_graph(trt_graph, monkeypatch):
    import exporters.onnx as onnx_exporter

    def copy_graph(model, path, dtype=None):
        assert model.cfg.name == "r1-tiny" and model.static_route_slots  # the exporter asked for a constant k
        shutil.copy(trt_graph / "model.onnx", path)
        for extra in trt_graph.glob("model.onnx.data"):
            shutil.copy(extra, Path(path).parent / extra.name)

    monkeypatch.setattr(onnx_exporter, "export_graph", copy_graph)


@pytest.mark.slow
def test_export_r1_tiny_for_jetson_orin_fp16(tmp_path, reuse_graph):
    from edgekit import api
    from edgekit.artifact import read_manifest

    out = tmp_path / "trt"
    r = api.export("r1-tiny", "tensorrt", out, device="jetson-agx-orin-64gb")
    m = read_manifest(out)
    assert m["format"] == "tensorrt" and m["precision"] == "fp16" and m["opset"] == 17
    assert [c["condition"] for c in m["conditionals"]] == ["0-D bool", "0-D bool"]
    # R1's routing TopK has a fixed maximum k under export (masked past the per-query k), which TensorRT 8.5
    # (JetPack 5.1) takes too; a dynamic k would be refused there (test_check_ops_* above)
    assert m["tensorrt"]["versions"] == ["8.5.2", "8.6.2", "10.3"] and not m["tensorrt"]["refused"]
    assert m["engine"]["status"] == "not built" and "build-engine" in m["engine"]["how"]
    v = m["validation"]["onnxruntime_cpu"]
    assert v["vs_fp32"]["passed"] and v["vs_fp32"]["logit_cosine_mean"] > 0.999
    assert v["vs_stored_weights"]["max_abs_diff"] < 1e-4
    recipe = json.loads((out / tb.RECIPE_FILE).read_text())
    assert recipe["sm"] == "8.7" and recipe["context"] == 1024 and r["files"]
    # the artifact runs in ONNX Runtime as it is (no engine here)
    from runtimes import open_runner

    with open_runner(out) as runner:
        assert runner.name == "onnxruntime"
        logits, executed = runner.session(1).step(np.array([[256, 104, 105]]))
        assert logits.shape == (1, 259) and executed.shape == (4,)


@pytest.mark.slow
def test_export_r1_tiny_int4_weight_only(tmp_path, reuse_graph):
    from edgekit import api

    out = tmp_path / "trt-int4"
    r = api.export("r1-tiny", "tensorrt", out, device="jetson-agx-orin-64gb", precision="int4")
    assert r["opset"] == 21 and r["tensorrt"]["versions"] == ["10.3"]
    assert r["weights"]["ratio_to_fp16"] < 0.30
    assert r["weights"]["int4_readers"] > r["weights"]["int4_tensors"]  # shared blocks: one copy, several readers
    v = r["validation"]["onnxruntime_cpu"]
    assert v["vs_stored_weights"]["logit_cosine_mean"] > 0.999  # the Q/DQ graph computes what it stores
    assert v["vs_fp32"]["passed"]  # the int4 fidelity floor (random weights: cosine; argmax is reported)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert ops.check_ops(graph, "10.3")["ok"] and not ops.check_ops(graph, "8.6.2")["ok"]


@pytest.mark.slow
def test_int4_fidelity_floor_fails_loudly_and_says_the_graph_is_right(tmp_path, reuse_graph):
    from edgekit.models import build

    with pytest.raises(EdgekitError, match="int4 fidelity: validation failed: logit cosine .* < 0.9999 \\(the graph "
                                           "itself matches PyTorch with the stored weights"):
        engine.export(build("r1-tiny"), tmp_path, "jetson-agx-orin-64gb", precision="int4", min_cosine=0.9999)
