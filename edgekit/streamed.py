"""The streamed export workflow (issue 18): which models take it, their weight source, the export through
exporters/onnx_stream.py into the artifact's staging directory, and its validation.

When: `--stream`, `--random-weights`, or automatically for an edgekit preset/checkpoint whose fp32 weights
exceed STREAM_ABOVE_BYTES (the in-memory path needs ~6x the fp32 weights: a full-size preset cannot take it).
A preset's weights are random by definition: streamed, they are RandomWeights (seeded per tensor, the model's
own initialisation scale), so no fp32 copy of the model ever exists.

Validation: a model whose fp32 weights fit in FULL_REFERENCE_BYTES is checked exactly like the in-memory path
(validate.validate against the whole PyTorch model: fp32 within tolerance, int8 by logit cosine); a larger one
against a PyTorch forward that materialises one block at a time from the same source (weights.
layer_streamed_model) on a prefill and a decode step: logit cosine gate, argmax agreement and, for gated models,
the skip pattern with all gates open and all closed. The graph runs first and its session is closed; the
cases' PyTorch forwards then run in lockstep (weights.lockstep), so each block is read from the source once.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgekit.config import FULL_SIZE_BYTES as STREAM_ABOVE_BYTES
from edgekit.errors import EdgekitError

FULL_REFERENCE_BYTES = 1 << 30


def fp32_bytes(cfg, path=None) -> int:
    if _hf(cfg):  # a Hugging Face llama / qwen2 directory: its config's shapes
        from exporters.onnx_hf_stamp import hf_config, shapes

        hc = hf_config(path)
        return 4 * sum(int(np.prod(s)) for n, s in shapes(hc).items()
                       if not (n == "hf.lm_head.weight" and getattr(hc, "tie_word_embeddings", False)))
    from edgekit.models import fp32_bytes as preset_bytes

    return preset_bytes(cfg)


def _hf(cfg) -> bool:
    from exporters.onnx_hf_stamp import stampable

    return getattr(cfg, "family", "").startswith("hf-") and stampable(cfg)


def wants_stream(res, fmt: str, stream: bool | None, random_weights: bool) -> bool:
    if res.kind not in ("preset", "checkpoint") and not (res.kind == "hf" and _hf(res.cfg)):
        if stream or random_weights:
            raise EdgekitError(f"streamed export takes edgekit presets and checkpoints and Hugging Face llama / qwen2 "
                               f"directories without skip gates, not this {res.kind} target",
                               "drop --stream / --random-weights (this target exports in memory)")
        return False
    big = fp32_bytes(res.cfg, res.path) > STREAM_ABOVE_BYTES
    if stream is False and random_weights:
        raise EdgekitError("--random-weights is streamed", "drop --no-stream")
    if stream is False and big:
        raise EdgekitError(f"{res.name} has {fp32_bytes(res.cfg, res.path) / 2**30:.0f} GiB of fp32 weights: the "
                           "in-memory export needs several times that", "drop --no-stream")
    if not (stream or random_weights or big):
        return False
    if fmt != "onnx":
        raise EdgekitError(f"streamed export writes ONNX, not {fmt}", "use --format onnx with --stream / "
                           "--random-weights (or a model small enough for the in-memory path)")
    return True


def weight_source(res, random_weights: bool, seed: int = 0):
    from edgekit.weights import RandomWeights, SafetensorsWeights

    if res.kind == "hf":
        from exporters.onnx_hf_stamp import weight_source as hf_source

        return hf_source(res.path, random_weights, seed)
    if res.kind == "preset" or random_weights:
        import dataclasses

        from edgekit.models import build
        shapes = {n: tuple(p.shape) for n, p in build(res.cfg, device="meta").state_dict().items()}
        small = dataclasses.replace(res.cfg, n_layers=3, d_model=64, n_heads=4, n_kv_heads=0, d_ff=128,
                                    vocab_size=256, n_unique_blocks=0,
                                    gated_layers=[1] if res.cfg.family == "r1" else [])
        reference = build(small, seed=seed).state_dict()  # the initialisation's statistics per kind of tensor
        return RandomWeights(shapes, reference, seed)
    from edgekit.checkpoint import WEIGHTS

    if not (Path(res.path) / WEIGHTS).is_file():
        raise EdgekitError(f"{res.path}: no {WEIGHTS}", "pass --random-weights for seeded random weights of this "
                           "shape, or save the checkpoint's weights")
    return SafetensorsWeights(Path(res.path) / WEIGHTS)


def export(res, tmp: Path, int8: bool, random_weights: bool, min_cosine: float, tolerance: float, progress) -> dict:
    """Write the graph + weights into tmp (a staging directory); returns the manifest fields."""
    from edgekit.spec import DecoderSpec
    from exporters import onnx as onnx_exporter
    from exporters.onnx_graph import graph_ops
    from exporters.onnx_stream import export_streamed

    cfg = res.cfg
    spec = DecoderSpec(cfg)
    source = weight_source(res, random_weights)
    t0 = time.monotonic()
    with progress(f"exporting {res.name} to ONNX (stamped from a {_template_layers(cfg)}-layer trace, weights "
                  f"streamed{', int8' if int8 else ''})", cfg.n_layers) as advance:
        def on_layer(layer: int, row: dict) -> None:
            advance(1, description=f"writing layer {layer + 1}/{cfg.n_layers}  {row['elapsed_s']:.0f}s  "
                                   f"peak RSS {row['peak_rss_gib']:.2f} GiB")

        if res.kind == "hf":
            from exporters import onnx_hf_stamp

            info = onnx_hf_stamp.export_streamed(onnx_hf_stamp.hf_config(res.path), cfg, source, tmp, int8,
                                                 progress=on_layer)
        else:
            info = export_streamed(cfg, source, tmp, int8, progress=on_layer)
    info["wall_s"] = round(time.monotonic() - t0, 1)
    fields = {"format": "onnx", "precision": "int8" if int8 else "fp32", "model_file": onnx_exporter.MODEL_FILE,
              "opset": onnx_exporter.OPSET, "inputs": spec.input_names, "outputs": spec.output_names,
              "dynamic_axes": spec.dynamic_axes(), "graph_ops": graph_ops(tmp / onnx_exporter.MODEL_FILE),
              "weights": "random (seeded per tensor)" if res.kind == "preset" or random_weights else (
                  "Hugging Face safetensors" if res.kind == "hf" else "checkpoint"),
              "streamed": {k: v for k, v in info.items() if k not in ("layers", "quantization")},
              "size": {("int8_bytes" if int8 else "fp32_bytes"): sum(
                  p.stat().st_size for p in Path(tmp).glob("model.onnx*"))}}
    if int8:
        from exporters.onnx_int8 import METHOD

        fields["quantization"] = {"method": METHOD, **info["quantization"]}
    with progress("validating the streamed graph against PyTorch") as advance:
        fields["validation"] = validate(res, source, tmp, int8, min_cosine, tolerance)
        advance(1)
    return fields


def _template_layers(cfg) -> int:
    from exporters.onnx_stream import layer_plan

    if _hf(cfg):
        from exporters.onnx_hf_stamp import TEMPLATE_LAYERS

        return TEMPLATE_LAYERS
    return layer_plan(cfg).template_cfg.n_layers


def validate(res, source, tmp: Path, int8: bool, min_cosine: float, tolerance: float) -> dict:
    from edgekit import validate as checks
    from edgekit.resolve import Resolved
    from edgekit.spec import DecoderSpec
    from edgekit.weights import layer_streamed_model, model_from
    from runtimes.onnxruntime import OnnxRuntimeRunner
    from runtimes.torch import TorchRunner

    cfg = res.cfg
    spec = DecoderSpec(cfg)
    hf = res.kind == "hf"
    whole = fp32_bytes(cfg, res.path) <= FULL_REFERENCE_BYTES

    def layered(lazy: bool):  # a Hugging Face model materialising one decoder layer at a time (lazy=False: all)
        from edgekit.weights import hf_layer_streamed_model
        from exporters.onnx_hf_stamp import hf_config

        return hf_layer_streamed_model(hf_config(res.path), cfg, source, lazy=lazy)

    with OnnxRuntimeRunner(Resolved("onnx", res.name, cfg, tmp)) as runner:
        if whole:  # a small model: the whole model, judged as the in-memory path does
            model = layered(False) if hf else model_from(cfg, source)
            with TorchRunner(Resolved("hf" if hf else "preset", res.name, cfg, model=model)) as reference:
                report = checks.validate(reference, runner, spec, tolerance=None if int8 else tolerance,
                                         min_cosine=min_cosine if int8 else None)
            return {"int8" if int8 else "fp32": report}
        cases = graph_cases(runner, spec)
    # the session (the whole artifact, GBs) is closed before the reference reads the weights
    return {"streamed": layered_check(layered(True) if hf else layer_streamed_model(cfg, source), cases, spec,
                                      min_cosine)}


def graph_cases(runner, spec) -> list[dict]:
    """The graph's outputs on a prefill (1 x 8, no cache) and a decode step (1 x 1 after the prefill's 8
    cached positions), gated models both with every gate open and a prefill with every gate closed."""
    from edgekit.spec import MASK

    cfg = spec.cfg
    feeds = spec.dummy(1, 8, 0, seed=7)
    settings = {"default": None}
    if spec.gated:
        settings = {"run-all": np.zeros(cfg.n_layers, np.float32), "skip-all-gated": np.full(cfg.n_layers, 2.0,
                                                                                            np.float32)}
    cases = []
    for label, thr in settings.items():
        step_feeds = dict(feeds)
        if thr is not None:
            step_feeds["thresholds"] = thr
        for step in ("prefill", "decode") if label != "skip-all-gated" else ("prefill",):
            if step == "decode":  # one new token on the prefill's cache: the mask covers both
                past = {f"past.{i}.{kv}": cases[-1]["got"][f"present.{i}.{kv}"] for i in range(cfg.n_layers)
                        for kv in ("key", "value")}
                step_feeds = {**step_feeds, "input_ids": np.array([[3]], np.int64), **past}
                if MASK in step_feeds:  # past + seq
                    step_feeds[MASK] = np.ones((1, feeds["input_ids"].shape[1] + 1), step_feeds[MASK].dtype)
            got = runner.infer(step_feeds)
            cases.append({"setting": label, "step": step, "thresholds": thr, "feeds": step_feeds,
                          "got": {k: v for k, v in got.items() if k in ("logits", "executed")}
                          | ({f"present.{i}.{kv}": got[f"present.{i}.{kv}"] for i in range(cfg.n_layers)
                              for kv in ("key", "value")} if step == "prefill" else {})})
    return cases


def layered_check(model, cases: list[dict], spec, min_cosine: float) -> dict:
    """`graph_cases` against a PyTorch `model` that materialises one block (edgekit: weights.layer_streamed_model,
    every case's forward in lockstep, so each block is read once for all cases) or one decoder layer (Hugging Face:
    weights.hf_layer_streamed_model, case after case) at a time; raises below min_cosine or, gated, when the skip
    pattern differs."""
    import torch

    from edgekit.weights import lockstep

    cfg = spec.cfg

    def forward(case: dict):
        f = case["feeds"]
        with torch.no_grad():
            past = [(torch.from_numpy(f[f"past.{i}.key"]), torch.from_numpy(f[f"past.{i}.value"]))
                    for i in range(cfg.n_layers)]
            thr = case["thresholds"]
            return model(torch.from_numpy(f["input_ids"]), past, None if thr is None else torch.from_numpy(thr))

    calls = [lambda c=c: forward(c) for c in cases]
    blocks = getattr(model, "blocks", None)
    outputs = lockstep(model, calls) if hasattr(blocks, "turns") else [call() for call in calls]
    rows = []
    for case, (logits, _, executed) in zip(cases, outputs):
        got, label = case["got"], case["setting"]
        want = logits.numpy().reshape(-1, logits.shape[-1]).astype(np.float64)
        have = got["logits"].reshape(-1, logits.shape[-1]).astype(np.float64)
        cos = (want * have).sum(-1) / (np.linalg.norm(want, axis=-1) * np.linalg.norm(have, axis=-1))
        row = {"setting": label, "step": case["step"], "logit_cosine_min": float(cos.min()),
               "argmax_agreement": float((want.argmax(-1) == have.argmax(-1)).mean()),
               "max_abs_diff": float(np.abs(want - have).max())}
        if spec.gated:
            row["executed_equal"] = bool(np.array_equal(got["executed"].astype(bool), executed.numpy()))
            if not row["executed_equal"]:
                raise EdgekitError(f"validation: skip pattern differs from PyTorch at {label}",
                                   "the stamped conditionals are wrong; export without --stream and report it")
        rows.append(row)
    worst = min(r["logit_cosine_min"] for r in rows)
    shared = hasattr(blocks, "turns")
    report = {"reference": "PyTorch, one block at a time from the same weights" + (", read once for all cases"
                                                                                  if shared else ""),
              "cases": rows, **({"block_loads": blocks.loads} if shared else {}), "logit_cosine_min": worst,
              "min_cosine": min_cosine, "passed": worst >= min_cosine}
    if not report["passed"]:
        raise EdgekitError(f"validation: logit cosine {worst:.4f} < {min_cosine} against PyTorch",
                           "the streamed graph is wrong; export without --stream and report it")
    return report
