"""The ONNX exporter: graph structure, gates as If, validation, int8 inside If branches, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgekit import api
from edgekit.artifact import read_manifest
from edgekit.errors import EdgekitError
from edgekit.resolve import resolve
from edgekit.spec import DecoderSpec
from exporters.onnx_graph import graph_ops, iter_graphs, large_float_weights
from runtimes import open_runner


def test_r1_gates_are_if_nodes_and_thresholds_an_input(onnx_r1_tiny):
    m = read_manifest(onnx_r1_tiny)
    cfg = resolve(onnx_r1_tiny).cfg
    assert m["format"] == "onnx" and m["precision"] == "fp32"
    assert graph_ops(onnx_r1_tiny / "model.onnx")["If"] == len(cfg.gated_layers)
    model = onnx.load(str(onnx_r1_tiny / "model.onnx"), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    assert [i.name for i in model.graph.input] == DecoderSpec(cfg).input_names
    dims = [d.dim_param or d.dim_value for d in inputs["past.0.key"].type.tensor_type.shape.dim]
    assert dims == ["batch", cfg.n_heads, "past", cfg.head_dim]
    assert [o.name for o in model.graph.output][-1] == "executed"
    v = m["validation"]["fp32"]
    assert v["passed"] and v["max_abs_diff"] <= 1e-4 and v["distinct_skip_patterns"] >= 3
    assert {c["setting"] for c in v["cases"]} >= {"run-all", "skip-all-gated", "skip-alternate"}


def test_one_file_runs_every_skip_pattern(onnx_r1_tiny):
    cfg = resolve(onnx_r1_tiny).cfg
    spec = DecoderSpec(cfg)
    n = cfg.n_layers
    with open_runner(onnx_r1_tiny) as ort_runner, open_runner("r1-tiny", "torch") as torch_runner:
        for thr, expect in [(np.zeros(n), [True] * n),
                            (np.full(n, 2.0), [i not in cfg.gated_layers for i in range(n)])]:
            feeds = spec.dummy(1, 3, 5, seed=9, thresholds=thr.astype(np.float32))
            got, ref = ort_runner.infer(feeds), torch_runner.infer(feeds)
            assert got["executed"].tolist() == expect
            assert np.abs(got["logits"] - ref["logits"]).max() <= 1e-4


@pytest.mark.parametrize("fixture,name", [("onnx_r1_tiny", "r1-tiny"), ("onnx_v3_tiny", "v3-tiny")])
def test_artifact_greedy_tokens_equal_pytorch(fixture, name, request):
    artifact = request.getfixturevalue(fixture)
    a = api.generate(artifact, "The edge is", max_new_tokens=12)
    b = api.generate(name, "The edge is", max_new_tokens=12)
    assert a["runtime"] == "onnxruntime" and b["runtime"] == "torch"
    assert a["tokens"] == b["tokens"]
    if name == "r1-tiny":
        c = api.generate(artifact, "The edge is", max_new_tokens=4, threshold=2.0)
        assert c["skipped"] == 4 * 2


def test_v3_graph_has_no_gates_and_truncates_memory(onnx_v3_tiny):
    assert "If" not in graph_ops(onnx_v3_tiny / "model.onnx")
    cfg = resolve(onnx_v3_tiny).cfg
    spec = DecoderSpec(cfg)
    with open_runner(onnx_v3_tiny) as r:
        out = r.infer(spec.dummy(1, 4, cfg.memory_len - 1, seed=1))
    assert out["present.0.key"].shape[2] == cfg.memory_len


def test_int8_quantizes_inside_if_branches_once(onnx_r1_tiny_int8, onnx_r1_tiny):
    path = onnx_r1_tiny_int8 / "model.onnx"
    m = read_manifest(onnx_r1_tiny_int8)
    assert m["precision"] == "int8"
    assert large_float_weights(path) == []
    assert large_float_weights(onnx_r1_tiny / "model.onnx", limit=8 * 1024)  # the fp32 file has them
    model = onnx.load(str(path), load_external_data=False)
    run_branches = [g for where, g in iter_graphs(model.graph) if where.endswith("then_branch")]
    assert len(run_branches) == len(resolve(onnx_r1_tiny_int8).cfg.gated_layers)
    assert all(sum(n.op_type == "MatMulNBits" for n in g.node) == 6 for g in run_branches)  # q, o, 3 MLP, relpos
    # shared R1 weights: one int8 copy per unique block weight, not one per layer
    block = m["quantization"]["block"]
    int8_weights = [t.name for _, g in iter_graphs(model.graph) for t in g.initializer
                    if t.data_type == onnx.TensorProto.UINT8 and t.name.endswith(f"_Q8B{block}")]
    cfg = resolve(onnx_r1_tiny_int8).cfg
    per_block = 8  # q, k, v, o, relpos gate, MLP gate, up, down
    block_weights = [n for n in int8_weights if ".blocks." in n]
    assert len(block_weights) == len(set(block_weights)) == per_block * cfg.unique_blocks
    v = m["validation"]["int8"]
    assert v["logit_cosine_mean"] >= 0.99 and v["argmax_agreement"] >= 0.9


def test_int8_size_ratio_recorded(onnx_v3_tiny_int8):
    m = read_manifest(onnx_v3_tiny_int8)
    s = m["size"]
    on_disk = sum(p.stat().st_size for p in onnx_v3_tiny_int8.glob("model.onnx*"))
    assert s["int8_bytes"] == on_disk and s["int8_over_fp32"] == round(on_disk / s["fp32_bytes"], 4)
    assert s["int8_over_fp32"] < 0.5  # tiny: small tables weigh more; mini presets meet 26 % (bench/)


def test_altered_or_missing_artifact_file_is_refused(onnx_v3_tiny, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(onnx_v3_tiny, copy)
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (copy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(EdgekitError, match="does not match its sha256"):
        resolve(copy)
    (copy / "model.onnx.data").unlink()
    with pytest.raises(EdgekitError, match="missing"):
        open_runner(copy)


def test_unknown_format_and_existing_out(cli, tmp_path, onnx_v3_tiny):
    code, _, err = cli("export", "v3-tiny", "--format", "onnxx", "--out", tmp_path / "x")
    assert code == 1 and "unknown format 'onnxx'" in err and "did you mean 'onnx'" in err
    assert not (tmp_path / "x").exists()
    before = sorted(p.name for p in onnx_v3_tiny.iterdir())
    code, _, err = cli("export", "v3-tiny", "--out", onnx_v3_tiny)
    assert code == 1 and "already exists" in err and "--force" in err
    assert sorted(p.name for p in onnx_v3_tiny.iterdir()) == before


def test_unwritable_out(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli("export", "v3-tiny", "--out", blocker / "sub")
    assert code == 1 and err.startswith("error: ") and "is a file, not a directory" in err and err.count("\n") == 1
    assert not (blocker.parent / "sub").exists() and blocker.read_text() == "x"


def test_mismatched_checkpoint_is_refused(cli, tmp_path):
    from edgekit.checkpoint import save_checkpoint
    from edgekit.models import build

    (tmp_path / "ck").mkdir()
    save_checkpoint(build("v3-tiny"), tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg | {"n_layers": 5}))
    code, _, err = cli("export", tmp_path / "ck", "--out", tmp_path / "out")
    assert code == 1 and "does not match config.json" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "ck"]


def test_disk_full_leaves_nothing(tmp_path):
    """Export v3-tiny under a 256 KiB file-size limit: one-line error, exit 1, no partial directory."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))\n"
        "sys.argv = ['edgekit', 'export', 'v3-tiny', '--out', sys.argv[1]]\n"
        "from edgekit.cli import main\n"
        "main()\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "EDGEKIT_QUIET": "1"}
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).parents[2], timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no space left") and "Traceback" not in p.stderr
    assert list(tmp_path.iterdir()) == []


def test_torch_int8_quantize_round_trip(tmp_path, cli):
    code, out, err = cli("quantize", "r1-tiny", "--out", tmp_path / "q", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["precision"] == "int8" and r["size"]["int8_over_fp32"] < 0.6
    assert r["validation"]["int8"]["logit_cosine_mean"] >= 0.99
    assert r["validation"]["int8"]["inputs"] == "random tokens"
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith("weight_int8")}
    assert dtypes == {"I8"}
    g = api.generate(tmp_path / "q", "hi", max_new_tokens=4)
    assert g["runtime"] == "torch" and len(g["tokens"]) == 4


def test_fidelity_data_is_the_text_the_int8_check_decodes(tmp_path, cli):
    from edgekit.tokenizer import ByteTokenizer

    text = tmp_path / "prompts.txt"
    text.write_text("sort 83751=13578\nrev hello=olleh\n")
    code, out, err = cli("quantize", "r1-tiny", "--out", tmp_path / "q", "--fidelity-data", text, "--json")
    assert code == 0, err
    n = len(ByteTokenizer().encode(text.read_text()))  # the model's tokenizer: bytes (+ BOS)
    assert json.loads(out)["validation"]["int8"]["inputs"] == f"text from {text} ({n} tokens)"
    for bad, why in ((tmp_path / "missing.txt", "does not exist"), (tmp_path / "empty.txt", "is empty")):
        if bad.name == "empty.txt":
            bad.write_text(" \n")
        code, out, err = cli("quantize", "r1-tiny", "--out", tmp_path / "q2", "--fidelity-data", bad)
        assert code == 1 and why in err and "--fidelity-data" in err and "Traceback" not in err
        assert not (tmp_path / "q2").exists()


def _two_gated_layers(size_of: tuple[str, str] = ("x", "x")):
    """x -> If(c0){ x * (len(x) + 1) } -> If(c1){ . * (len(x) + 1) }: the size work is data-independent and
    the same in both branches (as R1's positional routing is); the multiplications depend on x. size_of: the
    value each branch reads its size from (R1's branches read it off their own input)."""
    from onnx import TensorProto, helper

    def branch(name: str, src: str):
        one = helper.make_tensor(f"{name}_one", TensorProto.FLOAT, [], [1.0])
        nodes = [helper.make_node("Shape", [size_of[int(name[-1])]], [f"{name}_shape"]),
                 helper.make_node("Cast", [f"{name}_shape"], [f"{name}_n"], to=TensorProto.FLOAT),
                 helper.make_node("Constant", [], [f"{name}_c"], value=one),
                 helper.make_node("Add", [f"{name}_n", f"{name}_c"], [f"{name}_scale"]),
                 helper.make_node("Mul", [src, f"{name}_scale"], [f"{name}_out"])]
        out = helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["n"])
        return helper.make_graph(nodes, name, [], [out])

    def skip(name: str, src: str):
        return helper.make_graph([helper.make_node("Identity", [src], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["n"])])

    nodes = [helper.make_node("If", ["c0"], ["h0"], then_branch=branch("run0", "x"), else_branch=skip("skip0", "x")),
             helper.make_node("If", ["c1"], ["h1"], then_branch=branch("run1", "h0"),
                              else_branch=skip("skip1", "h0"))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
              *(helper.make_tensor_value_info(c, TensorProto.BOOL, []) for c in ("c0", "c1"))]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("h1", TensorProto.FLOAT, ["n"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_hoisting_moves_data_independent_branch_work_out_once_and_keeps_outputs():
    import onnxruntime as ort

    from exporters.onnx import hoist_branch_invariants

    before = _two_gated_layers()
    after = _two_gated_layers()
    assert hoist_branch_invariants(after) == {"hoisted": 8, "merged": 4}  # 4 size nodes x 2 branches, one copy kept
    onnx.checker.check_model(after)
    assert [n.op_type for n in after.graph.node] == ["Shape", "Cast", "Constant", "Add", "If", "If"]
    assert all([n.op_type for n in a.g.node] in (["Mul"], ["Identity"]) for n in after.graph.node
               if n.op_type == "If" for a in n.attribute)  # only the data-dependent op stays in the branch
    x = np.arange(1, 4, dtype=np.float32)
    for c0, c1 in ((True, True), (True, False), (False, True), (False, False)):
        feeds = {"x": x, "c0": np.array(c0), "c1": np.array(c1)}
        want = ort.InferenceSession(before.SerializeToString()).run(None, feeds)[0]
        got = ort.InferenceSession(after.SerializeToString()).run(None, feeds)[0]
        np.testing.assert_array_equal(got, want)
        assert np.array_equal(want, x * 4.0 ** (c0 + c1))


def test_hoisting_merges_sizes_read_off_each_gated_layers_input():
    """The second If reads len(h0), h0 the first If's output: torch.cond's skip branch returns x unchanged, so h0
    has x's shape and the size work merges into one copy (without that rule, only the Constant would merge)."""
    import onnxruntime as ort

    from exporters.onnx import hoist_branch_invariants

    before, after = _two_gated_layers(("x", "h0")), _two_gated_layers(("x", "h0"))
    assert hoist_branch_invariants(after) == {"hoisted": 8, "merged": 4}
    onnx.checker.check_model(after)
    assert [n.op_type for n in after.graph.node] == ["Shape", "Cast", "Constant", "Add", "If", "If"]
    assert list(after.graph.node[0].input) == ["x"]
    x = np.arange(1, 4, dtype=np.float32)
    for c0, c1 in ((True, True), (True, False), (False, True), (False, False)):
        feeds = {"x": x, "c0": np.array(c0), "c1": np.array(c1)}
        want = ort.InferenceSession(before.SerializeToString()).run(None, feeds)[0]
        np.testing.assert_array_equal(ort.InferenceSession(after.SerializeToString()).run(None, feeds)[0], want)


def test_exported_r1_graph_has_positions_once_and_no_element_gathers(onnx_r1_tiny):
    """What hoisting leaves in each branch reads an activation (the layer's hidden state or keys): no branch node
    computes positions only. The routed kernel's lookups are Gathers of whole rows / table entries: no GatherND or
    GatherElements (ONNX Runtime runs those per element, ~10x slower at decode; bench/README.md)."""
    model = onnx.load(str(onnx_r1_tiny / "model.onnx"), load_external_data=False)
    act = {i.name for i in model.graph.input if i.name not in ("attention_mask", "thresholds")}
    for node in model.graph.node:
        if node.op_type == "If":
            act.update(node.output)
            for branch in (a.g for a in node.attribute):
                local = set()
                for x in branch.node:
                    assert x.op_type in ("Shape", "Size") or any(i in act or i in local for i in x.input if i), x
                    local.update(x.output)
        elif node.op_type not in ("Shape", "Size") and any(i in act for i in node.input):
            act.update(node.output)
    # every layer's present key/value is [batch, kv_heads, present, head_dim]: sizes are read off one of them
    cache = {i.name for i in model.graph.input if i.name.startswith("past.")} | {
        o.name for o in model.graph.output if o.name.startswith("present.")}
    assert {n.input[0] for n in model.graph.node if n.op_type == "Shape"} & cache <= {"past.0.key", "present.0.key"}
    ops = graph_ops(onnx_r1_tiny / "model.onnx")
    assert "GatherND" not in ops and "GatherElements" not in ops and ops["TopK"] == 4


def test_exported_r1_branches_hold_only_data_dependent_work(onnx_r1_tiny):
    from exporters.onnx import hoist_branch_invariants

    model = onnx.load(str(onnx_r1_tiny / "model.onnx"), load_external_data=False)
    assert hoist_branch_invariants(model) == {"hoisted": 0, "merged": 0}  # the exporter already did it all


def test_int8_block_ignores_lookup_tables_narrower_than_a_block():
    """R1's relative-position bias tables are Gathers of [n, 1] rows: left float, they must not pull every weight's
    block down to 32 (r1-mini's int8 grew from 25.9 % to 28.2 % of fp32 when they did)."""
    from onnx import TensorProto, helper, numpy_helper

    from exporters.onnx_int8 import choose_block

    w = numpy_helper.from_array(np.zeros((256, 64), np.float32), "w")
    table = numpy_helper.from_array(np.zeros((780, 1), np.float32), "table")
    emb = numpy_helper.from_array(np.zeros((300, 256), np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["x"]), helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("Gather", ["table", "ids"], ["bias"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("y", "bias")],
                              initializer=[w, table, emb])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert choose_block(model) == 128
    emb.CopyFrom(numpy_helper.from_array(np.zeros((300, 96), np.float32), "emb"))  # an embedding 96 wide: block 32
    model.graph.initializer[2].CopyFrom(emb)
    w2 = numpy_helper.from_array(np.zeros((96, 64), np.float32), "w")
    model.graph.initializer[0].CopyFrom(w2)
    assert choose_block(model) == 32


def _sized_branch_graph():
    """c = concat(a, b) [present]; main: n = len(a) + len(b) (past + seq, as layer 0 computes it); an If whose
    branch reads len(c) (present, as R1's first gated branch does), scales c by it and reshapes twice, twice."""
    from onnx import TensorProto, helper, numpy_helper

    flat = numpy_helper.from_array(np.array([-1], np.int64), "flat")
    start0 = {"start": 0, "end": 1}
    branch = helper.make_graph([
        helper.make_node("Shape", ["c"], ["b_shape"], **start0),
        helper.make_node("Squeeze", ["b_shape"], ["b_n"]),
        helper.make_node("Cast", ["b_n"], ["b_nf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["c", "b_nf"], ["b_t"]),
        helper.make_node("Reshape", ["b_t", "flat"], ["b_r0"]),
        helper.make_node("Reshape", ["b_r0", "flat"], ["b_r1"], allowzero=0),
        helper.make_node("Reshape", ["b_r0", "flat"], ["b_r2"]),
        helper.make_node("Add", ["b_r1", "b_r2"], ["b_out"])], "run", [],
        [helper.make_tensor_value_info("b_out", TensorProto.FLOAT, None)])
    skip = helper.make_graph([helper.make_node("Identity", ["c"], ["s_out"])], "skip", [],
                             [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("Concat", ["a", "b"], ["c"], axis=0),
             helper.make_node("Shape", ["a"], ["a_shape"], **start0),
             helper.make_node("Squeeze", ["a_shape"], ["a_n"]),
             helper.make_node("Shape", ["b"], ["s_shape"], **start0),
             helper.make_node("Squeeze", ["s_shape"], ["s_n"]),
             helper.make_node("Add", ["a_n", "s_n"], ["n"]),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["c", "nf"], ["scaled"]),
             helper.make_node("If", ["cond"], ["h"], then_branch=branch, else_branch=skip)]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g", [vi("a", TensorProto.FLOAT, ["past"]), vi("b", TensorProto.FLOAT, ["seq"]),
                                           vi("cond", TensorProto.BOOL, [])],
                              [vi(o, TensorProto.FLOAT, ["present"]) for o in ("c", "scaled", "h")], initializer=[flat])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_hoisting_merges_sizes_by_their_dims_and_axis_sums_and_simplifies_branches():
    """len(c) in the branch is `present` = past + seq: with axis_sums it merges into the main graph's
    len(a) + len(b), and so do its Cast and the branch's Mul (R1's first gated branch vs layer 0); in the branch the
    duplicate Reshape merges and Reshape(Reshape(x, [-1]), [-1]) reads x (allowzero=0 is the default: no
    attribute). Without axis_sums, only the branch work merges."""
    import onnxruntime as ort

    from exporters.onnx import hoist_branch_invariants

    before, after, plain = _sized_branch_graph(), _sized_branch_graph(), _sized_branch_graph()
    assert hoist_branch_invariants(after, axis_sums={"present": ("past", "seq")}) == {"hoisted": 3, "merged": 6}
    assert hoist_branch_invariants(plain) == {"hoisted": 3, "merged": 2}
    onnx.checker.check_model(after)
    assert [n.op_type for n in after.graph.node] == ["Concat", "Shape", "Squeeze", "Shape", "Squeeze", "Add", "Cast",
                                                     "Mul", "If"]
    run = next(a.g for a in after.graph.node[-1].attribute if a.name == "then_branch")
    # the branch's c * len(c) is now the main graph's c * (len(a) + len(b)): it reads that value
    assert [(n.op_type, list(n.input)) for n in run.node] == [("Reshape", ["scaled", "flat"]),
                                                              ("Add", ["b_r0", "b_r0"])]
    for past, seq in ((3, 2), (0, 4)):
        for cond in (True, False):
            feeds = {"a": np.arange(past, dtype=np.float32), "b": np.arange(seq, dtype=np.float32) + 7,
                     "cond": np.array(cond)}
            want = ort.InferenceSession(before.SerializeToString()).run(None, feeds)
            for model in (after, plain):
                got = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
                for g, w in zip(got, want):
                    np.testing.assert_array_equal(g, w)


def _gate_only_nodes(graph) -> list:
    """Main-graph nodes whose values serve only the gates: an If's condition, a branch's Where condition (the row
    blend) or the `executed` output, directly or through other such nodes."""
    blend, other = set(), {o.name for o in graph.output if o.name != "executed"}
    for node in graph.node:
        for branch in (a.g for a in node.attribute if node.op_type == "If"):
            local = {o for n in branch.node for o in n.output}
            for n in branch.node:
                for k, i in enumerate(n.input):
                    if i and i not in local:
                        (blend if n.op_type == "Where" and k == 0 else other).add(i)
    readers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    gate: set[int] = set()
    for node in reversed(graph.node):
        outs = [o for o in node.output if o]
        used = [o for o in outs if readers.get(o) or o in blend or o == "executed"]
        if node.op_type != "If" and used and not other & set(outs) and all(
                id(r) in gate or r.op_type == "If" for o in outs for r in readers.get(o, [])):
            gate.add(id(node))
    return [node for node in graph.node if id(node) in gate]


def test_exported_r1_gate_costs_nine_main_nodes_and_one_where_per_gated_layer(onnx_r1_tiny):
    """What selective activation adds per gated layer (bench/README.md, issue 14's If overhead): in the main graph
    the gate (its RMS norm is the attention norm's), the row mean as one MatMul with [B, 1, S] weights computed
    once for all layers, the threshold Gather, rows / any-row decisions and the `executed` entry; in the branch one
    Where reading the [B, 1, 1] row decision directly (no Unsqueeze). A mean as Mul + ReduceSum + Div per layer,
    or a per-layer blend Unsqueeze, would fail this."""
    import collections

    cfg = resolve(onnx_r1_tiny).cfg
    n = len(cfg.gated_layers)
    model = onnx.load(str(onnx_r1_tiny / "model.onnx"), load_external_data=False)
    gate = collections.Counter(node.op_type for node in _gate_only_nodes(model.graph))
    per_layer = {"MatMul": 2, "Add": 1, "Sigmoid": 1, "Gather": 1, "Greater": 2, "ReduceMax": 1, "Unsqueeze": 1}
    shared = {"Slice": 1, "Cast": 1, "ReduceSum": 1, "Max": 1, "Div": 1, "Unsqueeze": 1, "Concat": 1}
    assert gate == collections.Counter({op: n * k for op, k in per_layer.items()}) + collections.Counter(shared)
    for node in model.graph.node:
        if node.op_type == "If":
            run = next(a.g for a in node.attribute if a.name == "then_branch")
            assert run.node[-1].op_type == "Where" and run.node[-2].op_type != "Unsqueeze"
