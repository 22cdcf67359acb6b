"""int8 for exported decoder graphs that is lossless on real pretrained weights (issue 14).

Weights int8 per block of `block` values along K (symmetric, one fp32 scale per block), activations
quantized to int8 per block at run time by the kernel (accuracy_level 4: int8 x int8 dot products) —
still "dynamic int8", but with per-block scales that survive real activations' outlier channels, where
ONNX Runtime's per-tensor `quantize_dynamic` (MatMulInteger) doubled SmolLM2-135M's perplexity.

One pass over the main graph and every If branch, each weight quantized once (a shared R1 block's weight
used in several branches is one int8 tensor; ORT's own MatMulNBitsQuantizer quantizes it once per use):

    MatMul(A, W)               W a 2-D float initializer [K, N]  -> com.microsoft MatMulNBits(bits=8)
    MatMul(A, Transpose(W))    nn.Linear weights and the tied lm_head (dynamo writes Transpose(embed))
                               -> MatMulNBits on W's rows: [out, in] is MatMulNBits' B layout, no transpose
    Gather(E, ids)             embeddings -> com.microsoft GatherBlockQuantized(bits=8); a tied head and
                               the embedding read ONE uint8 tensor (a Reshape of the head's blob)

Packing is ONNX Runtime's own C++ routine (`quantize_matmul_8bits`, what MatMulNBitsQuantizer calls).
MoE routers stay fp32 (`exclude`). 3-D weights (DeepSeek-V3's dense expert stacks [E, K, N], read by a
batched MatMul) have no MatMulNBits form: they go through `quantize_dynamic` restricted to those nodes
(per-tensor int8) — the one remaining use of that path. Nothing float over 64 KiB may survive (checked).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from exporters.onnx_graph import iter_graphs, large_float_weights, router_nodes, router_weights

_FLOAT = (1, 10, 16)  # TensorProto FLOAT, FLOAT16, BFLOAT16
_BYTES = {1: 4, 10: 2, 16: 2, 11: 8}
BLOCKS = (128, 64, 32)  # candidates for block="auto", largest first
METHOD = "int8 weights per block (MatMulNBits / GatherBlockQuantized, accuracy_level 4: int8 activations per block)"


def _subgraphs(node):
    for a in node.attribute:
        if a.type == 5:  # GRAPH
            yield a.g
        yield from a.graphs


def block_quantize_rows(w_nk: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of w_nk [N, K] -> (uint8 [N, K/block, block], fp32 scales [N, K/block]): symmetric int8 with an
    implicit zero point 128, packed exactly as ONNX Runtime's MatMulNBits quantizer packs B."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    n, k = w_nk.shape
    kb = (k + block - 1) // block
    w_kn = np.ascontiguousarray(w_nk.T, dtype=np.float32)  # one copy at most (none for a [K, N] weight's .T)
    if kb * block != k:
        w_kn = np.pad(w_kn, ((0, kb * block - k), (0, 0)))
    packed = np.zeros((n, kb, block), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zero_points = np.zeros((n, (kb + 1) // 2), np.uint8)
    quantize_matmul_8bits(packed, w_kn, scales, zero_points, block, n, k, True)
    return packed, scales


def dequantize_rows(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The float weight [N, K] the int8 tensor stands for (tests, streaming checks)."""
    w = (packed.astype(np.float32) - 128.0) * scales[..., None]
    return w.reshape(packed.shape[0], -1)[:, :k]


MIN_BYTES = 512  # weights smaller than this stay float (norm scales, position tables: not worth a block)
# a one-column MatMul weight [K, 1] (R1's skip gate: one score per token) stays float too, as the 1-D vector it was
MIN_GATHER_BLOCK = 16  # a Gather table whose rows are no whole number of these stays float


def _reduction_dims(model, exclude: set[str], min_bytes: int) -> dict[str, int]:
    """weight name -> K (the dimension a block runs along) for the float initializers the pass quantizes:
    MatMul(A, W[K, N]), MatMul(A, Transpose(W[N, K])) and Gather(E[V, K])."""
    inits = {t.name: t for _, g in iter_graphs(model.graph) for t in g.initializer
             if len(t.dims) == 2 and 1 not in t.dims and t.data_type in _FLOAT and t.name not in exclude
             and int(np.prod(t.dims)) * _BYTES[t.data_type] > min_bytes}
    transposed = {n.output[0]: n.input[0] for _, g in iter_graphs(model.graph) for n in g.node
                  if n.op_type == "Transpose" and n.input[0] in inits}
    ks = {}
    for _, g in iter_graphs(model.graph):
        for n in g.node:
            if n.op_type == "MatMul" and n.input[1] in inits:
                ks[n.input[1]] = int(inits[n.input[1]].dims[0])
            elif n.op_type == "MatMul" and n.input[1] in transposed:
                ks[transposed[n.input[1]]] = int(inits[transposed[n.input[1]]].dims[1])
            elif n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].dims[1] % MIN_GATHER_BLOCK == 0:
                ks[n.input[0]] = int(inits[n.input[0]].dims[1])  # else a lookup table left float (R1's bias)
    return ks


def choose_block(model, exclude: set[str] = frozenset(), min_bytes: int = MIN_BYTES) -> int:
    """The largest block in BLOCKS that divides every quantized weight's K without padding (smaller files:
    the scales cost 1/8 of the int8 bytes at block 32, 1/32 at 128); 32 when none does."""
    ks = set(_reduction_dims(model, set(exclude), min_bytes).values())
    return next((b for b in BLOCKS if all(k % b == 0 for k in ks)), BLOCKS[-1])


def quantize_int8(src: Path, dst: Path, block: int | str = "auto", accuracy_level: int = 4,
                  min_bytes: int = MIN_BYTES) -> dict:
    """Write dst (+ dst.data). Returns what was done: block size, counts per op, weights quantized once,
    the tied head, routers kept fp32, 3-D weights given per-tensor int8. Raises if a float weight over
    64 KiB survives anywhere."""
    import onnx
    from onnx import helper, numpy_helper

    routers = router_weights(src)
    model = onnx.load(str(src), load_external_data=False)  # each weight read when quantized, then dropped
    base = str(Path(src).parent)

    def weight(t) -> np.ndarray:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            return numpy_helper.to_array(t).astype(np.float32, copy=False)
        bare = onnx.TensorProto()
        bare.CopyFrom(t)  # to_array would load the data into the graph's own tensor and keep it there
        return numpy_helper.to_array(bare, base).astype(np.float32, copy=False)
    if block == "auto":
        block = choose_block(model, routers, min_bytes)
    block = int(block)
    cache: dict[str, tuple] = {}  # weight key -> (q name, scales name, N, K, block)
    counts = {"block": block, "accuracy_level": accuracy_level, "MatMulNBits_main": 0, "MatMulNBits_branches": 0,
              "GatherBlockQuantized": 0, "weights_quantized": 0, "routers_fp32": sorted(routers)}

    def quantized(key: str, rows: np.ndarray, home, bs: int) -> tuple:
        if key not in cache:
            packed, scales = block_quantize_rows(rows, bs)
            base = key.replace("#T", "_T")
            qn, sn = f"{base}_Q8B{bs}", f"{base}_scales"
            home.initializer.extend([numpy_helper.from_array(packed, qn), numpy_helper.from_array(scales, sn)])
            cache[key] = (qn, sn, rows.shape[0], rows.shape[1], bs)
            counts["weights_quantized"] += 1
        return cache[key]

    def walk(graph, stack):
        stack = stack + [graph]
        inits = {t.name: (t, g) for g in stack for t in g.initializer}  # inner scopes shadow outer ones
        producers = {o: n for g in stack for n in g.node for o in n.output}
        new_nodes = []
        for node in graph.node:
            for sub in _subgraphs(node):
                walk(sub, stack)
            out = [node]
            if node.op_type == "MatMul":
                w_name, direct = None, False
                b = node.input[1]
                if b in inits:
                    w_name = b  # [K, N]: the rows MatMulNBits wants are W.T
                elif b in producers and producers[b].op_type == "Transpose":
                    tr = producers[b]
                    perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), [1, 0])
                    if perm == [1, 0] and tr.input[0] in inits:
                        w_name, direct = tr.input[0], True
                if w_name is not None and w_name not in routers:
                    t, home = inits[w_name]
                    nbytes = int(np.prod(t.dims)) * _BYTES.get(t.data_type, 0)
                    if len(t.dims) == 2 and 1 not in t.dims and t.data_type in _FLOAT and nbytes > min_bytes:
                        key = w_name if direct else w_name + "#T"
                        if key not in cache:
                            arr = weight(t)
                            quantized(key, arr if direct else arr.T, home, block)
                        qn, sn, n, k, bs = cache[key]
                        out = [helper.make_node("MatMulNBits", [node.input[0], qn, sn], [node.output[0]],
                                                name=(node.name or w_name) + "_Q8", domain="com.microsoft",
                                                K=k, N=n, bits=8, block_size=bs, accuracy_level=accuracy_level)]
                        counts["MatMulNBits_main" if len(stack) == 1 else "MatMulNBits_branches"] += 1
            elif node.op_type == "Gather" and node.input[0] in inits:
                t, home = inits[node.input[0]]
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                bs = block
                while len(t.dims) == 2 and t.dims[1] % bs and bs > MIN_GATHER_BLOCK:  # whole blocks only
                    bs //= 2
                if (len(t.dims) == 2 and axis == 0 and t.dims[1] % bs == 0 and t.data_type in _FLOAT
                        and int(np.prod(t.dims)) * _BYTES[t.data_type] > min_bytes and t.name not in routers
                        and (t.name not in cache or cache[t.name][4] == bs)):
                    qn, sn, n, k, bs = quantized(t.name, weight(t), home, bs)
                    flat = f"{qn}_rows"  # the [N, K/bs, bs] blob seen as [N, K]: shared with a tied head
                    if flat not in producers:  # in this graph (a branch gets its own: the outer graph's
                        # node list may be the one being walked right now)
                        shape_name = f"{qn}_rows_shape"
                        if shape_name not in inits:
                            shape = numpy_helper.from_array(np.array([n, k], np.int64), shape_name)
                            home.initializer.append(shape)
                            inits[shape_name] = (shape, home)
                        reshape = helper.make_node("Reshape", [qn, shape_name], [flat],
                                                   name=f"{qn}_as_rows{'' if len(stack) == 1 else '_' + graph.name}")
                        new_nodes.append(reshape)
                        producers[flat] = reshape
                    out = [helper.make_node("GatherBlockQuantized", [flat, node.input[1], sn], [node.output[0]],
                                            name=(node.name or t.name) + "_Q8", domain="com.microsoft",
                                            bits=8, block_size=bs, gather_axis=0, quantize_axis=1)]
                    counts["GatherBlockQuantized"] += 1
            new_nodes.extend(out)
        del graph.node[:]
        graph.node.extend(new_nodes)

    walk(model.graph, [])
    gathered = {n.input[0].removesuffix("_rows") for _, g in iter_graphs(model.graph) for n in g.node
                if n.op_type == "GatherBlockQuantized"}
    counts["tied_head"] = any(n.op_type == "MatMulNBits" and n.input[1] in gathered
                              for _, g in iter_graphs(model.graph) for n in g.node)
    _prune(model)
    from onnx.external_data_helper import load_external_data_for_model

    load_external_data_for_model(model, base)  # what stays float (norms, routers, 3-D stacks): small or kept
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    dst = Path(dst)
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    left = [w for w in large_float_weights(dst) if w[1] not in routers]
    if any(len(_dims(dst, name)) == 3 for _, name, _ in left):  # expert stacks: per-tensor int8 for those
        counts["per_tensor_3d"] = _per_tensor_3d(dst, {name for _, name, _ in left}, routers)
        left = [w for w in large_float_weights(dst) if w[1].removesuffix("_Transposed") not in routers]
    if left:
        where, name, nbytes = left[0]
        raise EdgekitError(f"int8 quantization left {len(left)} float weight(s) over 64 KiB, e.g. {name} "
                           f"({nbytes} bytes) in {where}", "this is an edgekit bug: report it with the model config")
    return counts


def _dims(path: Path, name: str) -> list[int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((list(t.dims) for _, g in iter_graphs(model.graph) for t in g.initializer if t.name == name), [])


def _per_tensor_3d(path: Path, names: set[str], routers: set[str]) -> int:
    """quantize_dynamic (signed int8, per tensor) of the MatMuls that read the 3-D weights `names`."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(path), load_external_data=False)
    nodes = [n.name for _, g in iter_graphs(model.graph) for n in g.node
             if n.op_type == "MatMul" and names.intersection(n.input)]
    tmp = path.with_name(path.stem + ".3d.onnx")
    quantize_dynamic(str(path), str(tmp), weight_type=QuantType.QInt8, use_external_data_format=True,
                     extra_options={"EnableSubgraph": True}, nodes_to_quantize=nodes,
                     nodes_to_exclude=router_nodes(path, routers))
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink()
    converted = onnx.load(str(tmp))
    onnx.save_model(converted, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    for f in path.parent.glob(tmp.name + "*"):
        f.unlink()
    for f in path.parent.glob(tmp.stem + "*"):
        f.unlink()
    return len(nodes)


def _prune(model) -> None:
    """Drop nodes nobody reads (the Transposes of quantized weights) and unused initializers, in every
    graph, until nothing changes."""
    while True:
        used = set()
        for _, g in iter_graphs(model.graph):
            used.update(i for n in g.node for i in n.input if i)
            used.update(o.name for o in g.output)
        changed = False
        for _, g in iter_graphs(model.graph):
            keep = [n for n in g.node if any(o in used for o in n.output) or not n.output]
            if len(keep) != len(g.node):
                del g.node[:]
                g.node.extend(keep)
                changed = True
            inits = [t for t in g.initializer if t.name in used]
            if len(inits) != len(g.initializer):
                del g.initializer[:]
                g.initializer.extend(inits)
                changed = True
        if not changed:
            return
