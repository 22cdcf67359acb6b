"""TensorRT exporter: a TensorRT-ready ONNX graph plus a build recipe; the engine is built on the device.

A TensorRT engine runs only on the TensorRT version and GPU architecture that built it (DESIGN.md), so what
`export` writes into the artifact is:

    model.onnx (+ .data)  fp16 weights (or int4 weight-only explicit Q/DQ, block 128), fp32 compute and I/O;
                          R1's gates stay If nodes with a 0-D bool condition and identically shaped branches
    trt_recipe.json       builder flags, an optimization profile for prefill and one for decode (batch, seq, past
                          min/opt/max derived from the device profile's memory and the requested context),
                          workspace limit, timing-cache file, target SM, TensorRT versions, the trtexec command
    model.engine, timing.cache   only where TensorRT and a GPU are present; elsewhere `edgekit build-engine`

The steps are separate functions (STYLE.md), each in its module: prepare the graph (exporters/trt_transforms.py)
-> check it (operators per TensorRT version, conditionals: exporters/trt_ops.py) -> recipe
(exporters/trt_recipe.py) -> validate in ONNX Runtime on the CPU (here) -> build and validate the engine (device
only: runtimes/tensorrt_build.py builds it). Device facts come only from profiles/*.toml. TensorRT is imported
lazily, by the runtime.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.families import family
from edgekit.versions import compatible
from exporters.trt_ops import check_conditionals, check_ops, data_version, describe_issues, op_support
from exporters.trt_recipe import MODEL_FILE, check_precision, make_recipe
from exporters.trt_transforms import (
    FP16_MAX,
    MIN_WEIGHT_ELEMENTS,
    downgrade_to_opset17,
    drop_unused_initializers,
    fp16_reference_bytes,
    int4_dequantized,
    quantize_int4,
    save_deduplicated,
    store_fp16,
    stored_bytes,
)
from runtimes.tensorrt import tensorrt_available, tensorrt_environment
from runtimes.tensorrt_build import RECIPE_FILE

GRAPH_COSINE = 0.999  # the stored-weights graph vs PyTorch with the same stored weights; also the engine's gate


# ---------------------------------------------------------------------------------------------
# Validation in ONNX Runtime (CPU) against PyTorch, on the lead's seeded cases
# ---------------------------------------------------------------------------------------------
class CpuSession:
    """The minimal `infer` a validation needs, over an ONNX Runtime CPU session.

    ONNX Runtime fuses int4 DequantizeLinear + MatMul into MatMulNBits, which by default quantizes the
    activations to int8 at run time (accuracy level 4: ~5e-3 logit error on r1-tiny, far more with a large
    random cache). TensorRT's weight-only int4 keeps activations in fp16/fp32, so the validation asks for
    accuracy level 1 (fp32 activations): the graph is then checked for what it means, not for ORT's shortcut."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds):
        return dict(zip(self.names, self.session.run(self.names, feeds)))


# ---------------------------------------------------------------------------------------------
# export (called by edgekit.api.export for --format tensorrt)
# ---------------------------------------------------------------------------------------------
def _load_model_proto(path: Path):
    import onnx

    return onnx.load(str(path))


def export(model, tmp_dir: Path, device: str, context: int | None = None, precision: str = "fp16",
           progress=None, min_cosine: float | None = None) -> dict:
    """Write the TensorRT-ready graph (model.onnx + data) and trt_recipe.json into `tmp_dir`. Returns
    {fields: manifest fields, recipe, stored: the model holding exactly the weights the graph stores, floor: the
    fidelity floor}; validating the graph and building the engine are the workflow's (edgekit.engine.export),
    since validation sits above the exporters. The caller writes config.json, tokenizer and manifest.

    min_cosine: the fidelity floor against fp32 PyTorch (mean logit cosine over the seeded cases); default the
    precision's (fp16 0.999, int4 0.95). The graph-correctness check (vs PyTorch with the stored weights) is fixed."""
    import tempfile

    import profiles
    from exporters.onnx import export_graph

    def step(description: str):
        if progress:
            progress(1, description=description)

    if device is None:
        raise EdgekitError("--format tensorrt needs --device (the target's profile)", "see: edgekit devices")
    profile = profiles.load(device)
    if profile.kind == "cpu" or "tensorrt" not in profile.runtimes:
        raise EdgekitError(f"{profile.name} does not run TensorRT", "use --format onnx for this device")
    policy = check_precision(precision, profile)
    cfg = model.cfg
    context = cfg.max_seq_len if context is None else int(context)
    if not 2 <= context <= cfg.max_seq_len:
        raise EdgekitError(f"--context {context} is outside 2..{cfg.max_seq_len} (the model's context)")
    tmp_dir = Path(tmp_dir)
    stacks = profile.tensorrt_versions
    if not stacks:
        raise EdgekitError(f"{profile.name}'s profile lists no TensorRT version", "add its stacks to the profile")

    step("exporting the ONNX graph")
    with tempfile.TemporaryDirectory(prefix="edgekit-trt-", dir=tmp_dir) as work:
        src = Path(work) / MODEL_FILE
        static = hasattr(model, "static_route_slots")  # R1: a constant TopK k (TensorRT 8.5 needs it)
        if static:
            model.static_route_slots = True
        try:
            export_graph(model, src)
        finally:
            if static:
                model.static_route_slots = False
        graph = _load_model_proto(src)
    step("preparing the graph for TensorRT")
    conditionals = check_conditionals(graph)
    fp16_bytes = fp16_reference_bytes(graph)
    transform = quantize_int4(graph) if precision == "int4" else {}
    if precision in ("fp16", "int4"):
        transform |= store_fp16(graph)
    # one graph for every stack of the device: opset 17 when a TensorRT 8.x stack is among them (int4 needs 21)
    if precision != "int4" and any(t and op_support()[t]["opset_hard"] for t in map(data_version, stacks)):
        graph = downgrade_to_opset17(graph)
    drop_unused_initializers(graph)
    opset = next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx"))
    topk_bound = math.ceil(context / cfg.block_size) if family(cfg).routed else None
    checks = {v: check_ops(graph, v, topk_bound) for v in dict.fromkeys(stacks)}
    ok = [v for v, r in checks.items() if r["ok"]]
    refused = {v: describe_issues(r) for v, r in checks.items() if not r["ok"]}
    if not ok:
        detail = "; ".join(f"TensorRT {v}: {why}" for v, why in refused.items())
        raise EdgekitError(f"the {precision} graph of {cfg.name} cannot be parsed by any TensorRT on {profile.name}: "
                           f"{detail}", "target a device stack with a newer TensorRT, or use --format onnx")
    weight_bytes = stored_bytes(graph)
    save_deduplicated(graph, tmp_dir / MODEL_FILE)
    recipe = make_recipe(cfg, profile, precision, context, weight_bytes, opset, ok, refused)
    (tmp_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=1))

    fields = {
        "format": "tensorrt", "precision": precision, "device": profile.name, "model_file": MODEL_FILE,
        "recipe": RECIPE_FILE, "context": context, "opset": opset,
        "inputs": recipe["io"]["inputs"], "outputs": recipe["io"]["outputs"],
        "weights": {"stored_bytes": weight_bytes, "fp16_bytes": fp16_bytes,
                    "ratio_to_fp16": round(weight_bytes / fp16_bytes, 4), **_summary(transform)},
        "op_check": {v: {"ok": r["ok"], "table": r["table"], "issues": r["issues"][:50], "notes": r["notes"]}
                     for v, r in checks.items()},
        "conditionals": conditionals,
        "tensorrt": {"sm": profile.sm, "versions": ok, "refused": refused},
    }
    floor = policy["min_cosine"] if min_cosine is None else float(min_cosine)
    return {"fields": fields, "recipe": recipe, "stored": stored_weights_model(model, transform), "floor": floor}


def engine_not_buildable_here(recipe: dict) -> str | None:
    """Why this machine cannot build the recipe's engine (no TensorRT/GPU, or another TensorRT/SM), or None."""
    why_not = tensorrt_available()
    if why_not is None:
        _trt, here_version, here_sm = tensorrt_environment()
        ok, sm = recipe["tensorrt"]["versions"], recipe["sm"]
        if not compatible(here_version, ok) or here_sm != sm:
            why_not = (f"this machine (TensorRT {here_version}, sm {here_sm}) is not the target "
                       f"(TensorRT {', '.join(ok)}, sm {sm})")
    return why_not


def stored_weights_model(model, transform: dict):
    """A copy of `model` holding exactly the weights the graph stores (int4-dequantized, fp16-rounded), so the
    graph's arithmetic can be checked tightly apart from the precision loss. `model` itself for fp32."""
    import copy

    import torch

    if not transform:
        return model
    quantized = {q["name"].removeprefix("model."): q["axis"] for q in transform.get("quantized", [])}
    stored = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in stored.named_parameters():
            w = p.detach().cpu().numpy()
            if name in quantized:
                p.copy_(torch.from_numpy(int4_dequantized(w, quantized[name])))
            elif p.numel() >= MIN_WEIGHT_ELEMENTS and np.abs(w).max() <= FP16_MAX:
                p.copy_(torch.from_numpy(w.astype(np.float16).astype(np.float32)))
    return stored


def _summary(transform: dict) -> dict:
    out = {k: v for k, v in transform.items() if k in ("fp16_weights", "kept_fp32_out_of_range") and v}
    if "quantized" in transform:
        out |= {"int4_block_size": transform["block_size"], "int4_tensors": len(transform["quantized"]),
                "int4_readers": sum(q["readers"] for q in transform["quantized"]),
                "int4_left_float": transform["left_float"]}
    return out
