"""The TensorRT runner. Without TensorRT or a GPU (CPU CI) it must refuse in one line, never with an
ImportError; the engine build and run are marked `tensorrt` and skip with the reason where they cannot run."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import runtimes.tensorrt as rt
from edgekit.artifact import write_manifest
from edgekit.engine import build_engine
from edgekit.errors import EdgekitError
from edgekit.models import preset
from exporters.tensorrt import GRAPH_COSINE
from runtimes import open_runner


def engine_artifact(tmp_path, facts=None, engine=True):
    """A TensorRT artifact directory holding an engine file (its bytes never reach TensorRT in these tests)."""
    art = tmp_path / "art"
    art.mkdir()
    (art / "config.json").write_text(json.dumps(preset("r1-tiny").to_dict()))
    if engine:
        (art / rt.ENGINE_FILE).write_bytes(b"not an engine")
    if facts is not None:
        (art / rt.ENGINE_JSON).write_text(json.dumps(facts))
    write_manifest(art, format="tensorrt", model="r1-tiny", precision="fp16")
    return art


class FakeTRT:
    __version__ = "10.3.0.26"


def test_an_engine_artifact_opens_the_tensorrt_runner(tmp_path):
    runner = open_runner(engine_artifact(tmp_path))
    assert runner.name == "tensorrt" and runner.spec.gated


def test_without_tensorrt_activate_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(EdgekitError, match="TensorRT is not installed.*pip install 'edgekit\\[tensorrt\\]'"):
        open_runner(engine_artifact(tmp_path)).activate()


def test_without_a_gpu_activate_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(rt, "load_tensorrt", lambda: FakeTRT)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(EdgekitError, match="no CUDA GPU is visible"):
        open_runner(engine_artifact(tmp_path)).activate()


def gpu_here(monkeypatch, sm=(8, 7)):
    monkeypatch.setattr(rt, "load_tensorrt", lambda: FakeTRT)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda *a: sm)


def test_an_artifact_without_engine_says_how_to_build_it(tmp_path, monkeypatch):
    gpu_here(monkeypatch)
    art = engine_artifact(tmp_path, engine=False)
    with pytest.raises(EdgekitError, match="has no TensorRT engine.*edgekit build-engine"):
        open_runner(art, runtime="tensorrt").activate()


def test_an_engine_built_for_another_gpu_or_tensorrt_is_refused(tmp_path, monkeypatch):
    gpu_here(monkeypatch, sm=(8, 0))
    art = engine_artifact(tmp_path, facts={"status": "built", "tensorrt": "10.3.0.26", "sm": "8.7"})
    with pytest.raises(EdgekitError, match="built with TensorRT 10.3.0.26 for sm_87; this machine has .* sm_80.*"
                                           "build-engine .* --force"):
        open_runner(art).activate()


# ------------------------------------------------------------------------------------------------
# on a machine with TensorRT and a GPU
# ------------------------------------------------------------------------------------------------
def _target_profile() -> str | None:
    import torch

    import profiles

    return profiles.match(torch.cuda.get_device_name(0),
                          torch.cuda.get_device_properties(0).total_memory / (1 << 30))


@pytest.fixture(scope="module")
def built_artifact(tmp_path_factory):
    why = rt.tensorrt_available()
    if why:
        pytest.skip(f"needs TensorRT and a GPU: {why}")
    device = _target_profile()
    if device is None:
        pytest.skip("no profiles/*.toml matches this GPU: add one to export for it")
    from edgekit import api

    out = tmp_path_factory.mktemp("trt") / "r1-tiny"
    r = api.export("r1-tiny", "tensorrt", out, device=device)
    if r["engine"]["status"] != "built":
        pytest.skip(f"export did not build here: {r['engine']['why']}")
    return out, r


@pytest.mark.tensorrt
def test_export_builds_and_validates_the_engine_here(built_artifact):
    _out, r = built_artifact
    e = r["engine"]
    assert e["file"] == rt.ENGINE_FILE and e["tensorrt"] and e["sm"]
    assert e["validation"]["passed"] and e["validation"]["logit_cosine_mean"] >= GRAPH_COSINE


@pytest.mark.tensorrt
def test_engine_runs_prefill_and_decode_like_onnxruntime(built_artifact):
    out, _r = built_artifact
    with open_runner(out) as trt_runner, open_runner(out, runtime="onnxruntime") as ort_runner:
        assert trt_runner.name == "tensorrt"
        a, b = trt_runner.session(2, thresholds=0.0), ort_runner.session(2, thresholds=0.0)
        prompt = np.array([[256, 104, 101, 108, 108, 111]] * 2)
        for ids in (prompt, np.array([[32], [32]]), np.array([[119], [119]])):
            (la, ea), (lb, eb) = a.step(ids), b.step(ids)
            cos = (la * lb).sum(-1) / np.linalg.norm(la, axis=-1) / np.linalg.norm(lb, axis=-1)
            assert cos.min() > GRAPH_COSINE
            np.testing.assert_array_equal(ea, eb)


@pytest.mark.tensorrt
def test_build_engine_rebuilds_with_force_and_keeps_the_manifest_valid(built_artifact):
    from edgekit.artifact import read_manifest

    out, _r = built_artifact
    with pytest.raises(EdgekitError, match="already has"):
        build_engine(out)
    r = build_engine(out, force=True)
    assert r["status"] == "built" and r["validation"]["passed"] and not r["forced"]
    read_manifest(out)
