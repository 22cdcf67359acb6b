"""ONNX exporter: one decoder graph with KV cache; R1's gates stay `If` nodes with the thresholds as
an input (torch.export + torch.onnx dynamo). int8 (exporters/onnx_int8.py) and validation against
PyTorch (edgekit/validate.py) are separate steps (STYLE.md)."""

from __future__ import annotations

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
    hoist_branch_invariants(model_proto)
    save_external(model_proto, path)


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
    """A node's attributes as bytes, a tensor's name left out (Constants with equal values are equal)."""
    out = []
    for a in sorted(node.attribute, key=lambda a: a.name):
        if a.HasField("t") and a.t.name:
            a = type(a).FromString(a.SerializeToString())
            a.t.name = ""
        out.append(a.SerializeToString())
    return tuple(out)


SIZE_OPS = ("Shape", "Size")


def hoist_branch_invariants(model_proto, side_inputs: tuple[str, ...] = (MASK, "thresholds")) -> dict[str, int]:
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
    reads off its input merge too. Returns the counts moved and merged."""
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
    same_shape = _declared_same_shape(g)  # graph inputs/outputs -> the first one declared with the same shape
    for node in main:  # If output -> the outer value its skip branch returns (same shape)
        skip = next((a.g for a in node.attribute if a.name == "else_branch"), None) if node.op_type == "If" else None
        if skip is not None and len(node.output) == 1 and [n.op_type for n in skip.node] == ["Identity"]:
            src = skip.node[0].input[0]
            same_shape[node.output[0]] = same_shape.get(src, src)
    # merge identical nodes (same op, inputs and attributes) of the main graph, graph outputs excepted
    graph_outputs = {o.name for o in g.output}
    seen, rename, nodes = {}, {}, []
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
            nodes.append(node)
            continue
        key = (node.op_type, node.domain, tuple(node.input), _attribute_key(node))
        first = seen.get(key)
        if (first is not None and not node.op_type.startswith("Random") and not graph_outputs & set(node.output)
                and len(first.output) == len(node.output)):
            rename.update(zip(node.output, first.output))
            continue
        seen.setdefault(key, node)
        nodes.append(node)
    names = set()  # a hoisted node may carry a name the main graph already uses (each graph numbers its own)
    for node in nodes:
        if node.name in names:
            node.name = f"{node.name}_hoisted{len(names)}"
        names.add(node.name)
    del g.node[:]
    g.node.extend(nodes)
    return {"hoisted": hoisted, "merged": len(main) - len(nodes)}


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
