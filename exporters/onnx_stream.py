"""Streamed ONNX export (issue 18): a stamped graph (exporters/onnx_stamp.py) whose weights are written one
tensor at a time from a weight source (edgekit/weights.py), block-int8-quantized on the way with exactly the
in-memory path's numerics (onnx_int8.block_quantize_rows on the same fp32 rows), so peak memory is about one
layer's fp32 weights plus the runtime, whatever the depth, and the trace is the template's, whatever the depth.

int8: the template graph goes through the normal quantizer (quantize_int8) and is stamped as it comes out;
each quantized initializer of the stamped graph is traced back to its parameter by its name
(`{param}[_T]_Q8B{block}` / `{param}[_T]_scales`, `_T`: quantized as W.T, x @ W's [in, out] storage) and
recomputed from the source. The stamped graph is self-checked against the template: recomputing the
template's own quantized tensors from its fp32 weights must give its bytes.
"""

from __future__ import annotations

import dataclasses
import re
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from exporters.onnx_stamp import LAYER_NAME, segment, stamp, trace_template

PARAM_PREFIX = "model."  # FlatDecoder wraps the model as `model`
QUANTIZED = re.compile(r"^(?P<param>.+?)(?P<t>_T)?_(?:Q8B(?P<block>\d+)|scales)$")
INLINE_BYTES = 1024  # smaller tensors stay in the graph file (save_external's size_threshold)
CHECK_ELEMENTS = 64 << 20  # templates up to this many parameters: seeded weights and the requantize self-check


@dataclass
class LayerPlan:
    """How the target's layers come from a few-layer template: template config, the template layer of
    each target layer, and the parameter rename from template layer t to target layer l."""

    template_cfg: object
    src: Callable[[int], int]
    rename: Callable[[str, int, int], str]


def layer_plan(cfg) -> LayerPlan:
    """edgekit V3 / R1: V3 and ungated R1 from 2 layers (0 and a middle one); gated R1 from 3: layer 0 (gated
    if the target's is), a gated layer and an ungated one; R1's template has no sharing, its blocks are
    renamed to block_of(l), so the target's shared blocks are one set of initializers."""
    n = cfg.n_layers
    gates = set(getattr(cfg, "gated_layers", []) or [])
    if gates and n >= 2:
        tcfg = dataclasses.replace(cfg, n_layers=3, n_unique_blocks=0,
                                   gated_layers=([0] if 0 in gates else []) + [1])

        def src(layer: int) -> int:
            return 0 if layer == 0 else (1 if layer in gates else 2)
    else:
        tcfg = dataclasses.replace(cfg, n_layers=min(2, n), **({"n_unique_blocks": 0} if cfg.family == "r1" else {}))

        def src(layer: int) -> int:
            return 0 if layer == 0 else 1
    block_of = cfg.block_of if cfg.family == "r1" else (lambda layer: layer)

    def rename(name: str, t: int, layer: int) -> str:
        name = re.sub(rf"\.blocks\.{t}\.", f".blocks.{block_of(layer)}.", name)
        return re.sub(rf"\.(gates|layers)\.{t}\.", rf".\g<1>.{layer}.", name)

    return LayerPlan(tcfg, src, rename)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def stamped_graph(cfg, workdir: Path, int8: bool, template_model=None, plan: LayerPlan | None = None
                  ) -> tuple[object, dict]:
    """(stamped ModelProto with weights not yet written, info). The template is traced into workdir.
    plan: layer_plan(cfg) unless given (Hugging Face models: exporters/onnx_hf_stamp.py, with template_model)."""
    import onnx

    from edgekit.models import build
    from exporters.onnx import MODEL_FILE

    plan = plan or layer_plan(cfg)
    t0 = time.monotonic()
    if template_model is not None:
        tmodel = template_model
    else:  # the template's weight values are never used: a large one stays untouched (not resident) memory
        tmodel = build(plan.template_cfg, device="meta").to_empty(device="cpu").eval()
        if sum(p.numel() for p in tmodel.parameters()) <= CHECK_ELEMENTS:
            tmodel = build(plan.template_cfg, seed=0)
    params = {n for n, _ in tmodel.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in tmodel.named_parameters()}
    small = sum(int(np.prod(s)) for s in shapes.values()) <= CHECK_ELEMENTS
    tdir = Path(workdir) / "template"
    tdir.mkdir(parents=True, exist_ok=True)
    trace_template(tmodel, tdir / MODEL_FILE, weights=small)  # large: zero placeholders, never in memory
    del tmodel
    trace_s = time.monotonic() - t0
    path = tdir / MODEL_FILE
    info = {"template_layers": plan.template_cfg.n_layers, "trace_s": round(trace_s, 2)}
    if int8:
        from exporters.onnx_int8 import quantize_int8

        qdir = Path(workdir) / "template_int8"
        qdir.mkdir(exist_ok=True)
        info["quantization"] = quantize_int8(path, qdir / MODEL_FILE)
        if len(params) and small:
            _check_requantize(path, qdir / MODEL_FILE)
        path = qdir / MODEL_FILE
    proto = onnx.load(str(path), load_external_data=False)
    _load_constants(proto, path.parent, params)
    t1 = time.monotonic()
    tpl = segment(proto)
    out = stamp(tpl, cfg.n_layers, plan.src, plan.rename)
    from exporters.onnx import axis_sums, hoist_branch_invariants, strip_debug_info

    strip_debug_info(out)
    info["hoist"] = hoist_branch_invariants(out, axis_sums=axis_sums(cfg))
    info["stamp_s"] = round(time.monotonic() - t1, 2)
    return out, info


def _load_constants(proto, base: Path, params: set[str]) -> None:
    """Load the external data of the template's initializers that are not parameters (constants: small)."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    for t in proto.graph.initializer:
        if uses_external_data(t) and weight_origin(t.name, params) is None:
            load_external_data_for_tensor(t, str(base))
            t.data_location = 0
            del t.external_data[:]


def weight_origin(name: str, params: set[str]) -> tuple | None:
    """Where an initializer of the stamped graph comes from: ("fp32", param) / ("q8" | "scales", param,
    transposed, block) for the quantized ones, None for a constant (its data is in the graph)."""
    if not name.startswith(PARAM_PREFIX):
        return None
    bare = name[len(PARAM_PREFIX):]
    if bare in params:
        return ("fp32", bare)
    m = QUANTIZED.match(bare)
    if m and m.group("param") in params:
        return ("q8" if m.group("block") else "scales", m.group("param"), bool(m.group("t")),
                int(m.group("block") or 0))
    return None


def _check_requantize(fp32_path: Path, int8_path: Path) -> None:
    """The quantized tensors of the int8 template, recomputed from its fp32 weights by `weight_origin`'s rule,
    are byte-identical (the naming convention of onnx_int8 and this module agree)."""
    import onnx
    from onnx import numpy_helper

    from exporters.onnx_int8 import block_quantize_rows

    fp32 = {t.name[len(PARAM_PREFIX):]: numpy_helper.to_array(t) for t in onnx.load(str(fp32_path)).graph.initializer
            if t.name.startswith(PARAM_PREFIX)}
    q = onnx.load(str(int8_path))
    blocks = {}
    for t in q.graph.initializer:
        o = weight_origin(t.name, set(fp32))
        if o and o[0] == "q8":
            blocks[(o[1], o[2])] = o[3]
    for t in q.graph.initializer:
        o = weight_origin(t.name, set(fp32))
        if o is None or o[0] == "fp32":
            continue
        w = fp32[o[1]]
        packed, scales = block_quantize_rows(w.T if o[2] else w, blocks[(o[1], o[2])])
        want = packed if o[0] == "q8" else scales
        if want.tobytes() != numpy_helper.to_array(t).tobytes():
            raise EdgekitError(f"streamed int8 of {t.name} differs from the quantizer's",
                               "this is an edgekit bug: export without --stream and report it")


def write_weights(proto, source, path: Path, on_layer: Callable[[int, int], None] | None = None) -> dict:
    """Fill `proto`'s parameter-derived initializers from `source` (one tensor at a time, quantized where the
    graph wants int8), append them to path.data, then write path (the graph, < 2 GiB). Returns sizes."""
    import onnx
    from onnx import TensorProto, numpy_helper

    path = Path(path)
    params = set(source.names())
    g = proto.graph
    _fold_parameters(proto, source, params)
    origins = [(t, weight_origin(t.name, params)) for t in g.initializer]
    needed = sorted({o[1] for _, o in origins if o})
    source.missing(needed)
    first = {}
    for k, (_, o) in enumerate(origins):
        if o:
            first.setdefault(o[1], k)
    blocks = {(o[1], o[2]): o[3] for _, o in origins if o and o[0] == "q8"}
    order = sorted(range(len(origins)), key=lambda k: (first.get(origins[k][1][1], k) if origins[k][1] else -1, k))
    data_name = path.name + ".data"
    written = 0
    layer_seen = -1
    pending: dict[tuple, tuple] = {}
    new_inits = []
    with open(path.with_name(data_name), "wb") as f:
        current, current_arr = None, None
        for k in order:
            t, o = origins[k]
            if o is None:
                arr = None  # a constant from the template: keep it as is (small, inline)
                if t.data_location == TensorProto.EXTERNAL:
                    raise EdgekitError(f"constant {t.name} has no data", "this is an edgekit bug")
                new_inits.append(t)
                continue
            m = LAYER_NAME.search(o[1])
            if m and on_layer is not None and int(m.group(1)) != layer_seen:
                layer_seen = int(m.group(1))
                on_layer(layer_seen, written)
            if o[0] == "fp32":
                if current != o[1]:
                    current, current_arr = o[1], source.get(o[1])
                arr = current_arr.astype(np.float32, copy=False)
            else:
                key = (o[1], o[2])  # the int8 rows and their scales: quantized once, kept until both are out
                if key not in pending:
                    if current != o[1]:
                        current, current_arr = o[1], source.get(o[1])
                    if key not in blocks:
                        raise EdgekitError(f"no block size for {t.name}", "this is an edgekit bug")
                    pending[key] = [*quantize_rows_chunked(current_arr.T if o[2] else current_arr, blocks[key]), 0]
                entry = pending[key]
                arr = entry[0] if o[0] == "q8" else entry[1]
                entry[2] += 1
                if entry[2] == 2:
                    del pending[key]
            if tuple(arr.shape) != tuple(t.dims):
                raise EdgekitError(f"{o[1]} has shape {arr.shape}, the graph expects {tuple(t.dims)} for {t.name}",
                                   "the weights and the config come from different models")
            new = numpy_helper.from_array(np.ascontiguousarray(arr), t.name) if arr.nbytes < INLINE_BYTES else None
            if new is None:
                new = TensorProto(name=t.name, data_type=t.data_type, dims=list(t.dims))
                for key, value in (("location", data_name), ("offset", str(written)), ("length", str(arr.nbytes))):
                    entry = new.external_data.add()
                    entry.key, entry.value = key, value
                new.data_location = TensorProto.EXTERNAL
                np.ascontiguousarray(arr).tofile(f)  # no bytes copy of a 0.5 GB embedding
                written += arr.nbytes
            new_inits.append(new)
        current_arr = None
    del g.initializer[:]
    g.initializer.extend(new_inits)
    graph_bytes = proto.ByteSize()
    if graph_bytes >= 2**31:
        raise EdgekitError(f"the graph itself is {graph_bytes / 2**30:.1f} GiB", "this is an edgekit bug: constants "
                           "should be external")
    onnx.save_model(proto, str(path))
    return {"data_bytes": written, "graph_bytes": graph_bytes}


CHUNK_ROWS_BYTES = 256 << 20


def quantize_rows_chunked(rows: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """block_quantize_rows of `rows` [N, K] (any strides) in slices of rows, so its fp32 working copies are at most
    CHUNK_ROWS_BYTES (a 7B model's 152064 x 3584 embedding is 2.2 GB): the same bytes, each row is quantized alone."""
    from exporters.onnx_int8 import block_quantize_rows

    n, k = rows.shape
    step = max(1, CHUNK_ROWS_BYTES // max(1, 4 * k))
    if n <= step:
        return block_quantize_rows(rows, block)
    kb = (k + block - 1) // block
    packed, scales = np.empty((n, kb, block), np.uint8), np.empty((n, kb), np.float32)
    for i in range(0, n, step):
        packed[i:i + step], scales[i:i + step] = block_quantize_rows(rows[i:i + step], block)
    return packed, scales


FOLD_ELEMENTS = 8192  # the dynamo exporter's optimizer folds nodes whose inputs are at most this large


def _fold_parameters(proto, source, params: set[str]) -> int:
    """Constant-fold the main-graph nodes that read only parameters (at most FOLD_ELEMENTS each) and constants,
    as the normal export's optimizer does (the template kept parameters out of folding): R1's padded position
    tables. Evaluated here, per layer, from the source's weights; the node becomes an initializer."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    values: dict[str, np.ndarray] = {}

    def value(name: str):
        if name in values:
            return values[name]
        o = weight_origin(name, params)
        if o is not None:
            return source.get(o[1]) if o[0] == "fp32" else None
        return numpy_helper.to_array(inits[name])

    def small(name: str) -> bool:
        o = weight_origin(name, params)
        if name in values:
            return True
        return o is not None and o[0] == "fp32" and int(np.prod(source.shape(o[1]))) <= FOLD_ELEMENTS

    keep, folded = [], 0
    opsets = list(proto.opset_import)
    for node in g.node:
        ins = [i for i in node.input if i]
        if (ins and node.op_type not in ("If", "Loop", "Scan") and not node.op_type.startswith("Random")
                and node.domain in ("", "ai.onnx") and all(i in inits or i in values for i in ins)
                and any(small(i) for i in ins)
                and all(small(i) or weight_origin(i, params) is None for i in ins)):
            feeds = {i: value(i) for i in ins}
            single = helper.make_model(helper.make_graph(
                [node], "fold", [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(feeds[i].dtype),
                                                               feeds[i].shape) for i in ins],
                [helper.make_tensor_value_info(o, 0, None) for o in node.output]), opset_imports=opsets)
            for o, v in zip(node.output, ReferenceEvaluator(single).run(None, feeds)):
                values[o] = np.asarray(v)
            folded += 1
            continue
        keep.append(node)
    if folded:
        del g.node[:]
        g.node.extend(keep)
        g.initializer.extend(numpy_helper.from_array(v, n) for n, v in values.items())
        _prune_initializers(proto)
    return folded


def _prune_initializers(proto) -> None:
    from exporters.onnx_graph import iter_graphs

    used = {i for _, g in iter_graphs(proto.graph) for n in g.node for i in n.input}
    used |= {o.name for o in proto.graph.output}
    keep = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(keep)


def export_streamed(cfg, source, out_dir: Path, int8: bool, progress=None, template_model=None) -> dict:
    """Write out_dir/model.onnx + model.onnx.data for `cfg` with the weights of `source`. Returns the trace and
    stamping times, per-layer progress, sizes and peak RSS."""
    import shutil
    import tempfile

    from exporters.onnx import MODEL_FILE

    out_dir = Path(out_dir)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="template-", dir=out_dir))
    try:
        proto, info = stamped_graph(cfg, work, int8, template_model)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return write_streamed(proto, info, source, out_dir / MODEL_FILE, t0, progress)


def write_streamed(proto, info: dict, source, path: Path, t0: float, progress=None) -> dict:
    """write_weights with per-layer progress (elapsed since t0, bytes, peak RSS); `info` updated and returned."""
    layers = []

    def on_layer(layer: int, written: int) -> None:
        layers.append({"layer": layer, "elapsed_s": round(time.monotonic() - t0, 1), "written_bytes": written,
                       "peak_rss_gib": round(peak_rss_gib(), 2)})
        if progress is not None:
            progress(layer, layers[-1])

    info.update(write_weights(proto, source, path, on_layer))
    info.update(total_s=round(time.monotonic() - t0, 1), peak_rss_gib=round(peak_rss_gib(), 2), layers=layers)
    if "quantization" in info:  # the quantizer ran on the template: count the stamped graph's weights and nodes
        count_int8(proto, info["quantization"])
    return info


def count_int8(proto, q: dict) -> None:
    """The quantizer's counts (`q`, of the template) replaced by the stamped graph's, in place; the template's
    number of quantized weights kept as template_weights_quantized."""
    from exporters.onnx_graph import iter_graphs

    graphs = list(iter_graphs(proto.graph))
    q["template_weights_quantized"] = q.get("weights_quantized")
    q["weights_quantized"] = sum(1 for _, g in graphs for t in g.initializer if re.search(r"_Q8B\d+$", t.name))
    for key, op, where in (("MatMulNBits_main", "MatMulNBits", True), ("MatMulNBits_branches", "MatMulNBits", False),
                           ("GatherBlockQuantized", "GatherBlockQuantized", None)):
        q[key] = sum(1 for path, g in graphs for n in g.node
                     if n.op_type == op and where in (None, path == "main"))
