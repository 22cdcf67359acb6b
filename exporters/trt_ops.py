"""What TensorRT's ONNX parser accepts, per TensorRT version, and the check of a graph against it.

The data is trt_ops.toml (operators, input types, inputs that must be initializers, TopK's K limit, the
highest documented opset, per TensorRT minor release). check_ops() walks the main graph and every If/Loop/Scan
subgraph; check_conditionals() holds every If node to TensorRT's conditional rules. walk() and graphs_of() are
the graph traversal the transforms (exporters/trt_transforms.py) share.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.versions import version_tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

OPS_FILE = Path(__file__).with_name("trt_ops.toml")


@cache
def op_support() -> dict[str, dict]:
    with open(OPS_FILE, "rb") as f:
        return tomllib.load(f)["versions"]


def data_version(stack_version: str) -> str | None:
    """The trt_ops.toml table for a profile's TensorRT version: the newest table at or below it; a bare
    major ('10.x') takes that major's oldest table (conservative). None when TensorRT is older than all."""
    want = version_tuple(stack_version)
    tables = sorted(op_support(), key=version_tuple)
    if len(want) == 1:
        same = [t for t in tables if version_tuple(t)[0] == want[0]]
        return same[0] if same else None
    below = [t for t in tables if version_tuple(t) <= want]
    return below[-1] if below else None


_TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 22: "INT4", 2: "UINT8",
               9: "BOOL", 11: "DOUBLE", 17: "FP8", 23: "FP4"}


def subgraphs(node):
    for attr in node.attribute:
        if attr.type == attr.GRAPH:
            yield attr.name, attr.g
        for i, g in enumerate(attr.graphs):
            yield f"{attr.name}[{i}]", g


def walk(graph, where="main", types=None, consts=None):
    """Yield (where, graph, node, types, consts) for every node in the graph and its subgraphs; `types` maps a
    visible tensor name to (elem_type, dims) and `consts` holds the names that are initializers / Constants."""
    types = dict(types or {})
    consts = set(consts or ())
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        t = vi.type.tensor_type
        dims = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim) \
            if t.HasField("shape") else None
        types[vi.name] = (t.elem_type, dims)
    for init in graph.initializer:
        types[init.name] = (init.data_type, tuple(init.dims))
        consts.add(init.name)
    for node in graph.node:
        if node.op_type == "Constant":
            consts.update(node.output)
    for node in graph.node:
        yield where, graph, node, types, consts
        for attr_name, g in subgraphs(node):
            yield from walk(g, f"{where}/{node.name or node.op_type}.{attr_name}", types, consts)


def graphs_of(model):
    seen = []
    for _w, g, _n, _t, _c in walk(model.graph):
        if not any(g is s for s in seen):
            seen.append(g)
    return seen or [model.graph]


def _with_types(model):
    """The model with inferred value types (for the type and condition checks). Large initializers are left
    out of the copy handed to shape inference (types and dims stay; their values are not needed, and a model
    over 2 GiB could not be serialized for it); small ones (shape vectors) stay so shapes still propagate."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for g in graphs_of(light):
        for t in g.initializer:
            if t.HasField("raw_data") and len(t.raw_data) > 4096:
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                t.external_data.add(key="location", value="omitted-for-type-inference")
    try:
        return onnx.shape_inference.infer_shapes(light, strict_mode=False)
    except Exception:  # shape inference is best effort here; missing types are reported as unknown
        return light


def check_ops(model, tensorrt: str, topk_k_bound: int | None = None) -> dict:
    """Check every node (main graph and every If/Loop/Scan subgraph) against TensorRT `tensorrt`'s ONNX parser.

    Returns {"tensorrt", "table", "ok", "issues": [{op, node, where, why}], "notes"}; never raises, so a caller
    can check several TensorRT versions and keep those that pass. `topk_k_bound` is the largest K a TopK will
    see (R1's routing-block count at the recipe's context), checked against the version's TopK limit.
    """
    table_key = data_version(tensorrt)
    report = {"tensorrt": tensorrt, "table": table_key, "ok": False, "issues": [], "notes": []}
    if table_key is None:
        report["issues"].append({"op": "*", "node": "", "where": "", "why": f"TensorRT {tensorrt} is older than "
                                 f"every table in {OPS_FILE.name} ({', '.join(op_support())})"})
        return report
    table = op_support()[table_key]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    report["opset"] = opset
    if opset is not None and opset > table["max_opset"]:
        msg = f"graph opset {opset} is above the opset {table['max_opset']} TensorRT {table_key} documents"
        if table["opset_hard"]:
            report["issues"].append({"op": "opset", "node": "", "where": "model", "why": msg})
        else:
            report["notes"].append(msg + " (accepted: TensorRT 10 imports by operator; its INT4 support needs "
                                         "opset 21 DequantizeLinear)")
    supported = set(table["supported"])
    types, constant_inputs = table.get("types", {}), table.get("constant_inputs", {})
    for where, _g, node, known, consts in walk(_with_types(model).graph):
        name = node.name or f"<{node.op_type} without a name>"

        def issue(why: str, node=node, where=where, name=name):
            report["issues"].append({"op": node.op_type, "node": name, "where": where, "why": why})

        if node.domain not in ("", "ai.onnx"):
            issue(f"operator domain '{node.domain}' (ONNX Runtime-only or custom op; TensorRT has no importer)")
            continue
        if node.op_type not in supported:
            issue(f"not supported by TensorRT {table_key}'s ONNX parser")
            continue
        for idx in constant_inputs.get(node.op_type, []):
            if idx < len(node.input) and node.input[idx] and node.input[idx] not in consts:
                issue(f"input {idx} ('{node.input[idx]}') must be an initializer in TensorRT {table_key}, "
                      "but it is computed at run time")
        if node.op_type in types and node.input:
            elem = known.get(node.input[0], (None, None))[0]
            tname = _TYPE_NAMES.get(elem, f"type {elem}") if elem else "unknown"
            as_type = "INT32" if tname == "INT64" and table.get("int64_as_int32") else tname
            if as_type != "unknown" and as_type not in types[node.op_type]:
                shown = f"{tname} (imported as {as_type})" if as_type != tname else tname
                issue(f"input type {shown} not supported (TensorRT {table_key}: {', '.join(types[node.op_type])})")
        if node.op_type == "TopK" and topk_k_bound and "topk_k_max" in table and topk_k_bound > table["topk_k_max"]:
            issue(f"K can reach {topk_k_bound}; TensorRT {table_key} requires K < {table['topk_k_max'] + 1}")
    report["ok"] = not report["issues"]
    return report


def describe_issues(report: dict, limit: int = 12) -> str:
    """'op (why) at where/node; ...' for an error message."""
    parts = [f"{i['op']} at {'/'.join(p for p in (i['where'], i['node']) if p)}: {i['why']}" for i in report["issues"]]
    more = f"; ... and {len(parts) - limit} more" if len(parts) > limit else ""
    return "; ".join(parts[:limit]) + more


def check_conditionals(model) -> list[dict]:
    """Every If node: a 0-D bool condition and two branches whose outputs have identical types and shapes and
    distinct names (TensorRT before 10.11 needs identical shapes; torch.cond guarantees them). Raises naming the
    node otherwise; returns one summary per If node."""
    found = []
    for where, _g, node, known, _c in walk(_with_types(model).graph):
        if node.op_type != "If":
            continue
        at = f"{where}/{node.name or 'If'}"
        elem, dims = known.get(node.input[0], (None, None))
        if elem != 9 or dims != ():
            shape = "unknown shape" if dims is None else f"shape {list(dims)}"
            raise EdgekitError(f"If node {at}: condition '{node.input[0]}' is {_TYPE_NAMES.get(elem, elem)} with "
                               f"{shape}; TensorRT needs a 0-D bool", "export the gate with a scalar predicate")
        branches = dict(subgraphs(node))
        then_g, else_g = branches.get("then_branch"), branches.get("else_branch")
        if then_g is None or else_g is None or len(then_g.output) != len(else_g.output):
            raise EdgekitError(f"If node {at}: branches return different numbers of outputs")
        for a, b in zip(then_g.output, else_g.output):
            ta, tb = a.type.tensor_type, b.type.tensor_type
            da = [d.dim_param or d.dim_value for d in ta.shape.dim]
            db = [d.dim_param or d.dim_value for d in tb.shape.dim]
            if ta.elem_type != tb.elem_type or da != db:
                raise EdgekitError(f"If node {at}: branch outputs differ: then '{a.name}' "
                                   f"{_TYPE_NAMES.get(ta.elem_type)} {da} vs else '{b.name}' "
                                   f"{_TYPE_NAMES.get(tb.elem_type)} {db}",
                                   "TensorRT (before 10.11) needs identically shaped branch outputs")
            if a.name == b.name:
                raise EdgekitError(f"If node {at}: both branches name their output '{a.name}'",
                                   "TensorRT needs distinct branch output names")
        found.append({"node": at, "condition": "0-D bool", "outputs": len(then_g.output)})
    return found
