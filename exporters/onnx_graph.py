"""Walking exported ONNX graphs, If branches included (no torch): op counts, float weights left after
quantization, MoE router weights."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

LARGE_FLOAT_BYTES = 64 * 1024
# scales of the block-quantized ops (MatMulNBits / GatherBlockQuantized input 2) are not weights
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")


def graph_ops(path: Path) -> dict[str, int]:
    """op type -> count over the main graph and every subgraph (If branches)."""
    import onnx

    counts: dict[str, int] = {}
    for node in iter_nodes(onnx.load(str(path), load_external_data=False).graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def iter_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g.node:
                yield from iter_nodes(attr.g)
            for g in attr.graphs:
                yield from iter_nodes(g)


def iter_graphs(graph, where: str = "main"):
    yield where, graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node:
                yield from iter_graphs(attr.g, f"{where}/{node.name}.{attr.name}")
            for i, g in enumerate(attr.graphs):
                yield from iter_graphs(g, f"{where}/{node.name}.{attr.name}[{i}]")


def large_float_weights(path: Path, limit: int = LARGE_FLOAT_BYTES) -> list[tuple[str, str, int]]:
    """(graph path, tensor name, bytes) of every float initializer / Constant larger than `limit`,
    in the main graph and every If branch (block-quantization scales and GroupQueryAttention's cos/sin tables
    excepted)."""
    import onnx
    from onnx import TensorProto

    float_types = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8}
    model = onnx.load(str(path), load_external_data=False)
    scales = {n.input[2] for _, g in iter_graphs(model.graph) for n in g.node
              if n.op_type in QUANTIZED_OPS and len(n.input) > 2}
    scales |= {i for _, g in iter_graphs(model.graph) for n in g.node  # rotary cos/sin tables: not weights
               if n.op_type == "GroupQueryAttention" for i in n.input[7:9] if i}
    found = []
    for where, g in iter_graphs(model.graph):
        tensors = list(g.initializer)
        tensors += [a.t for n in g.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
        for t in tensors:
            if t.data_type in float_types and t.name not in scales:
                nbytes = int(np.prod(t.dims, dtype=np.int64)) * float_types[t.data_type]
                if nbytes > limit:
                    found.append((where, t.name, nbytes))
    return found


# MoE routers (DeepSeek-V3 / Qwen-MoE `mlp.gate`, Mixtral `block_sparse_moe.gate`, next to that block's `experts`):
# kept fp32, as the model itself computes its routing (transformers casts the router to fp32) and as int8 recipes
# for MoE do (llm-compressor's `ignore: re:.*mlp.gate$`). A router is ~0.02% of DeepSeek-V3's weights. An `mlp.gate`
# with no `experts` beside it is a SwiGLU gate projection (edgekit's V3/R1) and is quantized like any weight.
ROUTER_WEIGHT = re.compile(r"^(.*\.(?:mlp|block_sparse_moe))\.gate\.weight$")


def router_weights(path: Path) -> set[str]:
    """Initializer names of the MoE router weights in the graph (a `gate.weight` whose block has experts)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    names = {t.name for _, g in iter_graphs(model.graph) for t in g.initializer}
    return {n for n in names if (m := ROUTER_WEIGHT.match(n)) and any(x.startswith(f"{m[1]}.experts.") for x in names)}


def router_nodes(path: Path, weights: set[str]) -> list[str]:
    """The MatMul / Gemm nodes that apply those weights, in every graph, also by the name ONNX Runtime's
    quantizer gives them (it rewrites a Gemm as `<name>_MatMul` before quantizing)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [name for _, g in iter_graphs(model.graph) for n in g.node
            if n.op_type in ("MatMul", "Gemm") and weights.intersection(n.input)
            for name in (n.name, f"{n.name}_MatMul")]
