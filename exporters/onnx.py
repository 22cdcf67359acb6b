"""ONNX exporter: one decoder graph with KV cache; R1's gates stay `If` nodes with the thresholds as
an input (torch.export + torch.onnx dynamo). int8 (exporters/onnx_int8.py) and validation against
PyTorch (edgekit/validate.py) are separate steps (STYLE.md)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from edgekit.models import CausalLM
from edgekit.spec import MASK, DecoderSpec
from exporters.onnx_graph import iter_graphs

OPSET = 18
MODEL_FILE = "model.onnx"


class FlatDecoder(nn.Module):
    """The model with flat tensor inputs/outputs in DecoderSpec order, for the exporter."""

    def __init__(self, model: CausalLM):
        super().__init__()
        self.model = model
        self.gated = DecoderSpec(model.cfg).gated

    def forward(self, input_ids, attention_mask, thresholds, *past_flat):
        past = list(zip(past_flat[0::2], past_flat[1::2]))
        logits, presents, executed = self.model(input_ids, past, thresholds if self.gated else None,
                                                attention_mask=attention_mask)
        flat = [t for kv in presents for t in kv]
        return (logits, *flat, executed) if self.gated else (logits, *flat)


def example_shapes(model: CausalLM) -> tuple[int, int, int]:
    """(batch, seq, past) for tracing: no 0/1 sizes (torch.export would specialise them) and, for R1,
    keys spanning several routing blocks so the block count stays symbolic."""
    cfg = model.cfg
    past = 2 * cfg.block_size + 3 if cfg.family == "r1" else 37
    if cfg.memory_len:
        past = min(past, cfg.memory_len - 8)
    return 2, 5, past


def export_graph(model: CausalLM, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write `path` (+ `path`.data external weights) for `model`, batch/seq/past dynamic."""
    from torch.export import Dim

    spec = DecoderSpec(model.cfg)
    cfg = model.cfg
    model = model.to(dtype).eval()
    b, s, p = example_shapes(model)
    feeds = spec.dummy(b, s, p, seed=0)
    args = [torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds[MASK])]
    args.append(torch.from_numpy(feeds["thresholds"]) if spec.gated else torch.zeros(cfg.n_layers))
    args += [torch.from_numpy(feeds[n]).to(dtype) for n in spec.past_names()]
    batch = Dim("batch", min=1, max=1024)
    seq = Dim("seq", min=1, max=cfg.max_seq_len)
    past = Dim("past", min=0, max=cfg.memory_len or cfg.max_seq_len)
    # the mask's length is past + seq: a sum of two dims, which torch.export cannot declare (derived dims have
    # one root), so it is left for export to infer (Dim.AUTO); the ONNX axis is renamed "total" below
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: Dim.AUTO}, "thresholds": None,
               "past_flat": tuple({0: batch, 2: past} for _ in spec.past_names())}
    with torch.no_grad():
        program = torch.export.export(FlatDecoder(model), tuple(args), dynamic_shapes=dynamic, strict=False)
        onnx_program = torch.onnx.export(program, tuple(args), input_names=["input_ids", MASK, "thresholds",
                                         *spec.past_names()], output_names=spec.output_names, opset_version=OPSET,
                                         dynamo=True, verbose=False)
    onnx_program.optimize()
    model_proto = onnx_program.model_proto
    if not spec.gated:  # V3 ignores the thresholds input; drop it from the graph's signature
        keep = [i for i in model_proto.graph.input if i.name != "thresholds"]
        del model_proto.graph.input[:]
        model_proto.graph.input.extend(keep)
    _rename_dynamic_axes(model_proto, spec)
    strip_debug_info(model_proto)
    hoist_branch_invariants(model_proto, axis_sums=axis_sums(cfg))
    save_external(model_proto, path)


def axis_sums(cfg) -> dict[str, tuple[str, ...]]:
    """The graph axes that are sums of others (DecoderSpec): without a memory window, the present cache and the
    attention mask span past + seq."""
    return {} if cfg.memory_len else {"present": ("past", "seq"), "total": ("past", "seq")}


def _has_subgraph(node) -> bool:
    return any(a.g.node or a.graphs for a in node.attribute)


def _rename_inputs(graph, rename: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        for a in node.attribute:
            for g in [a.g, *a.graphs]:
                _rename_inputs(g, rename)
    for o in graph.output:
        o.name = rename.get(o.name, o.name)


def _attribute_key(node) -> tuple[bytes, ...]:
    """A node's attributes as bytes, a tensor's name left out (Constants with equal values are equal), an attribute
    set to its default left out (Reshape's allowzero=0 is no Reshape attribute)."""
    out = []
    for a in sorted(node.attribute, key=lambda a: a.name):
        if a.SerializeToString() == _default_attribute(node.op_type, node.domain, a.name):
            continue
        if a.HasField("t") and a.t.name:
            a = type(a).FromString(a.SerializeToString())
            a.t.name = ""
        out.append(a.SerializeToString())
    return tuple(out)


@functools.cache
def _default_attribute(op: str, domain: str, name: str) -> bytes | None:
    import onnx

    try:
        attr = onnx.defs.get_schema(op, OPSET, domain).attributes.get(name)
    except onnx.defs.SchemaError:  # an op ONNX does not define (contrib domains)
        return None
    default = attr.default_value.SerializeToString() if attr is not None else b""
    return default or None  # b"": no default (a required attribute)


SIZE_OPS = ("Shape", "Size")


def hoist_branch_invariants(model_proto, side_inputs: tuple[str, ...] = (MASK, "thresholds"),
                            axis_sums: dict[str, tuple[str, ...]] | None = None) -> dict[str, int]:
    """Move the nodes of each If branch that read no activation into the main graph, in front of their If, then
    merge identical main-graph nodes. Activations are the values computed from the token ids and the KV cache
    (every graph input but `side_inputs`) by anything but Shape/Size; what is left is sizes, weights-only work and
    positions (from the attention mask): R1's block and query positions, routing counts, the aligned key slots —
    the same in every gated layer. The dynamo exporter repeats that work in every branch, where ONNX Runtime cannot
    share it; hoisted and merged, it runs once per call instead of once per executed layer (bench/README.md: ~30
    nodes of each r1-mini branch). Exact (the same nodes compute the same values); it also runs when every layer
    is skipped, once. Work that reads a layer's activations (its keys, its hidden state) stays in the branch.

    The merge also knows that an If whose else branch returns an outer value unchanged (torch.cond's skip,
    `h.clone()`) has that value's shape (cond's branches return equal shapes), so the size nodes each gated layer
    reads off its input merge too. Merging is value numbering (_Numbering): a Shape is keyed by the dims it returns
    (ONNX shape inference from the declared axes), a size scalar by its expression (`axis_sums`: present = past +
    seq, so the first gated branch's sizes merge with layer 0's), then the same inside each branch, which also reads
    what the main graph computed before its If; nodes nobody reads are dropped (bench/README.md: ~100 nodes of
    r1-mini's decode step). Returns the counts moved and merged (or dropped)."""
    g = model_proto.graph
    act = {i.name for i in g.input if i.name not in side_inputs}
    defined = {i.name for i in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}

    def reads_activation(node) -> bool:
        return node.op_type not in SIZE_OPS and any(i in act for i in node.input if i)

    main, hoisted = [], 0
    for node in g.node:
        if node.op_type == "If":
            for attr in node.attribute:
                branch = attr.g
                local = {t.name for t in branch.initializer} | {i.name for i in branch.input}
                outputs = {o.name for o in branch.output}
                keep = []
                for x in branch.node:
                    ins = [i for i in x.input if i]
                    if (not _has_subgraph(x) and not reads_activation(x) and not any(i in local for i in ins)
                            and not any(o in outputs or o in defined for o in x.output)):
                        main.append(x)
                        defined.update(x.output)
                        hoisted += 1
                    else:
                        keep.append(x)
                        local.update(x.output)
                del branch.node[:]
                branch.node.extend(keep)
        if reads_activation(node) or node.op_type == "If":
            act.update(node.output)
        main.append(node)
    dims = _inferred_dims(model_proto)  # value -> dims named by the graph's declared axes
    graph_outputs = {o.name for o in g.output}
    same_shape = _declared_same_shape(g)  # graph inputs/outputs -> the first one declared with the same shape
    for node in main:  # If output -> the outer value its skip branch returns (same shape)
        skip = next((a.g for a in node.attribute if a.name == "else_branch"), None) if node.op_type == "If" else None
        if skip is not None and len(node.output) == 1 and [n.op_type for n in skip.node] == ["Identity"]:
            src = skip.node[0].input[0]
            same_shape[node.output[0]] = same_shape.get(src, src)
    # merge the nodes that compute the same value (value numbering), main graph then each branch, outputs excepted
    numbering = _Numbering(dims, axis_sums or {}, _int_constants(g))
    rename, nodes = {}, []
    available = {i.name for i in g.input} | {t.name for t in g.initializer}
    for node in main:
        node.input[:] = [rename.get(i, i) for i in node.input]
        if node.op_type in SIZE_OPS and same_shape.get(node.input[0]) in available:
            node.input[0] = same_shape[node.input[0]]
        available.update(node.output)
        if _has_subgraph(node):
            for a in node.attribute:
                for sub in [a.g, *a.graphs]:
                    _rename_inputs(sub, rename)
                    if node.op_type == "If" and sub.node:  # what the main graph computed before this If counts too
                        _merge_branch(sub, numbering.child())
            nodes.append(node)
        elif numbering.add(node, rename, protect=graph_outputs):
            nodes.append(node)
    names = set()  # a hoisted node may carry a name the main graph already uses (each graph numbers its own)
    for node in nodes:
        if node.name in names:
            node.name = f"{node.name}_hoisted{len(names)}"
        names.add(node.name)
    nodes = _drop_unread(nodes, graph_outputs)
    merged = len(main) - len(nodes) + numbering.branch_removed
    del g.node[:]
    g.node.extend(nodes)
    return {"hoisted": hoisted, "merged": merged}


class _Numbering:
    """Which earlier node computes the same value as a node: the same op, inputs and attributes; a Shape by the dims
    it returns (_shape_slice: batch read off present.0.key or off h is one value); a size scalar (Squeeze of a
    one-dim Shape, Add of sizes) by its expression, where `axis_sums` names the axes that are sums of others
    (present = past + seq: the first gated layer's branch reads it off present.0.key, layer 0 adds past and seq);
    and Reshape(Reshape(x, a), b) reads x when b is a constant without 0 (no dim copied from the input)."""

    def __init__(self, dims: dict, axis_sums: dict, constants: dict, seen: dict | None = None, sizes=None):
        self.dims, self.axis_sums, self.constants = dims, axis_sums, constants
        self.seen = {} if seen is None else seen  # key -> first node
        self.sizes = {} if sizes is None else sizes  # value -> ("dims", dims) / ("size", expression)
        self.producer: dict = {}
        self.branch_removed = 0
        self.parent = None

    def child(self) -> _Numbering:
        """For an If branch: sees what the main graph computed so far; its own nodes stay its own."""
        c = _Numbering(self.dims, self.axis_sums, self.constants, dict(self.seen), self.sizes)
        c.parent = self
        return c

    def _atom(self, d):
        parts = self.axis_sums.get(d)
        return ("+", *sorted(parts)) if parts else d

    def key(self, node) -> tuple:
        op, ins = node.op_type, list(node.input)
        if op == "Reshape" and len(ins) > 1:
            inner, target = self.producer.get(ins[0]), self.constants.get(ins[1])
            if inner is not None and inner.op_type == "Reshape" and target is not None and 0 not in target:
                node.input[0] = inner.input[0]
        size = None
        if op == "Shape":
            sliced = _shape_slice(node, self.dims.get(ins[0]))
            size = ("dims", sliced) if sliced is not None else None
        elif op == "Squeeze" and len(ins) == 1 and self.sizes.get(ins[0], ("",))[0] == "dims" \
                and len(self.sizes[ins[0]][1]) == 1 and isinstance(self.sizes[ins[0]][1][0], str):
            size = ("size", self._atom(self.sizes[ins[0]][1][0]))
        elif op == "Add" and len(ins) == 2 and all(self.sizes.get(i, ("",))[0] == "size" for i in ins):
            terms = [t for i in ins for e in [self.sizes[i][1]] for t in (e[1:] if isinstance(e, tuple) else [e])]
            size = ("size", ("+", *sorted(terms)))
        if size is not None:
            self.sizes.update((o, size) for o in node.output)
            return size
        return (op, node.domain, tuple(node.input), _attribute_key(node))

    def add(self, node, rename: dict, protect: set) -> bool:
        """Keep `node` (True) or map its outputs onto the first node computing the same value (False)."""
        key = self.key(node)
        first = self.seen.get(key)
        if (first is not None and not node.op_type.startswith("Random") and not protect & set(node.output)
                and len(first.output) == len(node.output)):
            rename.update(zip(node.output, first.output))
            return False
        self.seen.setdefault(key, node)
        self.producer.update((o, node) for o in node.output)
        return True


def _merge_branch(branch, numbering: _Numbering) -> None:
    """Value numbering inside one If branch (the exporter's optimizer leaves branches alone), then drop what nobody
    reads. Exact: a merged node computes the same value as the node it maps onto."""
    outputs, rename, keep = {o.name for o in branch.output}, {}, []
    for node in branch.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        if _has_subgraph(node):
            for a in node.attribute:
                for sub in [a.g, *a.graphs]:
                    _rename_inputs(sub, rename)
            keep.append(node)
        elif numbering.add(node, rename, protect=outputs):
            keep.append(node)
    live = _drop_unread(keep, outputs)
    numbering.parent.branch_removed += len(branch.node) - len(live)
    del branch.node[:]
    branch.node.extend(live)


def _drop_unread(nodes: list, outputs: set) -> list:
    """`nodes` less those whose outputs nothing reads (graph outputs and nested subgraphs' reads count)."""
    used, live = set(outputs), []
    for node in reversed(nodes):
        if _has_subgraph(node) or any(o in used for o in node.output):
            live.append(node)
            used.update(node.input)
            used.update(i for a in node.attribute for sub in [a.g, *a.graphs] for _, s in iter_graphs(sub)
                        for n in s.node for i in n.input)
    return live[::-1]


def _inferred_dims(model_proto) -> dict[str, tuple]:
    """Value name -> its dims, as ONNX shape inference derives them (on a weightless copy) from the graph's declared
    inputs and outputs: ints and the declared axis names (batch, seq, past, present, total); any other dim None. The
    exporter's own symbols in branch outputs are dropped first: each branch is traced on its own, so s0 in one
    branch need not be s0 in another."""
    import onnx
    from onnx import helper

    g = model_proto.graph
    axes = {d.dim_param for vi in [*g.input, *g.output] for d in vi.type.tensor_type.shape.dim if d.dim_param}
    small = [t for t in g.initializer if not t.external_data and len(t.raw_data) + 8 * len(t.int64_data) <= 4096]
    kept = {t.name: t for t in small}
    weights = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer
               if t.name not in kept]  # shapes only; the small ones (Reshape targets, ...) keep their values
    copy = helper.make_graph([], g.name, [*g.input, *weights], list(g.output), initializer=small)
    copy.node.extend(g.node)
    for where, sub in iter_graphs(copy):
        if where != "main":  # a branch's inference sees outer values' types, not their data: copy the constants in
            read = sorted({i for n in sub.node for i in n.input if i in kept})
            nodes = list(sub.node)
            del sub.node[:]
            sub.node.extend(helper.make_node("Constant", [], [f"{i}__in_branch"], value=kept[i]) for i in read)
            for n in nodes:
                n.input[:] = [f"{i}__in_branch" if i in kept else i for i in n.input]
            sub.node.extend(nodes)
        for vi in [*sub.value_info, *(sub.output if where != "main" else [])]:
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param not in axes:
                    d.ClearField("dim_param")
    model = helper.make_model(copy, opset_imports=model_proto.opset_import, ir_version=model_proto.ir_version)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    dims = {}
    for _, sub in iter_graphs(inferred.graph):
        for vi in [*sub.value_info, *sub.input, *sub.output]:
            if vi.type.tensor_type.HasField("shape"):
                dims[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param if d.dim_param in axes
                                      else None for d in vi.type.tensor_type.shape.dim)
    return dims


def _shape_slice(node, dims: tuple | None) -> tuple | None:
    """What Shape `node` returns, from its input's dims (start/end attributes applied); None unless every dim is
    known."""
    if dims is None:
        return None
    rank, at = len(dims), {a.name: a.i for a in node.attribute}
    start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (at.get("start", 0), at.get("end", rank)))
    out = dims[start:end]
    return None if any(d is None for d in out) else out


def _int_constants(graph) -> dict[str, list[int]]:
    from onnx import TensorProto, numpy_helper

    return {t.name: numpy_helper.to_array(t).tolist() for t in graph.initializer
            if t.data_type == TensorProto.INT64 and len(t.dims) == 1}


def _declared_same_shape(graph) -> dict[str, str]:
    """Graph inputs and outputs whose declared shapes are fully named and equal (same dim values and dim_params:
    ONNX's named dimensions are equal wherever they appear) -> the first of them, inputs then outputs in order.
    R1's size nodes read each layer's present key / value; all of them are [batch, kv_heads, present, head_dim]."""
    first, same = {}, {}
    for vi in [*graph.input, *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        key = tuple(d.dim_param or d.dim_value for d in dims)
        if not dims or not all(key):
            continue
        same[vi.name] = first.setdefault((vi.type.tensor_type.elem_type, key), vi.name)
    return {k: v for k, v in same.items() if k != v}


def strip_debug_info(model_proto) -> None:
    """Drop per-node stack traces / doc strings and intermediate value_info: for r1-mini they are
    4 MB of the graph file (2 % of the int8 artifact) and no runtime reads them."""
    for _, g in iter_graphs(model_proto.graph):
        for node in g.node:
            del node.metadata_props[:]
            node.doc_string = ""
        del g.value_info[:]


def _rename_dynamic_axes(model_proto, spec: DecoderSpec) -> None:
    """Give the graph's symbolic dims the spec's names (batch, seq, past, present)."""
    axes = spec.dynamic_axes()
    for vi in [*model_proto.graph.input, *model_proto.graph.output]:
        for idx, name in axes.get(vi.name, {}).items():
            dim = vi.type.tensor_type.shape.dim[idx]
            if not dim.HasField("dim_value"):
                dim.dim_param = name


def save_external(model_proto, path: Path) -> None:
    import onnx

    path = Path(path)
    onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
