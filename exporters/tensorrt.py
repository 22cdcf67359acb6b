"""TensorRT exporter: a TensorRT-ready ONNX graph plus a build recipe; the engine is built on the device.

A TensorRT engine runs only on the TensorRT version and GPU architecture that built it (DESIGN.md), so what
`export` writes into the artifact is:

    model.onnx (+ .data)  fp16 weights (or int4 weight-only explicit Q/DQ, block 128), fp32 compute and I/O;
                          R1's gates stay If nodes with a 0-D bool condition and identically shaped branches
    trt_recipe.json       builder flags, an optimization profile for prefill and one for decode (batch, seq, past
                          min/opt/max derived from the device profile's memory and the requested context),
                          workspace limit, timing-cache file, target SM, TensorRT versions, the trtexec command
    model.engine, timing.cache   only where TensorRT and a GPU are present; elsewhere `edgekit build-engine`

The steps are separate functions (STYLE.md): prepare the graph -> check it (operators per TensorRT version,
conditionals) -> recipe -> validate in ONNX Runtime on the CPU -> build and validate the engine (device only).
Device facts come only from profiles/*.toml. TensorRT is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import sys
from functools import cache
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError, unknown_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

MODEL_FILE = "model.onnx"
RECIPE_FILE = "trt_recipe.json"
ENGINE_FILE = "model.engine"
TIMING_CACHE_FILE = "timing.cache"
ENGINE_JSON = "engine.json"
OPS_FILE = Path(__file__).with_name("trt_ops.toml")
RECIPE_VERSION = 1
INT4_BLOCK = 128
FP16_MAX = 65504.0
MIN_WEIGHT_ELEMENTS = 16  # smaller float initializers (eps, scalars) stay fp32
GRAPH_COSINE = 0.999  # the stored-weights graph vs PyTorch with the same stored weights; also the engine's gate

# Precision policy: builder flags, how weights are stored, and the gate of the CPU (ONNX Runtime) validation
# against fp32 PyTorch (mean logit cosine over the seeded cases). int4's gate is a fidelity floor measured on
# random-weight presets (r1-tiny ~0.96: round-to-nearest int4 of untrained 64-wide layers); the graph itself is
# held to GRAPH_COSINE against PyTorch running the very weights the graph stores. int8: see refuse_int8().
PRECISIONS = {
    "fp16": {"flags": ["FP16"], "trtexec": ["--fp16"], "weights": "fp16", "min_cosine": 0.999},
    "int4": {"flags": ["FP16", "INT4"], "trtexec": ["--fp16", "--int4"], "weights": "int4 weight-only, block 128",
             "min_cosine": 0.95},
    "fp32": {"flags": [], "trtexec": [], "weights": "fp32", "min_cosine": 0.99999},
}

# Memory model for the optimization profiles (an estimate, recorded in the recipe). Not device numbers:
# the device's memory comes from its profile; these say how much of it a shape costs.
ATTN_BYTES_PER_SCORE = 16  # fp32 scores, position bias, mask and softmax output of one (query, key) pair per head
MAX_DECODE_BATCH = 64  # policy cap: more sequences than this belong to a serving stack, not an edge engine
MAX_PREFILL_BATCH = 8
OPT_PREFILL_SEQ = 128  # the shape TensorRT tunes prefill kernels for (clipped to the profile)
WORKSPACE_FRACTION = 8  # workspace limit = 1/8 of what the weights leave, within [64 MiB, 4 GiB]
MIB, GIB = 1 << 20, 1 << 30


def refuse_int8() -> EdgekitError:
    return EdgekitError(
        "--int8 is ONNX Runtime's dynamic int8 (DynamicQuantizeLinear / MatMulInteger), which TensorRT cannot parse",
        "for a TensorRT target use fp16 (the default) or --precision int4 (weight-only, block 128, explicit Q/DQ; "
        "TensorRT 10+ on sm_80+); dynamic int8 is for --format onnx on CPUs")


def check_precision(precision: str, profile) -> dict:
    """The precision policy for a TensorRT target, or a one-line refusal naming what works."""
    from profiles import why_unsupported

    if precision == "int8":
        raise refuse_int8()
    if precision not in PRECISIONS:
        raise unknown_name("TensorRT precision", precision, PRECISIONS)
    if precision != "fp32":
        reason = why_unsupported(profile, precision)
        if reason:
            raise EdgekitError(f"--format tensorrt at {precision} on {profile.name}: {reason}",
                               "use fp16" if precision != "fp16" else "use --format onnx for this device")
    return PRECISIONS[precision]


# ---------------------------------------------------------------------------------------------
# TensorRT operator support, per version (data: trt_ops.toml)
# ---------------------------------------------------------------------------------------------
@cache
def op_support() -> dict[str, dict]:
    with open(OPS_FILE, "rb") as f:
        return tomllib.load(f)["versions"]


def _vt(v: str) -> tuple[int, ...]:
    from profiles import version_tuple

    return version_tuple(v)


def data_version(stack_version: str) -> str | None:
    """The trt_ops.toml table for a profile's TensorRT version: the newest table at or below it; a bare
    major ('10.x') takes that major's oldest table (conservative). None when TensorRT is older than all."""
    want = _vt(stack_version)
    tables = sorted(op_support(), key=_vt)
    if len(want) == 1:
        same = [t for t in tables if _vt(t)[0] == want[0]]
        return same[0] if same else None
    below = [t for t in tables if _vt(t) <= want]
    return below[-1] if below else None


_TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 22: "INT4", 2: "UINT8",
               9: "BOOL", 11: "DOUBLE", 17: "FP8", 23: "FP4"}


def _subgraphs(node):
    for attr in node.attribute:
        if attr.type == attr.GRAPH:
            yield attr.name, attr.g
        for i, g in enumerate(attr.graphs):
            yield f"{attr.name}[{i}]", g


def _walk(graph, where="main", types=None, consts=None):
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
        for attr_name, g in _subgraphs(node):
            yield from _walk(g, f"{where}/{node.name or node.op_type}.{attr_name}", types, consts)


def _with_types(model):
    """The model with inferred value types (for the type and condition checks). Large initializers are left
    out of the copy handed to shape inference (types and dims stay; their values are not needed, and a model
    over 2 GiB could not be serialized for it); small ones (shape vectors) stay so shapes still propagate."""
    import onnx

    light = onnx.ModelProto()
    light.CopyFrom(model)
    for g in _graphs_of(light):
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
    for where, _g, node, known, consts in _walk(_with_types(model).graph):
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
    for where, _g, node, known, _c in _walk(_with_types(model).graph):
        if node.op_type != "If":
            continue
        at = f"{where}/{node.name or 'If'}"
        elem, dims = known.get(node.input[0], (None, None))
        if elem != 9 or dims != ():
            shape = "unknown shape" if dims is None else f"shape {list(dims)}"
            raise EdgekitError(f"If node {at}: condition '{node.input[0]}' is {_TYPE_NAMES.get(elem, elem)} with "
                               f"{shape}; TensorRT needs a 0-D bool", "export the gate with a scalar predicate")
        branches = dict(_subgraphs(node))
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


# ---------------------------------------------------------------------------------------------
# Graph transforms: opset 18 -> 17 for TensorRT 8.x, fp16 weight storage, int4 weight-only Q/DQ
# ---------------------------------------------------------------------------------------------
_OPSET18_REDUCE = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                   "ReduceMin", "ReduceProd", "ReduceSumSquare"}
_OPSET18_OTHER = {"Pad", "Resize", "ScatterElements", "ScatterND", "Split", "CenterCropPad", "Col2Im", "LpPool",
                  "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "GroupNormalization", "Mish",
                  "OptionalGetElement", "OptionalHasElement"}


def downgrade_to_opset17(model):
    """Rewrite an opset-18 graph as opset 17 (TensorRT 8.x documents opset <= 17 and its Reduce importers read
    `axes` as an attribute). Handles what edgekit's graphs contain -- Reduce* with constant axes, Pad without
    `axes` -- and refuses any other opset-18 change rather than guessing. onnx's version converter has no
    18->17 adapters."""
    import onnx
    from onnx import helper, numpy_helper

    opset = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset.version == 17:
        return model
    if opset.version != 18:
        raise EdgekitError(f"cannot convert an opset-{opset.version} graph to opset 17 for TensorRT 8.x")
    values = {}
    for _w, g, node, _t, _c in _walk(model.graph):
        for init in g.initializer:
            values.setdefault(init.name, init)
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values.setdefault(node.output[0], a.t)
    for where, _g, node, _t, _c in _walk(model.graph):
        if node.op_type in _OPSET18_REDUCE:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("noop_with_empty_axes", 0):
                raise EdgekitError(f"{where}/{node.name}: {node.op_type} with noop_with_empty_axes has no "
                                   "opset-17 form")
            keep = [a for a in node.attribute if a.name != "noop_with_empty_axes"]
            if len(node.input) > 1 and node.input[1]:
                if node.input[1] not in values:
                    raise EdgekitError(f"{where}/{node.name}: {node.op_type} axes are computed at run time; "
                                       "TensorRT 8.x needs constant axes")
                axes = numpy_helper.to_array(values[node.input[1]]).astype(np.int64).reshape(-1).tolist()
                keep.append(helper.make_attribute("axes", axes))
                del node.input[1:]
            del node.attribute[:]
            node.attribute.extend(keep)
        elif node.op_type == "Pad":
            if len(node.input) > 3 and node.input[3]:
                raise EdgekitError(f"{where}/{node.name}: Pad with an axes input has no opset-17 form")
        elif node.op_type in _OPSET18_OTHER:
            raise EdgekitError(f"{where}/{node.name}: {node.op_type} changed in opset 18; edgekit does not convert it "
                               "to opset 17", "target a device stack with TensorRT 10")
    opset.version = 17
    onnx.checker.check_model(model)
    return model


def _graphs_of(model):
    seen = []
    for _w, g, _n, _t, _c in _walk(model.graph):
        if not any(g is s for s in seen):
            seen.append(g)
    return seen or [model.graph]


def _consumers(model) -> dict[str, list]:
    """initializer name -> [(graph, node, input index)] over every graph that can see it."""
    names = {i.name for g in _graphs_of(model) for i in g.initializer}
    uses: dict[str, list] = {n: [] for n in names}
    for _w, g, node, _t, _c in _walk(model.graph):
        for idx, name in enumerate(node.input):
            if name in uses:
                uses[name].append((g, node, idx))
    return uses


def store_fp16(model) -> dict:
    """fp32 weights (initializers of >= 16 elements, any graph) stored as fp16 with a Cast back to fp32 under the
    original name, so every reader -- including If branches reading outer-scope weights -- is unchanged and the
    graph computes in fp32 (TensorRT's FP16 flag chooses fp16 kernels). Values beyond fp16's range, and Q/DQ
    scales (TensorRT wants them as initializers of the DequantizeLinear), stay fp32."""
    from onnx import TensorProto, helper, numpy_helper

    converted, kept = 0, []
    qdq = {name for name, readers in _consumers(model).items()  # Q/DQ scales stay fp32 initializers:
           if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for _g, n, _i in readers)}  # TensorRT folds them
    for g in _graphs_of(model):
        casts = []
        for i, init in enumerate(list(g.initializer)):
            if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < MIN_WEIGHT_ELEMENTS or init.name in qdq:
                continue
            name, w = init.name, numpy_helper.to_array(init)
            if np.abs(w).max() > FP16_MAX:
                kept.append(name)
                continue
            half = numpy_helper.from_array(w.astype(np.float16), name + "__fp16")
            g.initializer[i].CopyFrom(half)  # `init` is this same message: use `name` from here on
            casts.append(helper.make_node("Cast", [half.name], [name], to=TensorProto.FLOAT, name=f"{name}__to_fp32"))
            converted += 1
        for node in reversed(casts):
            g.node.insert(0, node)
    return {"fp16_weights": converted, "kept_fp32_out_of_range": kept}


def _int4_blocks(w: np.ndarray, axis: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 (zero point 0, as TensorRT requires) per block of `block` along `axis`: q in [-8, 7],
    w ~ q * scale. Each block's scale is the one of alpha * absmax / 7, alpha in 0.6..1.0, with the least
    squared error (round-to-nearest with a clip search, as in AWQ's clip step)."""
    w = np.moveaxis(w.astype(np.float32), axis, 0)  # [K, N]: blocks run along K
    k = w.shape[0]
    nb = math.ceil(k / block)
    pad = np.zeros((nb * block - k, *w.shape[1:]), np.float32)
    blocks = np.concatenate([w, pad]).reshape(nb, block, *w.shape[1:])
    amax = np.abs(blocks).max(axis=1)  # [nb, N]
    best_scale = best_err = None
    for alpha in np.linspace(0.6, 1.0, 17):
        scale = np.where(amax == 0, 1.0, amax * alpha / 7.0).astype(np.float32)
        q = np.clip(np.rint(blocks / scale[:, None]), -8, 7)
        err = ((q * scale[:, None] - blocks) ** 2).sum(axis=1)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = np.where(better, scale, best_scale), np.where(better, err, best_err)
    q = np.clip(np.rint(blocks / best_scale[:, None]), -8, 7).reshape(nb * block, *w.shape[1:])[:k]
    return np.moveaxis(q, 0, axis), np.moveaxis(best_scale.astype(np.float32), 0, axis)


def int4_dequantized(w: np.ndarray, axis: int, block: int = INT4_BLOCK) -> np.ndarray:
    """What the graph's DequantizeLinear computes from _int4_blocks(w): for a PyTorch reference."""
    q, scale = _int4_blocks(w, axis, block)
    full = np.repeat(scale, block, axis=axis)
    full = full[:, : w.shape[1]] if axis == 1 else full[: w.shape[0]]
    return (q * full).astype(np.float32)


def quantize_int4(model, block: int = INT4_BLOCK, min_elements: int = 1024) -> dict:
    """int4 weight-only quantization with explicit DequantizeLinear (opset 21, block_size) -- TensorRT 10's
    weight-only INT4 (W4A16) form. Every 2-D float initializer whose every reader is MatMul's B input (blocks
    along K, axis 0: weights are stored [in, out]) or Gather's table (blocks along the row, axis 1) is stored once
    as int4 + fp32 scales; each reader gets its own DequantizeLinear in its own graph (so R1's If branches that
    share a block's weights read one int4 copy, and DQ sits next to its MatMul for TensorRT to fuse)."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    opset = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset.version < 21:
        from onnx import version_converter

        model.CopyFrom(version_converter.convert_version(model, 21))
    uses = _consumers(model)
    owner = {i.name: (g, i) for g in _graphs_of(model) for i in g.initializer}
    done, skipped = [], []
    for name, readers in uses.items():
        g, init = owner[name]
        if init.data_type != TensorProto.FLOAT or len(init.dims) != 2 or not readers:
            continue
        if int(np.prod(init.dims)) < min_elements:
            continue
        kinds = {(n.op_type, idx) for _g, n, idx in readers}
        if not kinds <= {("MatMul", 1), ("Gather", 0)}:
            skipped.append(name)
            continue
        axis = 1 if ("Gather", 0) in kinds else 0
        w = numpy_helper.to_array(init)
        q, scale = _int4_blocks(w, axis, block)
        q_init = numpy_helper.from_array(q.astype(ml_dtypes.int4), name + "__int4")
        s_init = numpy_helper.from_array(scale, name + "__scale")
        g.initializer.remove(init)
        g.initializer.extend([q_init, s_init])
        local = {id(g): (q_init.name, s_init.name)}  # graph -> the int4 weight and scales its readers use
        for k, (rg, node, idx) in enumerate(readers):
            if id(rg) not in local:
                # A reader in another graph (an If branch) gets the weight as an initializer of its own graph,
                # so its DequantizeLinear sits next to its MatMul there (TensorRT fuses the pair; ONNX Runtime's
                # DQ+MatMul -> MatMulNBits fusion only finds initializers of the DQ's own graph). The copy has the
                # same bytes: save_deduplicated() stores them once in the external data file.
                j = len(local)
                q_copy, s_copy = onnx.TensorProto(), onnx.TensorProto()
                q_copy.CopyFrom(q_init)
                s_copy.CopyFrom(s_init)
                q_copy.name, s_copy.name = f"{q_init.name}__local{j}", f"{s_init.name}__local{j}"
                rg.initializer.extend([q_copy, s_copy])
                local[id(rg)] = (q_copy.name, s_copy.name)
            out = f"{name}__dq{k}"
            rg.node.insert(0, helper.make_node("DequantizeLinear", list(local[id(rg)]), [out],
                                               name=f"{name}__DequantizeLinear{k}", axis=axis, block_size=block))
            node.input[idx] = out
        done.append({"name": name, "shape": list(init.dims), "axis": axis, "readers": len(readers)})
    return {"quantized": done, "left_float": skipped, "block_size": block}


def _payload(t) -> bytes:
    from onnx import numpy_helper

    return t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()


def stored_bytes(model) -> int:
    """Bytes of the initializers of every graph, each distinct content counted once (as save_deduplicated()
    stores it; int4 is packed two per byte)."""
    import hashlib

    seen = set()
    total = 0
    for g in _graphs_of(model):
        for t in g.initializer:
            if t.data_location == t.EXTERNAL:  # already saved: one range of the data file
                info = {e.key: e.value for e in t.external_data}
                key, size = (info["location"], info.get("offset", "0")), int(info["length"])
            else:
                data = _payload(t)
                key, size = (t.data_type, tuple(t.dims), hashlib.sha256(data).digest()), len(data)
            if key not in seen:
                seen.add(key)
                total += size
    return total


def save_deduplicated(model, path: Path, threshold: int = 1024) -> None:
    """Save `path` with every initializer of >= `threshold` bytes in `path`.data, identical contents stored once
    (several initializers may point at the same offset: R1's shared blocks read by several If branches). The
    model's tensors are moved to external data in place."""
    import hashlib

    import onnx

    path = Path(path)
    data_name = path.name + ".data"
    seen: dict[bytes, tuple[int, int]] = {}
    with open(path.parent / data_name, "wb") as f:
        for g in _graphs_of(model):
            for t in g.initializer:
                data = _payload(t)
                if len(data) < threshold:
                    continue
                key = hashlib.sha256(data).digest()
                if key not in seen:
                    pad = -f.tell() % 64
                    f.write(b"\0" * pad)
                    seen[key] = (f.tell(), len(data))
                    f.write(data)
                for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    t.ClearField(field)
                del t.external_data[:]
                for k, v in (("location", data_name), ("offset", seen[key][0]), ("length", seen[key][1])):
                    t.external_data.add(key=k, value=str(v))
                t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(path))


def fp16_reference_bytes(model) -> int:
    """What the same initializers take with fp16 weights (the baseline the int4 ratio is measured against)."""
    from onnx import TensorProto, helper

    total = 0
    for g in _graphs_of(model):
        for t in g.initializer:
            n = int(np.prod(t.dims, dtype=np.int64))
            big_float = t.data_type == TensorProto.FLOAT and n >= MIN_WEIGHT_ELEMENTS
            total += n * (2 if big_float else helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    return total


# ---------------------------------------------------------------------------------------------
# The recipe: optimization profiles from the device's memory and the requested context
# ---------------------------------------------------------------------------------------------
def memory_need(cfg, batch: int, seq: int, past: int, io_bytes: int = 4) -> int:
    """Estimated device bytes one call needs beyond the weights: the past KV inputs and present outputs (fp32
    I/O) plus the largest activations (attention scores per head, logits, MLP)."""
    heads, hd, layers = cfg.n_heads, cfg.head_dim, cfg.n_layers
    keys = past + seq
    present = min(keys, cfg.memory_len) if cfg.family == "v3" and cfg.memory_len else keys
    kv = batch * layers * 2 * heads * hd * (past + present) * io_bytes
    per_token = (cfg.vocab_size + 3 * cfg.d_ff + 8 * cfg.d_model) * 4
    act = batch * (heads * seq * keys * ATTN_BYTES_PER_SCORE + seq * per_token)
    return kv + act


def _largest(lo: int, hi: int, fits) -> int:
    """Largest n in [lo, hi] with fits(n) (fits monotone decreasing); lo - 1 when none."""
    if hi < lo or not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def derive_profiles(cfg, usable_bytes: int, weight_bytes: int, context: int, device: str = "the device") -> dict:
    """Decode and prefill optimization profiles (min/opt/max of batch, seq, past) that fit `usable_bytes`.

    decode: seq 1; past up to the cache limit (context - 1, or V3's memory_len); batch as large as the KV cache
            of that many full-length sequences allows (capped at MAX_DECODE_BATCH).
    prefill: past 0 for a whole prompt, or up to context - seq for chunked prefill (keys never exceed the
             context); seq up to the context, or the largest chunk that fits; batch up to MAX_PREFILL_BATCH.
    """
    weights_left = usable_bytes - weight_bytes
    workspace = int(min(max(weights_left // WORKSPACE_FRACTION, 64 * MIB), 4 * GIB))
    budget = weights_left - workspace
    if budget <= 0:
        raise EdgekitError(f"{cfg.name} does not fit on {device}: {weight_bytes / GIB:.2f} GiB of weights + "
                           f"{workspace / GIB:.2f} GiB workspace > {usable_bytes / GIB:.2f} GiB usable",
                           "use --int4, a smaller model, or a device with more memory")
    cache_cap = cfg.memory_len if cfg.family == "v3" and cfg.memory_len else context - 1
    past_max = max(0, min(cache_cap, context - 1))
    b_dec = _largest(1, MAX_DECODE_BATCH, lambda b: memory_need(cfg, b, 1, past_max) <= budget)
    if b_dec < 1:
        one = memory_need(cfg, 1, 1, past_max)
        raise EdgekitError(f"context {context} does not fit on {device}: one sequence's cache and activations need "
                           f"{one / GIB:.2f} GiB, {budget / GIB:.2f} GiB are left after weights and workspace",
                           "lower --context")
    s_max = _largest(1, context, lambda s: memory_need(cfg, 1, s, context - s) <= budget)
    if s_max < 1:
        raise EdgekitError(f"context {context} does not fit on {device} even one token at a time", "lower --context")
    prefill_past_max = context - s_max
    b_pre = _largest(1, min(b_dec, MAX_PREFILL_BATCH),
                     lambda b: memory_need(cfg, b, s_max, prefill_past_max) <= budget)
    # trtexec builds one profile: it must hold the longest past *and* the longest chunk at once, so its seq and
    # batch are whatever still fits with past at its maximum; tuned for decode (seq 1), the steady state.
    s_one = _largest(1, s_max, lambda s: memory_need(cfg, 1, s, past_max) <= budget)
    b_one = max(1, _largest(1, b_pre, lambda b: memory_need(cfg, b, s_one, past_max) <= budget))
    dims = {
        "decode": {"batch": [1, 1, b_dec], "seq": [1, 1, 1], "past": [0, past_max // 2, past_max]},
        "prefill": {"batch": [1, 1, b_pre], "seq": [1, min(OPT_PREFILL_SEQ, s_max), s_max],
                    "past": [0, 0, prefill_past_max]},
        "single": {"batch": [1, 1, b_one], "seq": [1, 1, max(1, s_one)], "past": [0, past_max // 2, past_max]},
    }
    worst = max(memory_need(cfg, b_dec, 1, past_max), memory_need(cfg, b_pre, s_max, prefill_past_max))
    estimate = {"usable_bytes": int(usable_bytes), "weight_bytes": int(weight_bytes), "workspace_bytes": workspace,
                "budget_bytes": int(budget), "largest_profile_bytes": int(worst),
                "model": "KV past+present at fp32 I/O + attention scores x 16 B + logits/MLP activations; an estimate"}
    return {"dims": dims, "workspace_bytes": workspace, "estimate": estimate}


def profile_shapes(spec, dims: dict) -> dict[str, dict[str, list[int]]]:
    """Per dynamic input: min/opt/max shapes from batch/seq/past dims (DecoderSpec names)."""
    cfg = spec.cfg
    shapes = {}
    for k, sel in enumerate(("min", "opt", "max")):
        b, s, p = dims["batch"][k], dims["seq"][k], dims["past"][k]
        shapes.setdefault("input_ids", {})[sel] = [b, s]
        for n in spec.past_names():
            shapes.setdefault(n, {})[sel] = [b, cfg.n_heads, p, cfg.head_dim]
    return shapes


def trtexec_command(recipe: dict) -> str:
    """The equivalent trtexec command, for a device without edgekit. trtexec is given one optimization profile
    (recipe["trtexec_profile"]: the longest past with the longest chunk that still fits, tuned for decode)."""
    shapes = recipe["trtexec_profile"]["shapes"]

    def spec(sel):
        return ",".join(f"{n}:{'x'.join(str(d) for d in s[sel])}" for n, s in shapes.items())

    args = ["trtexec", f"--onnx={recipe['onnx']}", *recipe["trtexec_flags"],
            f"--minShapes={spec('min')}", f"--optShapes={spec('opt')}", f"--maxShapes={spec('max')}",
            f"--memPoolSize=workspace:{max(1, recipe['workspace_bytes'] // MIB)}",
            f"--timingCacheFile={recipe['timing_cache']}", f"--saveEngine={recipe['engine']}"]
    return " ".join(shlex.quote(a) for a in args)


def make_recipe(cfg, profile, precision: str, context: int, weight_bytes: int, opset: int,
                tensorrt_ok: list[str], tensorrt_refused: dict[str, str]) -> dict:
    from edgekit.spec import DecoderSpec

    spec = DecoderSpec(cfg)
    derived = derive_profiles(cfg, int(profile.usable_gib * GIB), weight_bytes, context, profile.name)
    dims = derived["dims"]
    policy = PRECISIONS[precision]
    recipe = {
        "edgekit_recipe": RECIPE_VERSION,
        "model": cfg.name, "family": cfg.family, "onnx": MODEL_FILE, "onnx_opset": opset,
        "precision": precision, "weights": policy["weights"],
        "builder_flags": policy["flags"], "trtexec_flags": policy["trtexec"],
        "device": profile.name, "sm": profile.sm,
        "tensorrt": {"versions": tensorrt_ok, "refused": tensorrt_refused},
        "context": context,
        "workspace_bytes": derived["workspace_bytes"],
        "timing_cache": TIMING_CACHE_FILE, "engine": ENGINE_FILE,
        "io": {"inputs": spec.input_names, "outputs": spec.output_names, "float_io": "float32"},
        "profiles": [{"name": name, "dims": dims[name], "shapes": profile_shapes(spec, dims[name])}
                     for name in ("decode", "prefill")],
        "trtexec_profile": {"dims": dims["single"], "shapes": profile_shapes(spec, dims["single"])},
        "memory_estimate": derived["estimate"],
    }
    recipe["trtexec"] = trtexec_command(recipe)
    recipe["trtexec_note"] = ("trtexec gets one profile (trtexec_profile: past up to the cache limit with chunks of "
                              "up to its seq max); edgekit build-engine builds the decode and prefill profiles")
    return recipe


def read_recipe(directory: Path) -> dict:
    path = Path(directory) / RECIPE_FILE
    if not path.is_file():
        raise EdgekitError(f"{directory} has no {RECIPE_FILE}",
                           "export it with: edgekit export MODEL --format tensorrt --device DEVICE --out DIR")
    try:
        recipe = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgekitError(f"cannot read {path}: {e}", "re-export the artifact") from None
    if recipe.get("edgekit_recipe") != RECIPE_VERSION:
        raise EdgekitError(f"{path}: recipe version {recipe.get('edgekit_recipe')} is not {RECIPE_VERSION}",
                           "re-export with this edgekit")
    return recipe


# ---------------------------------------------------------------------------------------------
# Validation in ONNX Runtime (CPU) against PyTorch, on the lead's seeded cases
# ---------------------------------------------------------------------------------------------
class _Session:
    """The minimal `infer` a validation needs, over an ONNX Runtime CPU session.

    ONNX Runtime fuses int4 DequantizeLinear + MatMul into MatMulNBits, which by default quantizes the
    activations to int8 at run time (accuracy level 4: ~5e-3 logit error on r1-tiny, far more with a large
    random cache). TensorRT's weight-only int4 keeps activations in fp16/fp32, so the validation asks for
    accuracy level 1 (fp32 activations): the graph is then checked for what it means, not for ORT's shortcut."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds):
        return dict(zip(self.names, self.session.run(self.names, feeds)))


def _torch_reference(model):
    from edgekit.resolve import Resolved
    from runtimes.torch import TorchRunner

    return TorchRunner(Resolved("preset", model.cfg.name, model.cfg, model=model), dtype="fp32", device="cpu")


def validate_against_torch(model, candidate, min_cosine: float, advance=None) -> dict:
    """Seeded cases (exporters.onnx.validation_cases); the logit-cosine gate; for R1 the skip pattern must match
    exactly where it is unambiguous (all gates open, all closed)."""
    from edgekit.spec import DecoderSpec
    from exporters.onnx import validate, validation_cases

    spec = DecoderSpec(model.cfg)
    with _torch_reference(model) as ref:
        report = validate(ref, candidate, spec, tolerance=None, min_cosine=min_cosine,
                          advance=advance or (lambda *a, **k: None))
        if spec.gated:
            for i, case in enumerate(validation_cases(spec)):
                if case["label"] not in ("run-all", "skip-all-gated"):
                    continue
                feeds = spec.dummy(*case["shape"], seed=100 + i, thresholds=case["thresholds"])
                want, got = ref.infer(feeds)["executed"], candidate.infer(feeds)["executed"]
                if not np.array_equal(want.astype(bool), got.astype(bool)):
                    raise EdgekitError(f"validation: skip pattern {got.astype(int).tolist()} != PyTorch "
                                       f"{want.astype(int).tolist()} at {case['label']} {case['shape']}",
                                       "the exported conditionals are wrong")
    keep = ("logit_cosine_mean", "logit_cosine_min", "argmax_agreement", "max_abs_diff", "distinct_skip_patterns",
            "min_cosine", "passed")
    return {k: report[k] for k in keep if k in report} | {"cases": len(report["cases"])}


# ---------------------------------------------------------------------------------------------
# TensorRT and the GPU (device only)
# ---------------------------------------------------------------------------------------------
def tensorrt_environment() -> tuple[object, str, str]:
    """(tensorrt module, its version, GPU SM 'major.minor'), or an EdgekitError saying what is missing."""
    from runtimes.tensorrt import gpu_sm, load_tensorrt

    trt = load_tensorrt()
    return trt, trt.__version__, gpu_sm()


def tensorrt_available() -> str | None:
    """None when an engine can be built here, else why not (for skips and manifests)."""
    try:
        tensorrt_environment()
    except EdgekitError as e:
        return str(e)
    return None


def compatible_tensorrt(installed: str, versions: list[str]) -> bool:
    """An installed TensorRT matches a recipe version with the same major.minor ('10.x': same major)."""
    have = _vt(installed)
    for v in versions:
        want = _vt(v)
        if have[:len(want[:2])] == want[:2]:
            return True
    return False


def build_from_recipe(directory: Path, recipe: dict, log=None) -> dict:
    """Build model.engine (+ timing.cache) in `directory` from its ONNX model and recipe with TensorRT's Python
    API. Returns the engine facts for the manifest."""
    import time

    trt, version, sm = tensorrt_environment()
    directory, log = Path(directory), log or _stderr
    if _vt(version) < (8, 5):
        raise EdgekitError(f"TensorRT {version}: edgekit builds with the TensorRT 8.5+ Python API",
                           f"build with trtexec instead: {recipe['trtexec']}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if _vt(version)[0] >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = directory / recipe["onnx"]
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgekitError(f"TensorRT {version} cannot parse {onnx_path.name}: {'; '.join(errors[:5])}",
                           "check the artifact's op_check in manifest.json; re-export for this TensorRT")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(recipe["workspace_bytes"]))
    for name in recipe["builder_flags"]:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise EdgekitError(f"TensorRT {version} has no builder flag {name} (needed for {recipe['precision']})",
                               "use a TensorRT that supports it, or re-export at fp16")
        config.set_flag(flag)
    cache_path = directory / recipe["timing_cache"]
    timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(timing_cache, False)
    for prof in recipe["profiles"]:
        p = builder.create_optimization_profile()
        for name, s in prof["shapes"].items():
            p.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(p)
    log(f"building the TensorRT {version} engine for sm_{sm.replace('.', '')} ({recipe['precision']}); "
        "this takes minutes")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgekitError(f"TensorRT {version} failed to build the engine (its log above says why)",
                           "check free GPU memory and the recipe's workspace limit")
    (directory / recipe["engine"]).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"status": "built", "file": recipe["engine"], "timing_cache": recipe["timing_cache"],
            "tensorrt": version, "sm": sm, "build_seconds": round(time.perf_counter() - t0, 1),
            "profiles": [p["name"] for p in recipe["profiles"]]}


def validate_engine(model, directory: Path, cfg, min_cosine: float = GRAPH_COSINE) -> dict:
    """Engine outputs vs PyTorch running the weights the graph stores, on the seeded cases, at fp16 tolerance
    (logit cosine >= 0.999; the skip pattern must match where it is unambiguous)."""
    from edgekit.resolve import Resolved
    from runtimes.tensorrt import TensorRTRunner

    runner = TensorRTRunner(Resolved("engine", cfg.name, cfg, Path(directory), {}))
    with runner:
        return validate_against_torch(model, runner, min_cosine)


def not_built(recipe: dict, why: str) -> dict:
    return {"status": "not built", "why": why,
            "how": "on the target device: edgekit build-engine ARTIFACT (or the recipe's trtexec command)",
            "trtexec": recipe["trtexec"]}


# ---------------------------------------------------------------------------------------------
# export (called by edgekit.api.export for --format tensorrt) and build-engine
# ---------------------------------------------------------------------------------------------
def _load_model_proto(path: Path):
    import onnx

    return onnx.load(str(path))


def export(model, tmp_dir: Path, device: str, context: int | None = None, precision: str = "fp16",
           progress=None, min_cosine: float | None = None) -> dict:
    """Write the TensorRT-ready artifact content (model.onnx + data, trt_recipe.json, and where possible the
    engine) into `tmp_dir`; return the manifest fields. The caller writes config.json, tokenizer and manifest.

    min_cosine: the fidelity floor against fp32 PyTorch (mean logit cosine over the seeded cases); default the
    precision's (fp16 0.999, int4 0.95). The graph-correctness check (vs PyTorch with the stored weights) is fixed."""
    import tempfile

    import profiles
    from exporters.onnx import export_graph

    def step(description: str):
        if progress:
            progress(1, description=description)

    if device is None:
        raise EdgekitError("--format tensorrt needs --device (the target's profile)", "see: edgekit devices")
    profile = profiles.load(device)
    if profile.kind == "cpu" or "tensorrt" not in profile.runtimes:
        raise EdgekitError(f"{profile.name} does not run TensorRT", "use --format onnx for this device")
    policy = check_precision(precision, profile)
    cfg = model.cfg
    context = cfg.max_seq_len if context is None else int(context)
    if not 2 <= context <= cfg.max_seq_len:
        raise EdgekitError(f"--context {context} is outside 2..{cfg.max_seq_len} (the model's context)")
    tmp_dir = Path(tmp_dir)
    stacks = profile.tensorrt_versions
    if not stacks:
        raise EdgekitError(f"{profile.name}'s profile lists no TensorRT version", "add its stacks to the profile")

    step("exporting the ONNX graph")
    with tempfile.TemporaryDirectory(prefix="edgekit-trt-", dir=tmp_dir) as work:
        src = Path(work) / MODEL_FILE
        export_graph(model, src)
        graph = _load_model_proto(src)
    step("preparing the graph for TensorRT")
    conditionals = check_conditionals(graph)
    fp16_bytes = fp16_reference_bytes(graph)
    transform = quantize_int4(graph) if precision == "int4" else {}
    if precision in ("fp16", "int4"):
        transform |= store_fp16(graph)
    # one graph for every stack of the device: opset 17 when a TensorRT 8.x stack is among them (int4 needs 21)
    if precision != "int4" and any(t and op_support()[t]["opset_hard"] for t in map(data_version, stacks)):
        graph = downgrade_to_opset17(graph)
    drop_unused_initializers(graph)
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    topk_bound = math.ceil(context / cfg.block_size) if cfg.family == "r1" else None
    checks = {v: check_ops(graph, v, topk_bound) for v in dict.fromkeys(stacks)}
    ok = [v for v, r in checks.items() if r["ok"]]
    refused = {v: describe_issues(r) for v, r in checks.items() if not r["ok"]}
    if not ok:
        detail = "; ".join(f"TensorRT {v}: {why}" for v, why in refused.items())
        raise EdgekitError(f"the {precision} graph of {cfg.name} cannot be parsed by any TensorRT on {profile.name}: "
                           f"{detail}", "target a device stack with a newer TensorRT, or use --format onnx")
    weight_bytes = stored_bytes(graph)
    save_deduplicated(graph, tmp_dir / MODEL_FILE)
    recipe = make_recipe(cfg, profile, precision, context, weight_bytes, opset, ok, refused)
    (tmp_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))

    step("validating the graph in ONNX Runtime (CPU)")
    session = _Session(tmp_dir / MODEL_FILE)
    stored = stored_weights_model(model, transform)
    floor = policy["min_cosine"] if min_cosine is None else float(min_cosine)
    validation = {}
    if stored is not model:  # first: does the graph compute what it stores?
        validation["vs_stored_weights"] = validate_against_torch(stored, session, GRAPH_COSINE)
    try:  # then: how much did storing it at this precision cost?
        validation["vs_fp32"] = validate_against_torch(model, session, floor)
    except EdgekitError as e:
        exact = validation.get("vs_stored_weights", {}).get("logit_cosine_mean")
        raise EdgekitError(f"{precision} fidelity: {e.message}" + (
            f" (the graph itself matches PyTorch with the stored weights: cosine {exact:.6f}; the loss is "
            f"{precision}'s)" if exact else ""), "lower --min-cosine only if you accept the loss") from None
    fields = {
        "format": "tensorrt", "precision": precision, "device": profile.name, "model_file": MODEL_FILE,
        "recipe": RECIPE_FILE, "context": context, "opset": opset,
        "inputs": recipe["io"]["inputs"], "outputs": recipe["io"]["outputs"],
        "weights": {"stored_bytes": weight_bytes, "fp16_bytes": fp16_bytes,
                    "ratio_to_fp16": round(weight_bytes / fp16_bytes, 4), **_summary(transform)},
        "op_check": {v: {"ok": r["ok"], "table": r["table"], "issues": r["issues"][:50], "notes": r["notes"]}
                     for v, r in checks.items()},
        "conditionals": conditionals,
        "validation": {"onnxruntime_cpu": validation},
        "tensorrt": {"sm": profile.sm, "versions": ok, "refused": refused},
    }
    why_not = tensorrt_available()
    if why_not is None:
        _trt, here_version, here_sm = tensorrt_environment()
        if not compatible_tensorrt(here_version, ok) or here_sm != profile.sm:
            why_not = (f"this machine (TensorRT {here_version}, sm {here_sm}) is not the target "
                       f"(TensorRT {', '.join(ok)}, sm {profile.sm})")
    if why_not is None:
        step("building the TensorRT engine")
        engine = build_from_recipe(tmp_dir, recipe)
        step("validating the engine against PyTorch")
        engine["validation"] = validate_engine(stored, tmp_dir, cfg)
        fields["engine"] = engine
    else:
        fields["engine"] = not_built(recipe, why_not)
    return fields


def drop_unused_initializers(model) -> list[str]:
    """Remove initializers no node reads (in their graph or any subgraph below it), e.g. what the opset
    conversion left behind; ONNX Runtime warns about each."""
    used = {name for _w, _g, node, _t, _c in _walk(model.graph) for name in node.input}
    used |= {o.name for o in model.graph.output}
    dropped = []
    for g in _graphs_of(model):
        for init in [i for i in g.initializer if i.name not in used]:
            g.initializer.remove(init)
            dropped.append(init.name)
    return dropped


def stored_weights_model(model, transform: dict):
    """A copy of `model` holding exactly the weights the graph stores (int4-dequantized, fp16-rounded), so the
    graph's arithmetic can be checked tightly apart from the precision loss. `model` itself for fp32."""
    import copy

    import torch

    if not transform:
        return model
    quantized = {q["name"].removeprefix("model."): q["axis"] for q in transform.get("quantized", [])}
    stored = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in stored.named_parameters():
            w = p.detach().cpu().numpy()
            if name in quantized:
                p.copy_(torch.from_numpy(int4_dequantized(w, quantized[name])))
            elif p.numel() >= MIN_WEIGHT_ELEMENTS and np.abs(w).max() <= FP16_MAX:
                p.copy_(torch.from_numpy(w.astype(np.float16).astype(np.float32)))
    return stored


def _summary(transform: dict) -> dict:
    out = {k: v for k, v in transform.items() if k in ("fp16_weights", "kept_fp32_out_of_range") and v}
    if "quantized" in transform:
        out |= {"int4_block_size": transform["block_size"], "int4_tensors": len(transform["quantized"]),
                "int4_readers": sum(q["readers"] for q in transform["quantized"]),
                "int4_left_float": transform["left_float"]}
    return out


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def engine_facts(directory: Path, manifest: dict | None = None) -> dict:
    """What is known about the engine in an artifact: engine.json (written by build-engine, which leaves the
    hashed manifest -- and a bundle's signature -- untouched), else the manifest's `engine` entry."""
    path = Path(directory) / ENGINE_JSON
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EdgekitError(f"cannot read {path}: {e}",
                               "rebuild the engine: edgekit build-engine DIR --force") from None
    return dict((manifest or {}).get("engine") or {})


def build_engine(target: str | Path, recipe: str | Path | None = None, force: bool = False, log=_stderr) -> dict:
    """`edgekit build-engine`: build the engine of a TensorRT artifact or installed bundle on this machine from
    its recipe, check it against the artifact's ONNX graph (ONNX Runtime, CPU, seeded cases), and add
    model.engine, timing.cache and engine.json to the directory. Each file is written to a temporary name and
    renamed into place, model.engine last, so an interrupted build leaves no engine behind; the hashed manifest
    (and a bundle's bundle.json) is not rewritten, which keeps a bundle's signature valid.

    Refuses where TensorRT or a GPU is missing, and a recipe made for another SM or TensorRT unless `force`."""
    import os

    from edgekit.artifact import read_manifest

    path = Path(target)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        raise EdgekitError(f"{path} is a bundle file", "install it first (edgekit install BUNDLE --dest DIR; "
                           "install builds the engine where it can), then: edgekit build-engine DIR")
    if not path.is_dir():
        raise EdgekitError(f"{path} does not exist or is not a directory", "pass a TensorRT artifact directory")
    manifest = read_manifest(path)
    if manifest.get("format") != "tensorrt":
        raise EdgekitError(f"{path} is a {manifest.get('format')} artifact, not a TensorRT one",
                           "export it with: edgekit export MODEL --format tensorrt --device DEVICE --out DIR")
    recipe = read_recipe(Path(recipe).parent if recipe else path)
    trt, version, sm = tensorrt_environment()
    mismatch = []
    if not compatible_tensorrt(version, recipe["tensorrt"]["versions"]):
        mismatch.append(f"TensorRT {version} here, recipe made for {', '.join(recipe['tensorrt']['versions'])}")
    if recipe.get("sm") and recipe["sm"] != sm:
        mismatch.append(f"GPU sm_{sm.replace('.', '')} here, recipe made for sm_{recipe['sm'].replace('.', '')} "
                        f"({recipe['device']})")
    if mismatch and not force:
        raise EdgekitError(f"recipe mismatch: {'; '.join(mismatch)}",
                           "re-export for this device, or pass --force to build anyway")
    engine_path = path / recipe["engine"]
    if engine_path.is_file() and not force:
        raise EdgekitError(f"{path} already has {recipe['engine']}", "pass --force to rebuild it")
    with tempfile_dir(path) as work:
        if (path / recipe["timing_cache"]).is_file():  # reuse an earlier cache: faster rebuilds
            (work / recipe["timing_cache"]).write_bytes((path / recipe["timing_cache"]).read_bytes())
        (work / recipe["onnx"]).symlink_to((path / recipe["onnx"]).resolve())
        for extra in path.glob(recipe["onnx"] + ".data"):
            (work / extra.name).symlink_to(extra.resolve())
        facts = build_from_recipe(work, recipe, log=log)
        facts["forced"] = bool(mismatch)
        facts["mismatch"] = mismatch
        facts["validation"] = _validate_engine_vs_onnx(work, path, recipe)
        (work / ENGINE_JSON).write_text(json.dumps(facts, indent=1))
        for name in (recipe["timing_cache"], ENGINE_JSON, recipe["engine"]):
            os.replace(work / name, path / name)
    return {"artifact": str(path), **facts}


@contextlib.contextmanager
def tempfile_dir(parent: Path):
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=".engine.", suffix=".partial", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _validate_engine_vs_onnx(work: Path, artifact: Path, recipe: dict) -> dict:
    """On the device there may be no PyTorch model, but the artifact's ONNX graph (validated against PyTorch at
    export) is the reference: the engine must agree with it in ONNX Runtime on the seeded cases."""
    from edgekit.config import read_config
    from edgekit.resolve import Resolved
    from edgekit.spec import DecoderSpec
    from exporters.onnx import validate
    from runtimes.tensorrt import TensorRTRunner

    cfg = read_config(artifact)
    reference = _Session(Path(artifact) / recipe["onnx"])
    runner = TensorRTRunner(Resolved("engine", cfg.name, cfg, Path(work), {}), engine=Path(work) / recipe["engine"])
    with runner:
        report = validate(reference, runner, DecoderSpec(cfg), tolerance=None, min_cosine=GRAPH_COSINE)
    return {k: report[k] for k in ("logit_cosine_mean", "logit_cosine_min", "argmax_agreement", "max_abs_diff",
                                   "passed") if k in report} | {"reference": "onnxruntime (CPU) on the artifact's ONNX"}


