"""The fused-or-general `If` of a fused Hugging Face graph (exporters/onnx_fuse.py builds the two branches).

ONNX Runtime's CPU GroupQueryAttention refuses batch > 1 with several new tokens on a non-empty past and ignores
position_ids on an empty past, so a fused graph is one `If` at the top: `wrap_fallback` builds it (its condition
says which shapes take the fused branch), `takes_fused` is the same condition in Python, and `fused_branch` is the
fused branch as a model of its own, which runtimes/onnxruntime.py runs for the calls `takes_fused` admits (the If
costs ~8 % of a decode step). `past_length_from_mask` lets that branch take the past's length from the mask, so the
KV cache can be one longer buffer written in place (model metadata SHARED_CACHE; `shared_cache` reads it).
"""

from __future__ import annotations

import numpy as np

from edgekit.spec import MASK


def past_length_from_mask(graph) -> None:
    """Every Shape(past.*) read left in the fused graph (the graph's own causal mask and positions) -> the same
    shape with the length len(attention_mask) - len(input_ids). Exact where the cache holds just the past (the mask
    spans past + new: Runner.infer checks it), and it lets the cache be a fixed buffer longer than the past, which
    GroupQueryAttention reads and writes in place when past and present are one tensor (ONNX Runtime GenAI's
    past_present_share_buffer; runtimes/onnxruntime.py binds it so): no copy of the whole cache per token."""
    from onnx import helper, numpy_helper

    past = {i.name for i in graph.input if i.name.startswith("past.")}
    reads = [n for n in graph.node if n.op_type == "Shape" and n.input[0] in past]
    if not reads:
        return
    for k in range(5):
        graph.initializer.append(numpy_helper.from_array(np.asarray([k], np.int64), f"pl_i{k}"))
    head = [helper.make_node("Shape", [MASK], ["pl_mask_shape"]),
            helper.make_node("Shape", ["input_ids"], ["pl_ids_shape"]),
            helper.make_node("Slice", ["pl_mask_shape", "pl_i1", "pl_i2"], ["pl_total"]),
            helper.make_node("Slice", ["pl_ids_shape", "pl_i1", "pl_i2"], ["pl_seq"]),
            helper.make_node("Sub", ["pl_total", "pl_seq"], ["pl_past"])]
    dims = {i.name: tuple(str(d) for d in i.type.tensor_type.shape.dim) for i in graph.input if i.name in past}
    logical: dict[tuple, str] = {}  # a past input's declared shape -> that shape with the logical length
    swap = {}
    rename = {}
    for n in reads:
        name = n.input[0]
        attrs = {a.name: a.i for a in n.attribute}
        start, end = attrs.get("start", 0), attrs.get("end", 4)
        start, end = start % 4 if start < 0 else min(start, 4), end % 4 if end < 0 else min(end, 4)
        if (start, end) == (2, 3):  # the length alone (what dynamo's graphs read)
            rename[n.output[0]] = "pl_past"
            swap[id(n)] = None
            continue
        if dims[name] not in logical:  # one per kind of cache tensor (one for all of them in a llama)
            i = len(logical)
            logical[dims[name]] = f"pl_shape{i}"
            head += [helper.make_node("Shape", [name], [f"pl_buffer{i}"]),
                     helper.make_node("Slice", [f"pl_buffer{i}", "pl_i0", "pl_i2"], [f"pl_bh{i}"]),
                     helper.make_node("Slice", [f"pl_buffer{i}", "pl_i3", "pl_i4"], [f"pl_d{i}"]),
                     helper.make_node("Concat", [f"pl_bh{i}", "pl_past", f"pl_d{i}"], [f"pl_shape{i}"], axis=0)]
        swap[id(n)] = helper.make_node("Slice", [logical[dims[name]], f"pl_i{start}", f"pl_i{end}"], list(n.output),
                                       name=(n.name or "shape") + "_logical")
    for i, h in enumerate(head):
        h.name = f"past_length_{i}"
    nodes = head + [swap.get(id(n), n) for n in graph.node if swap.get(id(n), n) is not None]
    for n in nodes:
        n.input[:] = [rename.get(i, i) for i in n.input]
    del graph.node[:]
    graph.node.extend(nodes)


def _suffix_graph(graph, suffix: str, keep: set[str]):
    """Rename every value a graph's nodes produce (not the outer graph's inputs / initializers in `keep`) and its
    node names with `suffix`, so the graph can become an If branch next to another copy of itself."""
    produced = {o for n in graph.node for o in n.output if o}
    rename = {o: o + suffix for o in produced if o not in keep}
    for n in graph.node:
        n.input[:] = [rename.get(i, i) for i in n.input]
        n.output[:] = [rename.get(o, o) for o in n.output]
        n.name = (n.name or n.op_type) + suffix
    for o in graph.output:
        o.name = rename.get(o.name, o.name)


def wrap_fallback(fused, general):
    """One model: If(the shapes GroupQueryAttention computes right) then `fused`'s nodes else `general`'s, sharing
    the initializers (the union: the fused graph adds a few size constants and the rotary tables).

    Measured on ONNX Runtime 1.32's CPU kernel: it refuses batch > 1 with seq > 1 on a past, and on an empty past
    it ignores position_ids (rotates by 0..seq-1 whatever the graph's positions). So the fused branch runs for
    (batch == 1 or seq == 1) on a past (every decode step, a batch-1 continuation; per-row positions of left-padded
    rows are honoured there), and for batch == 1 or seq == 1 or an empty past when nothing is padded (positions
    are then past + 0..seq-1); anything else (a left-padded prefill, a batched continuation) runs the unfused one."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(general)
    g = out.graph
    names = {t.name for t in g.initializer}
    g.initializer.extend(t for t in fused.graph.initializer if t.name not in names)
    keep = {i.name for i in g.input} | {t.name for t in g.initializer}
    branches = []
    for src, suffix in ((fused.graph, "__fused"), (general.graph, "__general")):
        b = onnx.GraphProto()
        b.node.extend(src.node)
        b.output.extend(src.output)
        _suffix_graph(b, suffix, keep)
        b.name = "decoder" + suffix
        branches.append(b)
    past0 = next(i.name for i in g.input if i.name.startswith("past."))
    for name, value in {"fb_i0": [0], "fb_i1": [1], "fb_i2": [2], "fb_i3": [3], "fb_one": [1], "fb_zero": [0]}.items():
        if name not in names:
            g.initializer.append(numpy_helper.from_array(np.asarray(value, np.int64), name))
    cond = [
        helper.make_node("Shape", ["input_ids"], ["fb_ids_shape"]),
        helper.make_node("Slice", ["fb_ids_shape", "fb_i0", "fb_i1"], ["fb_batch"]),
        helper.make_node("Slice", ["fb_ids_shape", "fb_i1", "fb_i2"], ["fb_seq"]),
        helper.make_node("Shape", [past0], ["fb_past_shape"]),
        helper.make_node("Slice", ["fb_past_shape", "fb_i2", "fb_i3"], ["fb_past"]),
        helper.make_node("Equal", ["fb_batch", "fb_one"], ["fb_b1"]),
        helper.make_node("Equal", ["fb_seq", "fb_one"], ["fb_s1"]),
        helper.make_node("Equal", ["fb_past", "fb_zero"], ["fb_p0"]),
        helper.make_node("Not", ["fb_p0"], ["fb_has_past"]),
        helper.make_node("Or", ["fb_b1", "fb_s1"], ["fb_b1_or_s1"]),
        helper.make_node("And", ["fb_b1_or_s1", "fb_has_past"], ["fb_on_past"]),  # rows at their own positions
        helper.make_node("Or", ["fb_b1_or_s1", "fb_p0"], ["fb_plain_shape"]),
    ]
    if any(i.name == "attention_mask" for i in g.input):  # no padding anywhere: positions are past + 0..seq-1
        cond += [helper.make_node("ReduceMin", ["attention_mask"], ["fb_mask_min"], keepdims=0),
                 helper.make_node("Equal", ["fb_mask_min", "fb_one_scalar"], ["fb_unpadded"]),
                 helper.make_node("And", ["fb_plain_shape", "fb_unpadded"], ["fb_plain"])]
        g.initializer.append(numpy_helper.from_array(np.asarray(1, np.int64), "fb_one_scalar"))
    else:
        cond.append(helper.make_node("Identity", ["fb_plain_shape"], ["fb_plain"]))
    cond += [helper.make_node("Squeeze", ["fb_plain", "fb_i0"], ["fb_plain0"]),
             helper.make_node("Squeeze", ["fb_on_past", "fb_i0"], ["fb_on_past0"]),
             helper.make_node("Or", ["fb_on_past0", "fb_plain0"], ["fb_cond"])]
    for i, n in enumerate(cond):
        n.name = f"fallback_cond_{i}"
    node = helper.make_node("If", ["fb_cond"], [o.name for o in g.output], name="fused_or_general",
                            then_branch=branches[0], else_branch=branches[1])
    del g.node[:]
    g.node.extend([*cond, node])
    del g.value_info[:]
    have = {(o.domain, o.version) for o in out.opset_import}
    out.opset_import.extend(o for o in fused.opset_import if (o.domain, o.version) not in have)
    return out


FALLBACK_NODE = "fused_or_general"  # wrap_fallback's If


def takes_fused(batch: int, seq: int, past: int, unpadded: bool) -> bool:
    """The If's condition (wrap_fallback), for a runner that picks the branch itself: (batch 1 or one new token) on a
    past, or (batch 1 or one new token or an empty past) with nothing padded."""
    plain_shape = batch == 1 or seq == 1
    return (plain_shape and past > 0) or ((plain_shape or past == 0) and unpadded)


SHARED_CACHE = "edgekit.past_length"  # model metadata: "attention_mask" where the fused branch reads it there


def shared_cache(model) -> bool:
    """Whether the fused branch takes the past's length from the mask (a cache buffer longer than the past is fine)."""
    return any(p.key == SHARED_CACHE and p.value == MASK for p in model.metadata_props)


def fused_branch(model):
    """The fused branch of a wrap_fallback model as a model of its own (the outer inputs and outputs, the
    initializers it reads; external data references kept as they are), or None for any other graph. ONNX Runtime
    runs it ~8 % faster than through the If (SmolLM2-135M int8 decode, 1-2 threads: bench/README.md), and it is
    what the fused branch computes, node for node: runtimes/onnxruntime.py runs the calls `takes_fused` admits on
    it and the rest on the whole model."""
    import onnx

    ifs = [n for n in model.graph.node if n.op_type == "If" and n.name == FALLBACK_NODE]
    if len(ifs) != 1:
        return None
    then = next(a.g for a in ifs[0].attribute if a.name == "then_branch")
    rename = {b.name: o for b, o in zip(then.output, ifs[0].output)}
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    g = out.graph
    g.name = "decoder_fused"
    for n in then.node:
        c = g.node.add()
        c.CopyFrom(n)
        c.input[:] = [rename.get(i, i) for i in c.input]
        c.output[:] = [rename.get(o, o) for o in c.output]
    read = {i for n in g.node for i in n.input}
    g.input.extend(model.graph.input)
    g.output.extend(model.graph.output)
    g.initializer.extend(t for t in model.graph.initializer if t.name in read)
    return out
