"""One version parser and one TensorRT/JetPack compatibility rule (edgekit.versions), and proof that
`edgekit install` (edgekit.bundle.check_machine) and `edgekit build-engine` (edgekit.engine.build_engine) now give
the same answer for the same installed version and targets -- they disagreed before (issue 13)."""

from __future__ import annotations

import json

import pytest

from edgekit import bundle as bundles
from edgekit import engine
from edgekit.artifact import write_manifest
from edgekit.errors import EdgekitError
from edgekit.models import preset
from edgekit.versions import compatible, engine_loadable, version_tuple
from runtimes.tensorrt_build import RECIPE_FILE, RECIPE_VERSION


@pytest.mark.parametrize("text,want", [
    ("10.3", (10, 3)), ("10.3.0.26", (10, 3, 0, 26)), ("8.x", (8,)), ("10.x", (10,)), ("10", (10,)),
    ("10.3.0+cuda12.6", (10, 3, 0)), ("36.4.0-b12", (36, 4, 0)), ("1.2rc1", (1, 2)), ("8.7", (8, 7)),
    ("v6.2", (6, 2)), (" 6.2 ", (6, 2)), ("", ()), ("unknown", ()), (10, (10,)),
])
def test_version_tuple(text, want):
    assert version_tuple(text) == want


# (installed, targets, compatible): same major.minor, patch/build ignored; a major-only target takes the major
CASES = [
    ("8.6.1", ["8.5.2", "8.6.2"], True),  # the disagreement of issue 13: a patch release of a target's minor
    ("8.6.2.3", ["8.6.2"], True),
    ("10.3.0.30", ["8.5.2", "10.3"], True),
    ("10.3.1", ["8.6.2", "10.3"], True),
    ("8.6.2", ["8.5.2", "10.3"], False),
    ("10.7.0", ["10.3"], False),
    ("10.13.0", ["10.x"], True),
    ("10.3.0", ["8.6", "10"], True),
    ("9.1", ["8.6", "10"], False),
    ("8.5.2", ["10.x"], False),
    ("8.5", ["8.5.2"], True),
]


@pytest.mark.parametrize("installed,targets,ok", CASES)
def test_the_rule(installed, targets, ok):
    assert compatible(installed, targets) is ok


def test_a_single_target_and_nonsense():
    assert compatible("6.2.1", "6.2") and not compatible("6.0", "6.2")
    assert not compatible("", ["10.3"]) and not compatible("10.3", []) and not compatible("10.3", ["x"])


def install_says(installed: str, targets: list[str]) -> bool:
    """`edgekit install`'s machine check on a host with this TensorRT (everything else matches)."""
    compat = {"device": "a100-40gb", "kind": "gpu", "sm": "8.0", "tensorrt": targets, "min_memory_bytes": 1}
    host = {"arch": "x86_64", "memory_bytes": 1 << 30, "jetson": False, "sm": "8.0", "gpu_memory_bytes": 1 << 30,
            "tensorrt": installed}
    bad = bundles.check_machine(compat, {"runtime": "tensorrt"}, host)[1]
    assert all(b.startswith("TensorRT") for b in bad), bad
    return not bad


def build_engine_says(tmp_path, monkeypatch, installed: str, targets: list[str]) -> bool:
    """`edgekit build-engine` on a machine with this TensorRT and the recipe's SM: does it refuse the recipe?"""
    art = tmp_path / f"art-{installed}-{'-'.join(targets)}"
    art.mkdir()
    (art / "config.json").write_text(json.dumps(preset("r1-tiny").to_dict()))
    recipe = {"edgekit_recipe": RECIPE_VERSION, "sm": "8.0", "device": "a100-40gb", "onnx": "model.onnx",
              "engine": "model.engine", "timing_cache": "timing.cache", "precision": "fp16",
              "tensorrt": {"versions": targets, "refused": {}}, "builder_flags": ["FP16"]}
    (art / RECIPE_FILE).write_text(json.dumps(recipe))
    (art / "model.onnx").write_bytes(b"")
    write_manifest(art, format="tensorrt", model="r1-tiny", precision="fp16")

    def fake_build(directory, recipe, log=None):
        (directory / recipe["engine"]).write_bytes(b"engine")
        (directory / recipe["timing_cache"]).write_bytes(b"cache")
        return {"status": "built"}

    monkeypatch.setattr(engine, "tensorrt_environment", lambda: (None, installed, "8.0"))
    monkeypatch.setattr(engine, "build_from_recipe", fake_build)
    monkeypatch.setattr(engine, "_validate_engine_vs_onnx", lambda *a: {"passed": True})
    try:
        engine.build_engine(art)
    except EdgekitError as e:
        assert "recipe mismatch: TensorRT" in str(e)
        return False
    return True


@pytest.mark.parametrize("installed,targets,ok", CASES)
def test_install_and_build_engine_agree(tmp_path, monkeypatch, installed, targets, ok):
    assert install_says(installed, targets) is ok
    assert build_engine_says(tmp_path, monkeypatch, installed, targets) is ok


def test_jetpack_follows_the_same_rule():
    compat = {"device": "jetson-agx-orin-64gb", "kind": "jetson", "arch": "aarch64", "sm": "8.7",
              "tensorrt": ["10.3"], "jetpack": ["5.1.1", "6.2"], "min_memory_bytes": 1}
    orin = {"arch": "aarch64", "memory_bytes": 8 << 30, "jetson": True, "sm": "8.7", "tensorrt": "10.3.0.30"}
    for jetpack, ok in (("6.2.1", True), ("5.1.2", True), ("6.0", False), ("6.1", False)):
        bad = bundles.check_machine(compat, {"runtime": "tensorrt"}, {**orin, "jetpack": jetpack})[1]
        assert (bad == []) is ok and ok is compatible(jetpack, compat["jetpack"])


def test_loading_a_built_engine_needs_the_very_tensorrt_that_built_it():
    assert engine_loadable("10.3.0.26", "10.3.0.26") and engine_loadable("10.3.0.26", "10.3")
    assert not engine_loadable("10.3.0.30", "10.3.0.26")  # TensorRT itself refuses such a plan file
    assert not engine_loadable("10.3.0.26", "") and compatible("10.3.0.30", ["10.3.0.26"])  # rebuilding is fine
