"""Stamping: the N-layer decoder graph from a traced few-layer template, so export time does not grow with
depth (issue 18). torch.export + the dynamo exporter cost seconds per layer and 5-20 s per gated (`If`) layer;
stamping copies ONNX nodes.

The template is a reduced-depth copy of the model (one layer of each kind that the target's layers need, see
`r1_template` / `plain_template`) exported through the normal path (exporters/onnx.export_graph) with two
differences: parameters are kept out of constant folding (a folded parameter, e.g. R1's padded position
table, would be a nameless per-layer constant that only that template layer has; folding also merges equal
initializers such as all-ones norm weights), and branch hoisting / debug stripping run after stamping.

The template's main-graph nodes are split by data flow, generically (no op patterns):
  prefix  nodes that read no per-layer value (embedding, positions, masks, shape arithmetic, new inputs);
  unit t  nodes that read a value of template layer t: its parameters (names with `.blocks.t.`, `.gates.t.`,
          `.layers.t.`), its past/present tensors, or a node of unit t (the highest such t wins; a node in a
          layer module's name scope belongs to that layer even before it reads one of its weights);
  tail    nodes in a non-layer module's scope that read a unit (final norm, head) and what follows them, and
          per-layer collectors: variadic nodes (Concat...) with one input per template layer (torch.stack).
Unit t reads exactly one value of unit t - 1, its residual input, and the tail one value of the last unit.
Layer l of the target is a copy of template unit src(l) with its own names: values suffixed, parameters
renamed by `rename(name, t, l)` (R1: block l % unique_blocks, so shared blocks are one set of initializers),
past/present.t -> .l, scalar constants that index a per-layer input (thresholds[t]) -> l, and the residual
input wired to layer l - 1's residual output. Collectors get one input per target layer.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

LAYER_NAME = re.compile(r"(?:^|\.)(?:blocks|gates|layers)\.(\d+)\.")
LAYER_IO = re.compile(r"^(past|present)\.(\d+)\.")
SCOPE_KEY = "pkg.torch.onnx.name_scopes"
VARIADIC = ("Concat", "Sum", "Max", "Min", "Mean", "SequenceConstruct")
PREFIX = -1
PLACEHOLDERS = "template.placeholders"  # trace_template(weights=False)


def _bug(what: str) -> EdgekitError:
    return EdgekitError(f"cannot stamp the exported graph: {what}",
                        "export without streaming (drop --stream) and report this with the model config")


@contextlib.contextmanager
def parameters_unfolded(names: set[str], placeholders: str | None = None):
    """During torch.onnx's optimize(): parameters are not constants (not folded, not merged by value).
    placeholders: a file name; the parameters then come out of optimize() as references into it, in order
    (ir.ExternalTensor), so serializing the graph never reads or copies the weights; yields the list of
    (name, offset, length) referenced, for `write_placeholders`."""
    from torch.onnx._internal.exporter import _onnx_program

    original = _onnx_program.ONNXProgram.optimize
    layout: list[tuple[str, int, int]] = []

    def optimize(self):
        inits = self.model.graph.initializers
        hidden = {n: inits[n].const_value for n in names if n in inits}
        for n in hidden:
            inits[n].const_value = None
        try:
            original(self)
        finally:
            inits = self.model.graph.initializers
            for n, value in hidden.items():
                if n in inits:
                    inits[n].const_value = (value if placeholders is None
                                            else _placeholder(n, value, placeholders, layout))

    _onnx_program.ONNXProgram.optimize = optimize
    try:
        yield layout
    finally:
        _onnx_program.ONNXProgram.optimize = original


def _placeholder(name: str, value, location: str, layout: list):
    import onnx_ir as ir

    if isinstance(value, ir.ExternalTensor):  # optimize() runs twice (inside torch.onnx.export, then ours)
        return value
    offset = layout[-1][1] + layout[-1][2] if layout else 0
    layout.append((name, offset, value.nbytes))
    return ir.ExternalTensor(location, offset, value.nbytes, value.dtype, shape=value.shape, name=name)


def write_placeholders(path: Path, layout: list[tuple[str, int, int]]) -> None:
    """The placeholders' file: zeros of the right length, sparse (no disk, no memory until read)."""
    with open(path, "wb") as f:
        f.truncate(layout[-1][1] + layout[-1][2] if layout else 0)


def trace_template(model, path: Path | None = None, weights: bool = True):
    """The template's ModelProto (weights inline), exported through exporters.onnx.export_graph with
    parameters unfolded, name scopes kept, branches not hoisted; also saved to `path` when given.
    weights=False (needs `path`): the parameters are zeros in a sparse file beside it (PLACEHOLDERS), never
    copied: a full-width template's weights (GBs) are not what stamping takes from it."""
    from unittest import mock

    import exporters.onnx as onnx_exporter

    if not weights and path is None:
        raise ValueError("trace_template(weights=False) needs a path")
    captured = {}
    names = {f"model.{n}" for n, _ in model.named_parameters()}
    with parameters_unfolded(names, None if weights else PLACEHOLDERS) as layout, \
            mock.patch.object(onnx_exporter, "strip_debug_info", lambda m: None), \
            mock.patch.object(onnx_exporter, "hoist_branch_invariants", lambda m, **kw: {}), \
            mock.patch.object(onnx_exporter, "save_external", lambda m, p: captured.setdefault("m", m)):
        onnx_exporter.export_graph(model, Path(path or "template.onnx"))
    proto = captured["m"]
    if path is not None:
        if not weights:
            write_placeholders(Path(path).parent / PLACEHOLDERS, layout)
        onnx_exporter.save_external(proto, Path(path))
    return proto


def _scope_layer(node) -> tuple[int | None, bool]:
    """(layer number of the layer module the node is in, or None; whether it is in another named module)."""
    scope = next((p.value for p in node.metadata_props if p.key == SCOPE_KEY), "")
    found = [int(m) for m in re.findall(r"model\.(?:[\w.]*\.)?(?:blocks|gates|layers)\.(\d+)", scope)]
    if found:
        return found[-1], True
    return None, bool(re.search(r"'model\.[\w.]+'", scope))


def _subgraph_refs(node) -> set[str]:
    """Outer-scope values read inside the node's subgraphs."""
    refs: set[str] = set()
    for a in node.attribute:
        for g in [a.g, *a.graphs] if a.type in (5, 10) else []:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                refs.update(i for i in n.input if i and i not in local)
                refs.update(r for r in _subgraph_refs(n) if r not in local)
                local.update(n.output)
            refs.update(o.name for o in g.output if o.name not in local)
    return refs


def _reads(node) -> list[str]:
    return [i for i in node.input if i] + sorted(_subgraph_refs(node))


@dataclass
class Template:
    """A segmented template graph (see the module doc)."""

    proto: object
    n_layers: int
    prefix: list = field(default_factory=list)
    units: list[list] = field(default_factory=list)
    tail: list = field(default_factory=list)
    collectors: set[str] = field(default_factory=set)  # node names
    residual_out: list[str] = field(default_factory=list)  # per unit: the value the next unit / tail reads
    residual_in: list[str | None] = field(default_factory=list)  # per unit t >= 1: residual_out[t - 1]
    indexed_inputs: set[str] = field(default_factory=set)  # graph inputs with one entry per layer (thresholds)


def segment(proto) -> Template:
    g = proto.graph
    io_layers = [int(m.group(2)) for v in [*g.input, *g.output] if (m := LAYER_IO.match(v.name))]
    if not io_layers:
        raise _bug("no past.N / present.N inputs")
    n = max(io_layers) + 1
    tail_label = n
    indexed = {i.name for i in g.input if len(i.type.tensor_type.shape.dim) == 1
               and i.type.tensor_type.shape.dim[0].dim_value == n and not LAYER_IO.match(i.name)}
    label: dict[str, int] = {}
    for t in g.initializer:
        m = LAYER_NAME.search(t.name)
        label[t.name] = int(m.group(1)) if m else PREFIX
    for i in g.input:
        m = LAYER_IO.match(i.name)
        label[i.name] = int(m.group(2)) if m else PREFIX
    per_layer_outputs = {o.name for o in g.output if LAYER_IO.match(o.name)}
    node_label: dict[str, int] = {}
    tpl = Template(proto, n, indexed_inputs=indexed, units=[[] for _ in range(n)])
    for node in g.node:
        reads = _reads(node)
        shape_only = node.op_type in ("Shape", "Size")
        data = max((label.get(r, PREFIX) for r in reads
                    if not (shape_only and LAYER_IO.match(r))), default=PREFIX)
        layer, in_module = _scope_layer(node)
        in_labels = [label.get(r, PREFIX) for r in node.input]
        if (node.op_type in VARIADIC and len(node.input) == n and max(in_labels) >= 0
                and all(x in (k, PREFIX) for k, x in enumerate(in_labels))
                and not any(o in per_layer_outputs for o in node.output)):  # input k from layer k
            lab = tail_label
            tpl.collectors.add(node.name)
        elif data == tail_label:
            lab = tail_label
        elif data == PREFIX:  # layer-invariant, even in a layer's scope (shared by the exporter's CSE)
            lab = PREFIX
        elif layer is not None and not shape_only:
            if data > layer:
                raise _bug(f"node {node.name} in layer {layer}'s scope reads layer {data}")
            lab = layer
        elif in_module and data >= 0:
            lab = tail_label
        else:
            lab = data
        node_label[node.name] = lab
        for o in node.output:
            label[o] = lab
    # nodes that index a per-layer input (thresholds[t]) read no layer value: they go to their consumers' unit
    consumers: dict[str, set[int]] = {}
    for node in g.node:
        for r in _reads(node):
            consumers.setdefault(r, set()).add(node_label[node.name])
    for node in g.node:
        if node_label[node.name] == PREFIX and indexed.intersection(node.input):
            users = set().union(*(consumers.get(o, set()) for o in node.output))
            if len(users) != 1 or not 0 <= min(users) < n:
                raise _bug(f"{node.name} indexes {sorted(indexed)} for {sorted(users)}")
            node_label[node.name] = min(users)
            for o in node.output:
                label[o] = min(users)
    for node in g.node:
        lab = node_label[node.name]
        (tpl.prefix if lab == PREFIX else tpl.tail if lab == tail_label else tpl.units[lab]).append(node)
    produced = [{o for x in unit for o in x.output} for unit in tpl.units]
    # residuals: unit t reads one value of unit t - 1; the tail (collectors aside) one value of the last unit
    for t in range(n):
        readers = tpl.units[t + 1] if t + 1 < n else [x for x in tpl.tail if x.name not in tpl.collectors]
        from_t = {r for x in readers for r in _reads(x) if r in produced[t]}
        if t + 1 < n:
            older = {r for x in tpl.units[t + 1] for r in _reads(x)
                     if any(r in produced[u] for u in range(t))}
            if older:
                raise _bug(f"layer {t + 1} reads values of earlier layers than {t}: {sorted(older)[:3]}")
        if len(from_t) != 1:
            raise _bug(f"{'layer ' + str(t + 1) if t + 1 < n else 'the tail'} reads {len(from_t)} values of "
                       f"layer {t} ({sorted(from_t)[:4]}), expected one residual stream")
        tpl.residual_out.append(from_t.pop())
    tpl.residual_in = [None] + tpl.residual_out[:-1]
    return tpl


def _index_constants(tpl: Template, unit: int) -> dict[str, list[int]]:
    """node name -> input positions: scalar integer initializers equal to `unit` read by the unit's nodes that
    index a per-layer input (thresholds[t]). Per use: the same constant may be a Range step elsewhere."""
    from onnx import numpy_helper

    inits = {t.name: t for t in tpl.proto.graph.initializer}
    found: dict[str, list[int]] = {}
    for node in tpl.units[unit]:
        if tpl.indexed_inputs.intersection(node.input):
            for k, i in enumerate(node.input):
                t = inits.get(i)
                if t is not None and t.data_type in (6, 7) and int(np.prod(t.dims)) == 1 \
                        and int(numpy_helper.to_array(t).reshape(())) == unit:
                    found.setdefault(node.name, []).append(k)
    return found


def _rename_subgraph(graph, value: Callable[[str], str], suffix: str) -> None:
    """Give the values a subgraph defines the suffix; outer references through `value`."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    own = {o for n in graph.node for o in n.output} | local

    def name(v: str) -> str:
        if not v:
            return v
        return v + suffix if v in own else value(v)

    for vi in graph.input:
        vi.name = name(vi.name)
    for t in graph.initializer:
        t.name = name(t.name)
    for n in graph.node:
        n.input[:] = [name(i) for i in n.input]
        n.output[:] = [name(o) for o in n.output]
        n.name = n.name + suffix
        for a in n.attribute:
            for sub in [a.g, *a.graphs] if a.type in (5, 10) else []:
                _rename_subgraph(sub, name, suffix)
    for o in graph.output:
        o.name = name(o.name)


def stamp(tpl: Template, n_layers: int, src: Callable[[int], int], rename: Callable[[str, int, int], str]):
    """The n_layers-layer ModelProto: template unit src(l) for layer l, parameters renamed by rename(name, t, l).
    Initializers: the template's, renamed (one copy per distinct name). Debug info and value_info are dropped."""
    import onnx
    from onnx import helper, numpy_helper

    g = tpl.proto.graph
    t_n = tpl.n_layers
    if src(0) != 0 or any(not 1 <= src(layer) < t_n for layer in range(1, n_layers)):
        raise _bug("layer 0 must come from template layer 0 and every other layer from layers 1..")
    inits = {t.name: t for t in g.initializer}
    unit_values = [{o for x in unit for o in x.output} for unit in tpl.units]
    index_consts = [_index_constants(tpl, t) for t in range(t_n)]
    out = onnx.ModelProto()
    out.CopyFrom(tpl.proto)
    del out.graph.node[:]
    del out.graph.initializer[:]
    del out.graph.value_info[:]
    new_inits: dict[str, object] = {}
    res_out: list[str] = []

    def keep_init(name: str, new: str) -> None:
        if new not in new_inits:
            t = copy.deepcopy(inits[name])
            t.name = new
            new_inits[new] = t

    def value_for(t: int, layer: int) -> Callable[[str], str]:
        suffix = f"__L{layer}"

        def value(v: str) -> str:
            if not v:
                return v
            m = LAYER_IO.match(v)
            if m and int(m.group(2)) == t:
                return f"{m.group(1)}.{layer}.{v[m.end():]}"
            if v in unit_values[t]:
                return v + suffix
            if t > 0 and v == tpl.residual_in[t]:
                return res_out[layer - 1]
            if v in inits:
                new = rename(v, t, layer) if LAYER_NAME.search(v) else v
                keep_init(v, new)
                return new
            if any(v in unit_values[u] for u in range(t_n)):
                raise _bug(f"template layer {t} reads {v} of another layer")
            return v
        return value

    nodes = []
    for node in tpl.prefix:
        for i in node.input:
            if i in inits:
                keep_init(i, i)
        nodes.append(copy.deepcopy(node))
    layer_map: list[Callable[[str], str]] = []
    for layer in range(n_layers):
        t = src(layer)
        value = value_for(t, layer)
        for node in tpl.units[t]:
            x = copy.deepcopy(node)
            x.input[:] = [value(i) for i in x.input]
            for k in index_consts[t].get(node.name, []):
                const = f"layer_index.{layer}"
                if const not in new_inits:
                    arr = numpy_helper.to_array(inits[node.input[k]])
                    new_inits[const] = numpy_helper.from_array(np.full(arr.shape, layer, arr.dtype), const)
                x.input[k] = const
            x.output[:] = [value(o) for o in x.output]
            x.name = f"{x.name}__L{layer}"
            for a in x.attribute:
                for sub in [a.g, *a.graphs] if a.type in (5, 10) else []:
                    _rename_subgraph(sub, value, f"__L{layer}")
            nodes.append(x)
        res_out.append(value(tpl.residual_out[t]))
        layer_map.append(value)
    last = tpl.n_layers - 1
    for node in tpl.tail:
        x = copy.deepcopy(node)
        if node.name in tpl.collectors:
            x.input[:] = [layer_map[layer](node.input[src(layer)]) for layer in range(n_layers)]
        else:
            x.input[:] = [res_out[-1] if i == tpl.residual_out[last] else i for i in x.input]
            for i in x.input:
                if i in inits:
                    keep_init(i, i)
                elif any(i in unit_values[u] for u in range(t_n)):
                    raise _bug(f"the tail reads {i} of a template layer")
        nodes.append(x)
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(new_inits.values())
    # graph inputs / outputs: per-layer ones for every target layer, per-layer-indexed ones n_layers long
    def io(values, prefix):
        plain = [v for v in values if not LAYER_IO.match(v.name)]
        per_layer = [v for v in values if (m := LAYER_IO.match(v.name)) and int(m.group(2)) == 0]
        first = next((k for k, v in enumerate(values) if LAYER_IO.match(v.name)), len(values))
        stamped = []
        for layer in range(n_layers):
            for v in per_layer:
                c = copy.deepcopy(v)
                c.name = f"{prefix}.{layer}.{v.name.split('.', 2)[2]}"
                stamped.append(c)
        result = [*[v for v in values[:first] if not LAYER_IO.match(v.name)], *stamped,
                  *[v for v in values[first:] if not LAYER_IO.match(v.name)]]
        for v in plain:
            dims = v.type.tensor_type.shape.dim
            if len(dims) == 1 and dims[0].dim_value == t_n:
                dims[0].dim_value = n_layers
        return result

    new_in, new_out = io(list(g.input), "past"), io(list(g.output), "present")
    del out.graph.input[:]
    out.graph.input.extend(new_in)
    del out.graph.output[:]
    out.graph.output.extend(new_out)
    _ = helper  # noqa: F841 (helper kept for symmetry with exporters)
    return out
