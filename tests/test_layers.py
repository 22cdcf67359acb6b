"""The layers of DESIGN.md / README "Architecture", enforced: every import between the project's own
modules (top-level or inside a function, read from the source text) points to the same layer or a
lower one; the bottom layer and the ONNX Runtime path never import torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edgekit", "exporters", "runtimes", "profiles")

# module (or package prefix) -> layer; the longest matching prefix wins
LAYERS = {
    # 1. bottom: no torch
    "edgekit.errors": 1, "edgekit.files": 1, "edgekit.versions": 1, "edgekit.config": 1,
    "edgekit.spec": 1, "edgekit.families": 1, "edgekit.hfconfig": 1, "edgekit.artifact": 1, "edgekit.resolve": 1,
    "edgekit.tokenizer": 1, "edgekit.generation": 1, "edgekit.progress": 1, "edgekit.tasks": 1,
    "edgekit.textdata": 1, "edgekit.structure": 1, "edgekit.quiet": 1,
    # 2. models: the only code that builds torch modules
    "edgekit.models": 2, "edgekit.checkpoint": 2, "edgekit.quantize": 2, "edgekit.gguf": 2,
    "edgekit.weights": 2,
    # 3. engines, exporters, device profiles
    "runtimes": 3, "exporters": 3, "profiles": 3,
    # 4. validation
    "edgekit.validate": 4,
    # 5. workflows
    "edgekit.api": 5, "edgekit.plan": 5, "edgekit.shapes": 5, "edgekit.profiling": 5, "edgekit.bundle": 5,
    "edgekit.calibrate": 5, "edgekit.telemetry": 5, "edgekit.device": 5, "edgekit.engine": 5, "edgekit.fleet": 5,
    "edgekit.serve": 5,
    "edgekit.streamed": 5,
    # 6. the face
    "edgekit.cli": 6, "edgekit.render": 6,
}
NO_TORCH = 1  # layers at or below this never import torch


def layer_of(module: str) -> int | None:
    if module == "edgekit":  # the package's __init__ (a version string); a prefix of everything else
        return 1
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return LAYERS[".".join(parts[:i])]
    return None


def modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, nested ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


def test_every_module_has_a_layer():
    assert [m for m in modules() if layer_of(m) is None] == []


def test_imports_point_down():
    bad = []
    for name, path in modules().items():
        mine = layer_of(name)
        for target, line in imports(name, path):
            theirs = layer_of(target) if target.split(".")[0] in PACKAGES else None
            if theirs is not None and theirs > mine:
                bad.append(f"{path.relative_to(ROOT)}:{line} (layer {mine}) imports {target} (layer {theirs})")
            if mine <= NO_TORCH and target.split(".")[0] == "torch":
                bad.append(f"{path.relative_to(ROOT)}:{line} (layer {mine}) imports torch")
    assert bad == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The checker itself: a function-level import of a workflow from a runtime is found."""
    f = tmp_path / "r.py"
    f.write_text("def f():\n    from edgekit import api\n    import torch\n")
    found = imports("runtimes.r", f)
    assert ("edgekit.api", 2) in found and ("torch", 3) in found
    assert layer_of("edgekit.api") > layer_of("runtimes.r")


@pytest.mark.parametrize("module", ["runtimes.onnxruntime", "edgekit.resolve", "edgekit.spec", "edgekit.artifact",
                                    "edgekit.hfconfig", "edgekit.config"])
def test_device_path_modules_do_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"


def test_running_an_onnx_artifact_leaves_torch_unloaded(onnx_v3_tiny):
    """The device path end to end: resolve an exported artifact, run it through ONNX Runtime and generate."""
    code = ("import sys\n"
            "from runtimes import open_runner\n"
            f"with open_runner({str(onnx_v3_tiny)!r}, 'onnxruntime') as r:\n"
            "    out = r.generate([1, 2, 3], 4)\n"
            "assert len(out.tokens) == 4, out\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_one_family_registry_decides_gating_and_source():
    from edgekit.config import preset
    from edgekit.families import family, is_gated, is_hf
    from edgekit.hfconfig import HFConfig

    assert is_gated(preset("r1-tiny")) and not is_gated(preset("v3-tiny"))
    hf = HFConfig("qwen2", "q", 2, 2, 8, 8, 100, 16, 64)
    assert is_hf(hf) and not is_gated(hf) and family(hf).tokenizer == "tokenizer.json"
    import dataclasses

    assert is_gated(dataclasses.replace(hf, gated_layers=(1,)))  # a calibrate-skip model
    assert family("r1").routed and family("v3").segment_memory


@pytest.mark.parametrize("name", ["v3-mini", "r1-mini", "v3-13b", "r1-8.5b"])
def test_one_kv_memory_formula_for_spec_recipe_profile_and_plan(name):
    """The KV cache is computed once (DecoderSpec.kv_bytes) and the plan's Shape-based arithmetic agrees."""
    from edgekit import plan
    from edgekit.config import preset
    from edgekit.spec import DecoderSpec
    from exporters.trt_recipe import memory_need

    cfg = preset(name)
    spec = DecoderSpec(cfg)
    for tokens in (1, 1000, 4096):
        assert plan.kv_bytes(plan.shape(cfg), "fp32", "cpu", tokens, 2) == spec.kv_bytes(2, tokens)
    # the recipe's past-in + present-out: both caches, with V3's segment memory truncating the present
    assert memory_need(cfg, 1, 1, 99) - memory_need(cfg, 1, 1, 0) > 0
    if cfg.memory_len:
        assert spec.kv_bytes(1, 10 * cfg.memory_len) == spec.kv_bytes(1, cfg.memory_len)
    else:
        assert spec.kv_bytes(1, 2000) == 2 * spec.kv_bytes(1, 1000)
