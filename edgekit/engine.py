"""TensorRT workflows (layer 5): `edgekit export --format tensorrt` (the exporter writes graph + recipe; here it
is validated in ONNX Runtime and, where this machine is the target, the engine is built and validated) and
`edgekit build-engine`: build a TensorRT artifact's engine on this machine and check it before it is kept.

A workflow (layer 5): it reads the artifact (edgekit.artifact), checks the recipe against this machine's
TensorRT and GPU (edgekit.versions.compatible: the rule `edgekit install` uses too), builds with
runtimes.tensorrt_build, and validates the engine against the artifact's ONNX graph in ONNX Runtime
(edgekit.validate) before renaming it into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.versions import compatible
from runtimes.tensorrt import ENGINE_JSON, tensorrt_environment
from runtimes.tensorrt_build import build_from_recipe, read_recipe, tempfile_dir


def export(model, tmp_dir: Path, device: str, context: int | None = None, precision: str = "fp16",
           progress=None, min_cosine: float | None = None) -> dict:
    """exporters.tensorrt.export, then: the graph vs PyTorch with the weights it stores (does it compute what it
    stores? cosine >= GRAPH_COSINE), vs fp32 PyTorch (what did the precision cost? the floor), and on a machine
    that is the target, the engine built and validated. Returns the manifest fields."""
    from edgekit.validate import against_torch
    from exporters import tensorrt as trt_exporter

    def step(description: str):
        if progress:
            progress(1, description=description)

    prepared = trt_exporter.export(model, tmp_dir, device, context, precision, progress, min_cosine)
    fields, recipe, stored, floor = (prepared[k] for k in ("fields", "recipe", "stored", "floor"))
    step("validating the graph in ONNX Runtime (CPU)")
    session = trt_exporter.CpuSession(Path(tmp_dir) / trt_exporter.MODEL_FILE)
    validation = {}
    if stored is not model:  # first: does the graph compute what it stores?
        validation["vs_stored_weights"] = against_torch(stored, session, trt_exporter.GRAPH_COSINE)
    try:  # then: how much did storing it at this precision cost?
        validation["vs_fp32"] = against_torch(model, session, floor)
    except EdgekitError as e:
        exact = validation.get("vs_stored_weights", {}).get("logit_cosine_mean")
        raise EdgekitError(f"{precision} fidelity: {e.message}" + (
            f" (the graph itself matches PyTorch with the stored weights: cosine {exact:.6f}; the loss is "
            f"{precision}'s)" if exact else ""), "lower --min-cosine only if you accept the loss") from None
    fields["validation"] = {"onnxruntime_cpu": validation}
    why_not = trt_exporter.engine_not_buildable_here(recipe)
    if why_not is None:
        step("building the TensorRT engine")
        engine = build_from_recipe(Path(tmp_dir), recipe)
        step("validating the engine against PyTorch")
        engine["validation"] = _validate_engine_vs_torch(stored, Path(tmp_dir), model.cfg)
        fields["engine"] = engine
    else:
        from exporters.trt_recipe import not_built

        fields["engine"] = not_built(recipe, why_not)
    return fields


def _validate_engine_vs_torch(model, directory: Path, cfg) -> dict:
    """Engine outputs vs PyTorch running the weights the graph stores, on the seeded cases, at fp16 tolerance."""
    from edgekit.resolve import Resolved
    from edgekit.validate import against_torch
    from exporters.tensorrt import GRAPH_COSINE
    from runtimes.tensorrt import TensorRTRunner

    with TensorRTRunner(Resolved("engine", cfg.name, cfg, Path(directory), {})) as runner:
        return against_torch(model, runner, GRAPH_COSINE)


def build_engine(target: str | Path, recipe: str | Path | None = None, force: bool = False, log=None) -> dict:
    """`edgekit build-engine`: build the engine of a TensorRT artifact or installed bundle on this machine from
    its recipe, check it against the artifact's ONNX graph (ONNX Runtime, CPU, seeded cases), and add
    model.engine, timing.cache and engine.json to the directory. Each file is written to a temporary name and
    renamed into place, model.engine last, so an interrupted build leaves no engine behind; the hashed manifest
    (and a bundle's bundle.json) is not rewritten, which keeps a bundle's signature valid.

    Refuses where TensorRT or a GPU is missing, and a recipe made for another SM or TensorRT unless `force`."""
    from edgekit.artifact import read_manifest

    path = Path(target)
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        raise EdgekitError(f"{path} is a bundle file", "install it first (edgekit install BUNDLE --dest DIR; "
                           "install builds the engine where it can), then: edgekit build-engine DIR")
    if not path.is_dir():
        raise EdgekitError(f"{path} does not exist or is not a directory", "pass a TensorRT artifact directory")
    manifest = read_manifest(path)
    if manifest.get("format") != "tensorrt":
        raise EdgekitError(f"{path} is a {manifest.get('format')} artifact, not a TensorRT one",
                           "export it with: edgekit export MODEL --format tensorrt --device DEVICE --out DIR")
    recipe = read_recipe(Path(recipe).parent if recipe else path)
    trt, version, sm = tensorrt_environment()
    mismatch = []
    if not compatible(version, recipe["tensorrt"]["versions"]):
        mismatch.append(f"TensorRT {version} here, recipe made for {', '.join(recipe['tensorrt']['versions'])}")
    if recipe.get("sm") and recipe["sm"] != sm:
        mismatch.append(f"GPU sm_{sm.replace('.', '')} here, recipe made for sm_{recipe['sm'].replace('.', '')} "
                        f"({recipe['device']})")
    if mismatch and not force:
        raise EdgekitError(f"recipe mismatch: {'; '.join(mismatch)}",
                           "re-export for this device, or pass --force to build anyway")
    engine_path = path / recipe["engine"]
    if engine_path.is_file() and not force:
        raise EdgekitError(f"{path} already has {recipe['engine']}", "pass --force to rebuild it")
    with tempfile_dir(path) as work:
        if (path / recipe["timing_cache"]).is_file():  # reuse an earlier cache: faster rebuilds
            (work / recipe["timing_cache"]).write_bytes((path / recipe["timing_cache"]).read_bytes())
        (work / recipe["onnx"]).symlink_to((path / recipe["onnx"]).resolve())
        for extra in path.glob(recipe["onnx"] + ".data"):
            (work / extra.name).symlink_to(extra.resolve())
        facts = build_from_recipe(work, recipe, log=log)
        facts["forced"] = bool(mismatch)
        facts["mismatch"] = mismatch
        facts["validation"] = _validate_engine_vs_onnx(work, path, recipe)
        (work / ENGINE_JSON).write_text(json.dumps(facts, indent=1))
        for name in (recipe["timing_cache"], ENGINE_JSON, recipe["engine"]):
            os.replace(work / name, path / name)
    return {"artifact": str(path), **facts}


def _validate_engine_vs_onnx(work: Path, artifact: Path, recipe: dict) -> dict:
    """On the device there may be no PyTorch model, but the artifact's ONNX graph (validated against PyTorch at
    export) is the reference: the engine must agree with it in ONNX Runtime on the seeded cases."""
    from edgekit.config import read_config
    from edgekit.resolve import Resolved
    from edgekit.spec import DecoderSpec
    from edgekit.validate import validate
    from exporters.tensorrt import GRAPH_COSINE, CpuSession
    from runtimes.tensorrt import TensorRTRunner

    cfg = read_config(artifact)
    reference = CpuSession(Path(artifact) / recipe["onnx"])
    runner = TensorRTRunner(Resolved("engine", cfg.name, cfg, Path(work), {}), engine=Path(work) / recipe["engine"])
    with runner:
        report = validate(reference, runner, DecoderSpec(cfg), tolerance=None, min_cosine=GRAPH_COSINE)
    return {k: report[k] for k in ("logit_cosine_mean", "logit_cosine_min", "argmax_agreement", "max_abs_diff",
                                   "passed") if k in report} | {"reference": "onnxruntime (CPU) on the artifact's ONNX"}
