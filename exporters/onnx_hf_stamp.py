"""Hugging Face llama / qwen2 decoders through the template + stamping path (issues 14 and 18): a 2-layer copy of
the model is traced (torch.export + the dynamo exporter cost ~2 s per layer: most of a 30-layer export) and
stamped to full depth by exporters/onnx_stamp.py (HF parameter names carry `model.layers.N.`), then the weights
are written from a weight source (edgekit/weights.py) by exporters/onnx_stream.write_weights.

The template has the target's shapes except its vocabulary: TEMPLATE_VOCAB rows of embedding / lm_head instead
of the target's (152064 x 3584 x 2 would be 4.4 GB of template weights for a 7B distill, loaded again by the
template's int8 pass). Nothing in a llama / qwen2 graph depends on the vocabulary size but those two weights, the
logits' last dim and, after int8, their quantized tensors, a GatherBlockQuantized rows shape and a MatMulNBits
N attribute: `widen_vocab` sets those to the target's. Validation against PyTorch checks the result (and the
stamped graph equals the fully traced one: tests/exporters/test_hf_stamp.py).

Rotary tables (`inv_freq`, a non-persistent buffer) are layer-invariant: they are computed for the template as
transformers computes them, and stay template constants.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

TEMPLATE_LAYERS = 2
TEMPLATE_VOCAB = 1031  # a prime: no other dim of a real config equals it
STAMPABLE = ("llama", "qwen2")
VOCAB_PARAMS = ("hf.model.embed_tokens.weight", "hf.lm_head.weight")


def stampable(cfg) -> bool:
    """A Hugging Face llama / qwen2 model without skip gates, deep enough to be worth stamping."""
    return (getattr(cfg, "model_type", None) in STAMPABLE and not getattr(cfg, "gated_layers", ())
            and cfg.n_layers > TEMPLATE_LAYERS)


def plan(cfg):
    """The LayerPlan: template layer 0 for layer 0, template layer 1 for every other; `.layers.t.` -> `.layers.l.`."""
    import dataclasses

    from exporters.onnx_stream import LayerPlan

    tcfg = dataclasses.replace(cfg, n_layers=TEMPLATE_LAYERS, vocab_size=min(cfg.vocab_size, TEMPLATE_VOCAB))

    def rename(name: str, t: int, layer: int) -> str:
        return re.sub(rf"\.layers\.{t}\.", f".layers.{layer}.", name)

    return LayerPlan(tcfg, lambda layer: 0 if layer == 0 else 1, rename)


def template_model(hf_config, cfg, materialise: bool = True):
    """The 2-layer, small-vocabulary HFCausalLM for `hf_config` (a transformers config). materialise=False: weights
    allocated but never written (not resident; a 7B layer is ~1 GB), rotary buffers computed as transformers does."""
    import torch
    import transformers

    from edgekit.models.hf import HFCausalLM

    tcfg = plan(cfg).template_cfg
    hc = copy.deepcopy(hf_config)
    hc.num_hidden_layers = TEMPLATE_LAYERS
    hc.vocab_size = tcfg.vocab_size
    for attr in ("layer_types", "max_window_layers"):  # per-layer lists / counts follow the depth
        if isinstance(getattr(hc, attr, None), list):
            setattr(hc, attr, getattr(hc, attr)[:TEMPLATE_LAYERS])
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    if materialise:
        torch.manual_seed(0)
        hf = transformers.AutoModelForCausalLM.from_config(hc, **kw)
    else:
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(hc, **kw)
        hf = hf.to_empty(device="cpu")
        rotary = hf.model.rotary_emb
        hf.model.rotary_emb = type(rotary)(config=rotary.config)
        named = {n for n, _ in hf.named_buffers()}
        if any(not n.startswith("model.rotary_emb.") for n in named):
            raise EdgekitError(f"cannot build a stamping template: buffers {sorted(named)}",
                               "this is an edgekit bug: report it with the model config")
    return HFCausalLM(hf.eval(), tcfg)


def widen_vocab(proto, small: int, vocab: int) -> int:
    """Give the stamped graph the target's vocabulary (see the module doc); -> tensors / nodes changed."""
    from onnx import numpy_helper

    if small == vocab:
        return 0
    g = proto.graph
    vocab_names = {"model." + p for p in VOCAB_PARAMS}
    changed = 0
    for t in g.initializer:
        base = re.sub(r"(_T)?_(Q8B\d+|scales)$", "", t.name)
        if base in vocab_names and t.dims and t.dims[0] == small:
            t.dims[0] = vocab
            changed += 1
        elif base.endswith("_rows_shape") and re.sub(r"(_T)?_Q8B\d+_rows_shape$", "", base) in vocab_names:
            arr = numpy_helper.to_array(t).copy()
            if arr[0] == small:
                arr[0] = vocab
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
                changed += 1
    for n in g.node:
        if n.op_type == "MatMulNBits" and re.sub(r"(_T)?_Q8B\d+$", "", n.input[1]) in vocab_names:
            for a in n.attribute:
                if a.name == "N" and a.i == small:
                    a.i = vocab
                    changed += 1
    for o in g.output:
        dims = o.type.tensor_type.shape.dim
        if o.name == "logits" and dims and dims[-1].dim_value == small:
            dims[-1].dim_value = vocab
            changed += 1
    return changed


def stamped_hf_graph(hf_config, cfg, workdir: Path, int8: bool, materialise: bool = True) -> tuple[object, dict]:
    """(stamped ModelProto, weights not yet written, info) for an HF llama / qwen2 model."""
    from exporters.onnx_stream import stamped_graph

    p = plan(cfg)
    proto, info = stamped_graph(cfg, workdir, int8, template_model(hf_config, cfg, materialise), plan=p)
    info["vocab_widened"] = widen_vocab(proto, p.template_cfg.vocab_size, cfg.vocab_size)
    return proto, info


TRANSPOSED = ".T"  # suffix of a parameter stored transposed (fold_transposes)


def fold_transposes(proto) -> set[str]:
    """Transpose(W) of a 2-D parameter read by nothing else -> an initializer `W.T` ([in, out], data written by
    write_weights from TransposedWeights), as the full trace's optimizer folds every such Transpose (the template
    kept parameters out of folding). A parameter read elsewhere too (a tied embedding) keeps its Transpose, as
    there. -> the bare parameter names now stored transposed."""
    from onnx import TensorProto

    from exporters.onnx_stream import PARAM_PREFIX

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    folded, keep, rename = set(), [], {}
    for n in g.node:
        w = n.input[0] if n.op_type == "Transpose" and n.input else None
        t = inits.get(w)
        perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), [1, 0])
        if (t is not None and w.startswith(PARAM_PREFIX) and len(t.dims) == 2 and perm == [1, 0]
                and readers[w] == 1 and t.data_location == TensorProto.EXTERNAL):
            rename[n.output[0]] = w + TRANSPOSED
            t.name = w + TRANSPOSED
            t.dims[:] = [t.dims[1], t.dims[0]]
            folded.add(w[len(PARAM_PREFIX):])
            continue
        keep.append(n)
    for n in keep:
        n.input[:] = [rename.get(i, i) for i in n.input]
    del g.node[:]
    g.node.extend(keep)
    return folded


class TransposedWeights:
    """A weight source plus `name.T` = source.get(name).T for the parameters in `transposed`."""

    def __init__(self, source, transposed: set[str]):
        self.source, self.transposed = source, set(transposed)

    def names(self) -> list[str]:
        return [*self.source.names(), *(n + TRANSPOSED for n in sorted(self.transposed))]

    def _split(self, name: str) -> tuple[str, bool]:
        if name.endswith(TRANSPOSED) and name[:-len(TRANSPOSED)] in self.transposed:
            return name[:-len(TRANSPOSED)], True
        return name, False

    def shape(self, name: str) -> tuple[int, ...]:
        base, t = self._split(name)
        s = tuple(self.source.shape(base))
        return s[::-1] if t else s

    def get(self, name: str):
        import numpy as np

        base, t = self._split(name)
        a = self.source.get(base)
        return np.ascontiguousarray(a.T) if t else a

    def missing(self, wanted: list[str]) -> None:
        self.source.missing([self._split(n)[0] for n in wanted])


def export_graph(model, path: Path) -> dict:
    """exporters.onnx.export_graph's result for an in-memory HFCausalLM (fp32 graph + path.data), traced from
    the 2-layer template and stamped; -> timings."""
    import shutil
    import tempfile
    import time

    from edgekit.weights import StateWeights
    from exporters.onnx_stream import write_weights

    path = Path(path)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="template-", dir=path.parent))
    try:
        proto, info = stamped_hf_graph(model.hf.config, model.cfg, work, int8=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    source = TransposedWeights(StateWeights(model.state_dict()), fold_transposes(proto))
    info.update(write_weights(proto, source, path))
    info["total_s"] = round(time.monotonic() - t0, 2)
    return info


def shapes(hf_config) -> dict[str, tuple[int, ...]]:
    """Parameter name (HFCausalLM's: `hf.` + transformers') -> shape, from the config alone (meta device)."""
    import torch
    import transformers

    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    return {f"hf.{n}": tuple(p.shape) for n, p in hf.state_dict().items()}


def init_reference(hf_config) -> dict:
    """The initialisation's statistics per kind of tensor: a tiny model of the same architecture, its own init."""
    import torch
    import transformers

    hc = copy.deepcopy(hf_config)
    hc.num_hidden_layers, hc.vocab_size = 2, 256
    heads = 4
    kv = max(1, heads * hf_config.num_key_value_heads // hf_config.num_attention_heads)
    hc.num_attention_heads, hc.num_key_value_heads, hc.hidden_size, hc.intermediate_size = heads, kv, 64, 128
    hc.head_dim = 16
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hc, dtype=torch.float32)
    return {f"hf.{n}": t for n, t in hf.state_dict().items()}


def hf_config(directory: Path):
    """The transformers config of a Hugging Face directory (config.json only: no weights needed)."""
    from edgekit.hfconfig import require

    transformers = require("transformers")
    return transformers.AutoConfig.from_pretrained(str(directory))


def weight_source(directory: Path, random_weights: bool, seed: int = 0):
    """The streamed export's weights for a Hugging Face directory, under HFCausalLM's names (`hf.`...): its
    *.safetensors (read one tensor at a time, bf16 converted per tensor), or seeded random tensors of the config's
    shapes at the model's own initialisation scale (RandomWeights: never the whole model in fp32)."""
    from edgekit.weights import Prefixed, RandomWeights, SafetensorsWeights

    hc = hf_config(directory)
    if random_weights:
        return RandomWeights(shapes(hc), init_reference(hc), seed)
    source = Prefixed(SafetensorsWeights(Path(directory)), "hf.")
    missing = [n for n in shapes(hc) if n not in set(source.names()) and not (
        n == "hf.lm_head.weight" and getattr(hc, "tie_word_embeddings", False))]
    if missing:
        raise EdgekitError(f"{directory}: the weights lack {len(missing)} tensor(s) the config needs, e.g. "
                           f"{missing[0].removeprefix('hf.')}", "pass --random-weights for seeded random weights of "
                           "this shape, or complete the directory")
    return source


def export_streamed(hf_config_, cfg, source, out_dir: Path, int8: bool, progress=None) -> dict:
    """exporters.onnx_stream.export_streamed for a Hugging Face llama / qwen2 model: out_dir/model.onnx + .data from
    the 2-layer template, weights streamed from `source` (int8: quantized per tensor on the way). Unfused: the
    fused graph (exporters/onnx_fuse.py) packs q/k/v from whole fp32 weights in memory."""
    import shutil
    import tempfile
    import time

    from exporters.onnx import MODEL_FILE
    from exporters.onnx_stream import peak_rss_gib, write_streamed

    out_dir = Path(out_dir)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="template-", dir=out_dir))
    small = sum(int(np.prod(s)) for n, s in source_shapes(source).items() if ".layers.0." in n or ".layers.1." in n)
    try:
        from exporters.onnx_stream import CHECK_ELEMENTS

        proto, info = stamped_hf_graph(hf_config_, cfg, work, int8, materialise=small <= CHECK_ELEMENTS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["template_peak_rss_gib"] = round(peak_rss_gib(), 2)
    if not int8:
        source = TransposedWeights(source, fold_transposes(proto))
    return write_streamed(proto, info, source, out_dir / MODEL_FILE, t0, progress)


def source_shapes(source) -> dict[str, tuple[int, ...]]:
    return {n: tuple(source.shape(n)) for n in source.names()}
