"""Building a TensorRT engine on this device from an artifact's recipe (exporters/trt_recipe.py writes it).

The engine is tied to the TensorRT version and GPU architecture that build it (DESIGN.md), so it is built here,
next to the runner that loads it: read_recipe() reads and checks trt_recipe.json; build_from_recipe() parses
the ONNX graph, sets the builder flags, workspace, timing cache and optimization profiles, and serializes
model.engine. tensorrt is imported lazily (runtimes.tensorrt.load_tensorrt): where it or a GPU is missing the
build is a one-line EdgekitError. The `edgekit build-engine` workflow (checks, validation, atomic rename) is
edgekit/engine.py.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.versions import version_tuple
from runtimes.tensorrt import tensorrt_environment

RECIPE_FILE = "trt_recipe.json"
RECIPE_VERSION = 1
TIMING_CACHE_FILE = "timing.cache"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def read_recipe(directory: Path) -> dict:
    path = Path(directory) / RECIPE_FILE
    if not path.is_file():
        raise EdgekitError(f"{directory} has no {RECIPE_FILE}",
                           "export it with: edgekit export MODEL --format tensorrt --device DEVICE --out DIR")
    try:
        recipe = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgekitError(f"cannot read {path}: {e}", "re-export the artifact") from None
    if recipe.get("edgekit_recipe") != RECIPE_VERSION:
        raise EdgekitError(f"{path}: recipe version {recipe.get('edgekit_recipe')} is not {RECIPE_VERSION}",
                           "re-export with this edgekit")
    return recipe


def build_from_recipe(directory: Path, recipe: dict, log=None) -> dict:
    """Build model.engine (+ timing.cache) in `directory` from its ONNX model and recipe with TensorRT's Python
    API. Returns the engine facts for the manifest."""
    import time

    trt, version, sm = tensorrt_environment()
    directory, log = Path(directory), log or _stderr
    if version_tuple(version) < (8, 5):
        raise EdgekitError(f"TensorRT {version}: edgekit builds with the TensorRT 8.5+ Python API",
                           f"build with trtexec instead: {recipe['trtexec']}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if version_tuple(version)[0] >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = directory / recipe["onnx"]
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgekitError(f"TensorRT {version} cannot parse {onnx_path.name}: {'; '.join(errors[:5])}",
                           "check the artifact's op_check in manifest.json; re-export for this TensorRT")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(recipe["workspace_bytes"]))
    for name in recipe["builder_flags"]:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise EdgekitError(f"TensorRT {version} has no builder flag {name} (needed for {recipe['precision']})",
                               "use a TensorRT that supports it, or re-export at fp16")
        config.set_flag(flag)
    cache_path = directory / recipe["timing_cache"]
    timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(timing_cache, False)
    for prof in recipe["profiles"]:
        p = builder.create_optimization_profile()
        for name, s in prof["shapes"].items():
            p.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(p)
    log(f"building the TensorRT {version} engine for sm_{sm.replace('.', '')} ({recipe['precision']}); "
        "this takes minutes")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgekitError(f"TensorRT {version} failed to build the engine (its log above says why)",
                           "check free GPU memory and the recipe's workspace limit")
    (directory / recipe["engine"]).write_bytes(bytes(serialized))
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"status": "built", "file": recipe["engine"], "timing_cache": recipe["timing_cache"],
            "tensorrt": version, "sm": sm, "build_seconds": round(time.perf_counter() - t0, 1),
            "profiles": [p["name"] for p in recipe["profiles"]]}


@contextlib.contextmanager
def tempfile_dir(parent: Path):
    import shutil
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=".engine.", suffix=".partial", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
