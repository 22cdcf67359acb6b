"""Graph transforms that make an exported ONNX graph TensorRT-ready: opset 18 -> 17 for TensorRT 8.x, fp16
weight storage (fp32 compute), int4 weight-only explicit Q/DQ (block 128), and saving with shared weights stored
once. Each works on the main graph and every If branch (R1's gated layers read outer-scope weights)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from exporters.trt_ops import graphs_of, walk

INT4_BLOCK = 128
FP16_MAX = 65504.0
MIN_WEIGHT_ELEMENTS = 16  # smaller float initializers (eps, scalars) stay fp32


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
    for _w, g, node, _t, _c in walk(model.graph):
        for init in g.initializer:
            values.setdefault(init.name, init)
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    values.setdefault(node.output[0], a.t)
    for where, _g, node, _t, _c in walk(model.graph):
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


def drop_unused_initializers(model) -> list[str]:
    """Remove initializers no node reads (in their graph or any subgraph below it), e.g. what the opset
    conversion left behind; ONNX Runtime warns about each."""
    used = {name for _w, _g, node, _t, _c in walk(model.graph) for name in node.input}
    used |= {o.name for o in model.graph.output}
    dropped = []
    for g in graphs_of(model):
        for init in [i for i in g.initializer if i.name not in used]:
            g.initializer.remove(init)
            dropped.append(init.name)
    return dropped


def _consumers(model) -> dict[str, list]:
    """initializer name -> [(graph, node, input index)] over every graph that can see it."""
    names = {i.name for g in graphs_of(model) for i in g.initializer}
    uses: dict[str, list] = {n: [] for n in names}
    for _w, g, node, _t, _c in walk(model.graph):
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
    for g in graphs_of(model):
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
    owner = {i.name: (g, i) for g in graphs_of(model) for i in g.initializer}
    done, skipped = [], []
    for name, readers in uses.items():
        g, init = owner[name]
        if init.data_type != TensorProto.FLOAT or len(init.dims) != 2 or 1 in init.dims or not readers:
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
    for g in graphs_of(model):
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
        for g in graphs_of(model):
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
    for g in graphs_of(model):
        for t in g.initializer:
            n = int(np.prod(t.dims, dtype=np.int64))
            big_float = t.data_type == TensorProto.FLOAT and n >= MIN_WEIGHT_ELEMENTS
            total += n * (2 if big_float else helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    return total
