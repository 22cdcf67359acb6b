"""Fused ONNX Runtime ops for exported Hugging Face llama / qwen2 decoder graphs (issue 14).

The dynamo exporter writes attention as ~40 small nodes per layer (q/k/v reshapes and transposes, rotate-half
RoPE, repeat_kv Expand/Reshape for grouped-query heads, QK^T, scale, mask Add, Softmax, AV) and RMSNorm as seven
(Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul). This pass rewrites them into ONNX Runtime's contrib ops:

  attention  -> com.microsoft GroupQueryAttention (num_heads, kv_num_heads; do_rotary 0: q and k arrive already
                rotated by the graph's own RoPE nodes, so positions derived from the attention mask stay the
                graph's), the additive mask [B, 1, S, T] the graph built as `attention_bias`, present key/value
                written by the op (BNSH, the graph's layout);
  RMSNorm    -> SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (onnxruntime.transformers'
                optimizer, opt_level 0, which matches the dynamo form; ORT's load-time fusion does not).

ONNX Runtime's CPU GroupQueryAttention refuses batch > 1 with several new tokens on a non-empty past ("batch_size
must be 1 when sequence_length > 1 and past context is given"; 1.32) and ignores position_ids on an empty past. So
the fused graph is one `If` at the top (exporters/onnx_fused_if.py: which shapes take which branch, the fused branch
as a model of its own for a runner): every decode step and every unpadded prefill run the fused branch, a left-padded
prefill or a batched continuation the unfused one. Both branches read the same initializers (weights once in the
file), and the result is exact either way (validated against PyTorch on every shape edgekit's validation cases
cover, both branches included). The fused branch takes the past's length from attention_mask, not from the cache's
shape, so the cache may be one longer buffer that the op writes in place.

Graphs this does not recognise (V3/R1's routed and relative-position attention, the gated HF family's `If`s,
MLA caches) are left as they are; `fuse` says why in its report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.spec import MASK
from exporters.onnx_fused_if import SHARED_CACHE, past_length_from_mask, wrap_fallback

OPSET_MS = "com.microsoft"


class NotFused(Exception):
    """The graph does not have the pattern the fusion rewrites (the graph is kept unfused)."""


def _maps(graph):
    prod = {o: n for n in graph.node for o in n.output}
    cons: dict[str, list] = {}
    for n in graph.node:
        for i in dict.fromkeys(n.input):  # a node reading a value twice (Concat(f, f)) is one consumer
            cons.setdefault(i, []).append(n)
    return prod, cons


def _one(cons, name: str, op: str):
    found = [n for n in cons.get(name, []) if n.op_type == op]
    if len(found) != 1:
        raise NotFused(f"expected one {op} reading {name}, found {[n.op_type for n in cons.get(name, [])]}")
    return found[0]


def _constant(graph, prod, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    node = prod.get(name)
    if node is not None and node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    return None


def _packed(graph_nodes: list, bnsh: str, tag: str, prod) -> str:
    """A [B, S, N*D] tensor for a BNSH one: the projection's output when `bnsh` is Transpose(Reshape(linear)),
    else Transpose + Reshape nodes appended to graph_nodes."""
    from onnx import helper

    node = prod.get(bnsh)
    if node is not None and node.op_type == "Transpose" and list(node.attribute[0].ints) == [0, 2, 1, 3]:
        reshape = prod.get(node.input[0])
        if reshape is not None and reshape.op_type == "Reshape":
            return reshape.input[0]
    graph_nodes += [helper.make_node("Transpose", [bnsh], [f"{tag}_bsnh"], perm=[0, 2, 1, 3], name=f"{tag}_bsnh"),
                    helper.make_node("Reshape", [f"{tag}_bsnh", "gqa_bsd_shape"], [f"{tag}_packed"],
                                     name=f"{tag}_packed")]
    return f"{tag}_packed"


def _unrotated(prod, rotated: str) -> str | None:
    """x when `rotated` is the rotate-half RoPE of x: Add(Mul(x, cos), Mul(Concat(Neg(Slice(x)), Slice(x)), sin))."""
    add = prod.get(rotated)
    if add is None or add.op_type != "Add":
        return None
    muls = [prod.get(i) for i in add.input]
    if any(m is None or m.op_type != "Mul" for m in muls):
        return None
    for m in muls:
        for i in m.input:
            t = prod.get(i)
            if t is not None and t.op_type == "Transpose":
                return i
    return None


def _rotary_tables(graph, prod, cons) -> tuple[str, np.ndarray] | None:
    """(position ids [B, S] int64, inv_freq) when the graph computes RoPE as cos/sin(positions x inv_freq) with no
    extra scaling, else None."""
    from onnx import numpy_helper

    inv = [t for t in graph.initializer if t.name.endswith("inv_freq")]
    if len(inv) != 1:
        return None
    mul = [n for n in cons.get(inv[0].name, []) if n.op_type == "Mul"]
    if len(mul) != 1:
        return None
    x = next(i for i in mul[0].input if i != inv[0].name)
    while x in prod and prod[x].op_type in ("Cast", "Unsqueeze"):
        x = prod[x].input[0]
    cats = cons.get(mul[0].output[0], [])  # Concat(f, f): one or one each for cos and sin
    if not cats or any(c.op_type != "Concat" or set(c.input) != {mul[0].output[0]} for c in cats):
        return None
    trig = [t for c in cats for t in cons.get(c.output[0], [])]
    if sorted(n.op_type for n in trig) != ["Cos", "Sin"]:
        return None
    for t in trig:  # cos/sin used as they are (no attention scaling Mul on the way to the rotation)
        users = cons.get(t.output[0], [])
        while len(users) == 1 and users[0].op_type in ("Unsqueeze", "Cast"):
            users = cons.get(users[0].output[0], [])
        if any(u.op_type != "Mul" for u in users):
            return None
    return x, numpy_helper.to_array(inv[0]).astype(np.float64)


def _qk_matmul(cons, kc, layer: int):
    """present.key -> [Unsqueeze -> Expand -> Reshape] (repeat_kv) -> Transpose -> MatMul(q, K^T)."""
    n = kc
    users = list(cons.get(n.output[0], []))
    while users and users[0].op_type in ("Unsqueeze", "Expand", "Reshape") and len(users) == 1:
        n = users[0]
        users = cons.get(n.output[0], [])
    kt = _one(cons, n.output[0], "Transpose")
    qk = _one(cons, kt.output[0], "MatMul")
    if qk.input[1] != kt.output[0]:
        raise NotFused(f"layer {layer}: QK^T MatMul reads K first")
    return qk


def _projection(prod, bnsh: str):
    """The MatMul that projects a head tensor: bnsh = [RoPE of] Transpose(0,2,1,3)(Reshape(MatMul(x, W)))."""
    x = _unrotated(prod, bnsh) or bnsh
    tr = prod.get(x)
    if tr is None or tr.op_type != "Transpose" or list(tr.attribute[0].ints) != [0, 2, 1, 3]:
        return None
    reshape = prod.get(tr.input[0])
    mm = prod.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    return mm if mm is not None and mm.op_type == "MatMul" else None


def pack_qkv(model) -> int:
    """Per layer, the q, k and v projections (three MatMuls of the same input) become one MatMul with the weights
    concatenated [K, q + k + v] and a Split back to the three outputs: exact, one weight in the file that the
    fused GroupQueryAttention reads packed (one int8 MatMul per layer instead of three: one activation
    quantization, as ONNX Runtime GenAI's graphs have) and the unfused branch reads split. -> layers packed."""
    from onnx import helper, numpy_helper

    g = model.graph
    prod, cons = _maps(g)
    inits = {t.name: t for t in g.initializer}
    past_keys = [i.name for i in g.input if i.name.startswith("past.") and i.name.endswith(".key")]
    replace, drop, packed = {}, set(), 0
    for layer, pk in enumerate(past_keys):
        try:
            kc = _one(cons, pk, "Concat")
            vc = _one(cons, pk[:-3] + "value", "Concat")
            qk = _qk_matmul(cons, kc, layer)
        except NotFused:
            return 0
        mms = [_projection(prod, qk.input[0]), _projection(prod, kc.input[1]), _projection(prod, vc.input[1])]
        if any(m is None for m in mms) or len({m.input[0] for m in mms}) != 1 or len({id(m) for m in mms}) != 3:
            return 0
        ws = [inits.get(m.input[1]) for m in mms]
        if any(w is None or len(w.dims) != 2 for w in ws) or len({w.dims[0] for w in ws}) != 1:
            return 0
        if any(len(cons.get(w.name, [])) != 1 for w in ws):  # a weight read elsewhere too: leave it
            return 0
        arrays = [numpy_helper.to_array(w) for w in ws]
        name = f"{ws[0].name}_qkv{layer}"
        g.initializer.append(numpy_helper.from_array(np.concatenate(arrays, axis=1), name))
        g.initializer.append(numpy_helper.from_array(np.array([a.shape[1] for a in arrays], np.int64), name + "_split"))
        out = f"qkv{layer}_packed"
        nodes = [helper.make_node("MatMul", [mms[0].input[0], name], [out], name=f"qkv{layer}_matmul"),
                 helper.make_node("Split", [out, name + "_split"], [m.output[0] for m in mms], axis=-1,
                                  name=f"qkv{layer}_split")]
        first = min(mms, key=lambda m: list(g.node).index(m))
        replace[id(first)] = nodes
        drop.update(id(m) for m in mms)
        for w in ws:
            g.initializer.remove(w)
        packed += 1
    new = []
    for node in g.node:
        if id(node) in replace:
            new += replace[id(node)]
        elif id(node) not in drop:
            new.append(node)
    del g.node[:]
    g.node.extend(new)
    return packed


def fuse_attention(model, num_heads: int, max_positions: int = 8192) -> dict:
    """Rewrite every layer's attention of the main graph into GroupQueryAttention; -> {"layers", "rotary"}.
    Raises NotFused (graph untouched) when a layer does not match. RoPE moves into the op (do_rotary, position_ids
    the graph's own, cos/sin tables of max_positions rows from its inv_freq) when the graph computes it plainly;
    else the graph's rotated q and k are fed in."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    prod, cons = _maps(g)
    past_keys = [i.name for i in g.input if i.name.startswith("past.") and i.name.endswith(".key")]
    if not past_keys:
        raise NotFused("no past.N.key inputs")
    if any(n.op_type == "If" for n in g.node):
        raise NotFused("the graph has If nodes (a gated model): left unfused")
    past0 = next(i for i in g.input if i.name == past_keys[0])
    kv_heads = past0.type.tensor_type.shape.dim[1].dim_value
    head_dim = past0.type.tensor_type.shape.dim[3].dim_value
    if not kv_heads or num_heads % kv_heads:
        raise NotFused(f"cannot read the K/V head count from {past_keys[0]}")
    rotary = _rotary_tables(g, prod, cons)
    rotated = 0
    plan = []  # (node to replace, [packing nodes..., GQA], nodes to drop)
    for layer, pk in enumerate(past_keys):
        pv = pk[:-3] + "value"
        kc = _one(cons, pk, "Concat")
        vc = _one(cons, pv, "Concat")
        if list(kc.input) != [pk, kc.input[1]] or list(vc.input) != [pv, vc.input[1]]:
            raise NotFused(f"layer {layer}: present is not Concat(past, new)")
        qk = _qk_matmul(cons, kc, layer)
        after, scores = cons[qk.output[0]], qk.output[0]
        scale = 1.0
        if len(after) == 1 and after[0].op_type in ("Mul", "Div") and after[0].input[0] == scores:
            c = _constant(g, prod, after[0].input[1])
            if c is None or c.size != 1:
                raise NotFused(f"layer {layer}: attention scale is not a constant")
            scale = float(c.reshape(-1)[0]) if after[0].op_type == "Mul" else 1.0 / float(c.reshape(-1)[0])
            scores = after[0].output[0]
            after = cons[scores]
        bias = None
        if len(after) == 1 and after[0].op_type == "Add":
            bias = next(i for i in after[0].input if i != scores)
            after = cons[after[0].output[0]]
        if len(after) != 1 or after[0].op_type != "Softmax":
            raise NotFused(f"layer {layer}: no Softmax after QK^T")
        av = _one(cons, after[0].output[0], "MatMul")
        tr = _one(cons, av.output[0], "Transpose")
        out = _one(cons, tr.output[0], "Reshape")
        extra: list = []  # Transpose + Reshape to [B, S, N*D] where the projection's output is not at hand
        q_raw, k_raw = _unrotated(prod, qk.input[0]), _unrotated(prod, kc.input[1])
        # ORT's CPU kernel rotates head sizes that are multiples of 16 only
        rotate = rotary is not None and q_raw is not None and k_raw is not None and head_dim % 16 == 0
        q = _packed(extra, q_raw if rotate else qk.input[0], f"gqa{layer}_q", prod)
        k = _packed(extra, k_raw if rotate else kc.input[1], f"gqa{layer}_k", prod)
        v = _packed(extra, vc.input[1], f"gqa{layer}_v", prod)
        split = prod.get(q)
        if (rotate and split is not None and split.op_type == "Split" and list(split.output) == [q, k, v]
                and not extra):  # pack_qkv's projection: the op reads [B, S, (H + 2 Hkv) D] itself
            q, k, v = split.input[0], "", ""
        tables = ["gqa_cos", "gqa_sin", "gqa_position_ids"] if rotate else ["", "", ""]
        inputs = [q, k, v, pk, pv, "gqa_seqlens_k", "gqa_total", *tables, bias or ""]
        while not inputs[-1]:
            inputs.pop()
        gqa = helper.make_node("GroupQueryAttention", inputs, [out.output[0], kc.output[0], vc.output[0]],
                               name=f"gqa_{layer}", domain=OPSET_MS, num_heads=num_heads, kv_num_heads=kv_heads,
                               scale=scale, do_rotary=int(rotate), rotary_interleaved=0)
        rotated = rotated + int(rotate)
        plan.append((out, [*extra, gqa], (kc, vc)))
    # seqlens_k = total - 1 for every row (left padding is masked by attention_bias), total = past + seq
    consts = {"gqa_i0": [0], "gqa_i1": [1], "gqa_i2": [2], "gqa_i3": [3], "gqa_bsd": [0, 0, -1]}
    for name, value in consts.items():
        g.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
    g.initializer.append(numpy_helper.from_array(np.asarray(1, np.int32), "gqa_one"))
    if rotated:
        angles = np.arange(max_positions, dtype=np.float64)[:, None] * rotary[1][None, :]
        g.initializer.extend([numpy_helper.from_array(np.cos(angles).astype(np.float32), "gqa_cos"),
                              numpy_helper.from_array(np.sin(angles).astype(np.float32), "gqa_sin")])
    sizes = [
        helper.make_node("Identity", ["gqa_bsd"], ["gqa_bsd_shape"]),
        helper.make_node("Shape", ["input_ids"], ["gqa_ids_shape"]),
        helper.make_node("Slice", ["gqa_ids_shape", "gqa_i0", "gqa_i1"], ["gqa_batch"]),
        helper.make_node("Slice", ["gqa_ids_shape", "gqa_i1", "gqa_i2"], ["gqa_seq"]),
    ]
    shared = any(i.name == MASK for i in g.input)
    if shared:  # total = the mask's length: the cache may be a longer buffer the op writes in place (see below)
        sizes += [helper.make_node("Shape", [MASK], ["gqa_mask_shape"]),
                  helper.make_node("Slice", ["gqa_mask_shape", "gqa_i1", "gqa_i2"], ["gqa_total64"])]
    else:
        sizes += [helper.make_node("Shape", [past_keys[0]], ["gqa_past_shape"]),
                  helper.make_node("Slice", ["gqa_past_shape", "gqa_i2", "gqa_i3"], ["gqa_past"]),
                  helper.make_node("Add", ["gqa_past", "gqa_seq"], ["gqa_total64"])]
    sizes += [
        helper.make_node("Cast", ["gqa_total64"], ["gqa_total1"], to=TensorProto.INT32),
        helper.make_node("Squeeze", ["gqa_total1"], ["gqa_total"]),
        helper.make_node("Sub", ["gqa_total1", "gqa_one"], ["gqa_last"]),
        helper.make_node("Expand", ["gqa_last", "gqa_batch"], ["gqa_seqlens_k"]),
    ]
    if rotated:  # the graph's positions, one row per batch row ([1, S] ones are broadcast)
        sizes += [helper.make_node("Concat", ["gqa_batch", "gqa_seq"], ["gqa_bs"], axis=0),
                  helper.make_node("Expand", [rotary[0], "gqa_bs"], ["gqa_position_ids"])]
    for i, n in enumerate(sizes):
        n.name = f"gqa_size_{i}"
    replace = {id(out): new for out, new, _ in plan}
    drop = {id(x) for _, _, pair in plan for x in pair}
    nodes = []
    for node in g.node:
        if id(node) in replace:
            nodes += sizes  # before the first layer's op (the graph's positions are computed by then)
            sizes = []
            nodes += replace[id(node)]  # at the attention output's place: q, k, v are computed by then
        elif id(node) not in drop:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    _prune(g)
    if shared:
        past_length_from_mask(g)
        _merge_size_duplicates(g)
    read = {i for n in g.node for i in n.input}
    unused = [t for t in g.initializer if t.name.startswith(("gqa_", "pl_")) and t.name not in read]
    for t in unused:
        g.initializer.remove(t)
    if not any(o.domain == OPSET_MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(OPSET_MS, 1))
    return {"layers": len(plan), "rotary_in_op": rotated, "shared_cache": shared}


def _merge_size_duplicates(graph) -> None:
    """Size arithmetic computed twice (Shape(input_ids) by the graph and by the fusion, ...) -> once."""
    outputs = {o.name for o in graph.output}
    seen, rename, keep = {}, {}, []
    for n in graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        if n.op_type in ("Shape", "Slice", "Sub", "Add", "Concat", "Squeeze", "Unsqueeze", "Cast") \
                and not outputs.intersection(n.output):
            key = (n.op_type, n.domain, tuple(n.input), tuple(a.SerializeToString() for a in n.attribute))
            if key in seen:
                rename.update(zip(n.output, seen[key].output))
                continue
            seen[key] = n
        keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)


def _prune(graph) -> None:
    """Drop nodes none of whose outputs is read (the unfused attention's leftovers), to a fixed point."""
    outputs = {o.name for o in graph.output}
    while True:
        read = outputs | {i for n in graph.node for i in n.input}
        keep = [n for n in graph.node if any(o in read for o in n.output)]
        if len(keep) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(keep)


def fuse_norms(model):
    """RMSNorm (+ residual Add) -> SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization: ONNX Runtime's two
    fusion passes run directly, not through optimize_model, whose other passes (and their symbolic shape
    inferences) match nothing here: the same graph, node for node and in the same order, in 1.3 s instead of 3.8
    (SmolLM2-135M's 30 layers)."""
    from onnxruntime.transformers.fusion_simplified_layernorm import (
        FusionSimplifiedLayerNormalization,
        FusionSkipSimplifiedLayerNormalization,
    )
    from onnxruntime.transformers.onnx_model import OnnxModel

    from edgekit.quiet import captured

    with captured(None, "norm fusion"):  # the passes log each fusion at WARNING level
        om = OnnxModel(model)
        FusionSimplifiedLayerNormalization(om).apply()
        FusionSkipSimplifiedLayerNormalization(om).apply()  # checks the Add's shapes (symbolic shape inference)
        om.prune_graph()
        om.topological_sort()
    return om.model


def fuse(model, num_heads: int, max_positions: int = 8192, base_dir: Path | None = None) -> tuple[object, dict]:
    """(model with fused ops, report). The report says what was fused, or why nothing was. base_dir: `model` was
    loaded without its external data, which lives there: the norm fusion (onnxruntime.transformers' optimizer,
    whose shape inference copies the model several times) runs on the graph alone, the weights are loaded after
    it (SmolLM2-135M: 31 s -> 18 s of fusion on a loaded 2-core machine)."""
    import contextlib

    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    def copy(m):
        c = onnx.ModelProto()
        c.CopyFrom(m)
        return c

    before = _count(model.graph)
    try:
        fuse_attention(copy(model), num_heads, max_positions)  # the pattern check: cheap, leaves `model` as it is
    except NotFused as e:
        return model, {"fused": False, "why": str(e), "nodes": before}
    norms = "fused"
    try:
        with contextlib.chdir(base_dir) if base_dir is not None else contextlib.nullcontext():
            general = fuse_norms(model)  # shape inference checks the external data files: relative to the cwd
    except ImportError as e:
        raise EdgekitError(f"fusing ONNX Runtime ops needs onnxruntime.transformers ({e})",
                           "pip install 'onnxruntime>=1.20' (it ships onnxruntime.transformers)") from None
    except RuntimeError as e:  # the optimizer's own failure on a graph it cannot sort: keep the norms as they are
        general, norms = model, f"not fused: {str(e).splitlines()[0][:200]}"
    if base_dir is not None:
        load_external_data_for_model(general, str(base_dir))
    packed = pack_qkv(general)  # both branches read the one packed q/k/v weight
    fused = copy(general)
    layers = fuse_attention(fused, num_heads, max_positions)
    out = wrap_fallback(fused, general)
    if layers["shared_cache"]:
        out.metadata_props.add(key=SHARED_CACHE, value=MASK)
    ops: dict[str, int] = {}
    for n in fused.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return out, {"fused": True, "GroupQueryAttention": layers["layers"], "rotary_in_op": layers["rotary_in_op"],
                 "qkv_packed": packed, "shared_cache": layers["shared_cache"],
                 "norms": norms, "SkipSimplifiedLayerNormalization": ops.get("SkipSimplifiedLayerNormalization", 0),
                 "SimplifiedLayerNormalization": ops.get("SimplifiedLayerNormalization", 0),
                 "nodes": before, "nodes_fused_branch": len(fused.graph.node),
                 "fallback": "a left-padded prefill or a batch of several new tokens on a past runs the unfused "
                             "branch (ONNX Runtime's CPU GroupQueryAttention cannot)"}


def _count(graph) -> int:
    return len(graph.node)


def fuse_file(path, num_heads: int, max_positions: int) -> dict:
    """Fuse the decoder graph at `path` (+ its external data) in place; -> the report (see `fuse`)."""
    import onnx

    from exporters.onnx import save_external

    path = Path(path)
    model, report = fuse(onnx.load(str(path), load_external_data=False), num_heads, max_positions, path.parent)
    if report["fused"]:
        # onnx appends to an existing external-data file: start a new one, or the file holds the weights twice
        path.with_name(path.name + ".data").unlink(missing_ok=True)
        save_external(model, path)
    return report
