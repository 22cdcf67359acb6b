"""edgekit.validate: results apart from the verdict, tolerances that scale with the outputs, graphs broken
on purpose fail, recorded references replay."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgekit import validate
from edgekit.errors import EdgekitError
from edgekit.resolve import Resolved, resolve
from edgekit.spec import DecoderSpec
from runtimes import open_runner
from runtimes.onnxruntime import OnnxRuntimeRunner


def _results(diff: float, scale: float) -> dict:
    case = {"batch_seq_past": [1, 1, 0], "setting": "dense", "max_abs_diff": diff, "worst_output": "logits",
            "worst_relative_diff": diff / max(1.0, scale)}
    return {"cases": [case], "logit_cosine_mean": 0.9999}


def test_tolerance_scales_with_the_outputs():
    # a real model: logits O(10), an exact fp32 graph differs by up to 3.4e-3 (measured on SmolLM2-135M, max 32.1)
    assert validate.judge(_results(3.42e-3, 32.1), tolerance=1e-3)["passed"]
    assert validate.judge(_results(3.9e-4, 20.0), tolerance=1e-4)["passed"]
    with pytest.raises(EdgekitError, match="differs by"):
        validate.judge(_results(3.9e-4, 0.5), tolerance=1e-4)  # the same difference on O(1) outputs is wrong
    with pytest.raises(EdgekitError, match="differs by"):
        validate.judge(_results(0.5, 20.0), tolerance=1e-4)
    with pytest.raises(EdgekitError, match="logit cosine"):
        validate.judge(_results(0.0, 1.0), min_cosine=0.99999)


def test_nan_output_fails():
    ref = {"logits": np.ones((1, 1, 4), np.float32)}
    with pytest.raises(EdgekitError, match="not finite"):
        validate.compare_outputs(ref, {"logits": np.full((1, 1, 4), np.nan, np.float32)}, ["logits"])


def _broken_copy(artifact, tmp_path, scale: float):
    """The artifact with its largest MatMul weight multiplied by `scale` (the graph is otherwise intact)."""
    dst = tmp_path / f"broken-{scale}"
    shutil.copytree(artifact, dst)
    model = onnx.load(str(dst / "model.onnx"))
    big = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(big)
    big.CopyFrom(numpy_helper.from_array((w * scale).astype(w.dtype), big.name))
    for f in dst.glob("model.onnx*"):
        f.unlink()
    onnx.save(model, str(dst / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dst


@pytest.mark.parametrize("fixture,name", [("onnx_v3_tiny", "v3-tiny"), ("onnx_r1_tiny", "r1-tiny")])
def test_a_graph_broken_on_purpose_fails_and_the_intact_one_passes(fixture, name, request, tmp_path):
    artifact = request.getfixturevalue(fixture)
    res = resolve(artifact)
    spec = DecoderSpec(res.cfg)
    with open_runner(name, "torch") as ref, open_runner(artifact) as good:
        results = validate.run(ref, good, spec)
        assert validate.judge(results, tolerance=1e-4)["passed"]
        broken = _broken_copy(artifact, tmp_path, 1.01)
        with OnnxRuntimeRunner(Resolved("onnx", name, res.cfg, broken, res.manifest)) as bad:
            with pytest.raises(EdgekitError, match="differs by"):
                validate.judge(validate.run(ref, bad, spec), tolerance=1e-3)  # export's default
    # the results are a strict JSON document (saved, compared later)
    validate.save(results, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text())["cases"][0]["setting"] in ("dense", "run-all")


def test_a_recorded_reference_replays(onnx_v3_tiny, tmp_path):
    spec = DecoderSpec(resolve(onnx_v3_tiny).cfg)
    with open_runner("v3-tiny", "torch") as ref, open_runner(onnx_v3_tiny) as graph:
        recording = validate.Recording(ref)
        live = validate.run(recording, graph, spec)
        recording.save(tmp_path / "golden.npz")
        replayed = validate.run(validate.Recorded(tmp_path / "golden.npz"), graph, spec)
    assert replayed["max_abs_diff"] == live["max_abs_diff"] and replayed["logit_cosine_min"] == live["logit_cosine_min"]
    other = DecoderSpec(resolve("r1-tiny").cfg)  # other cases -> not recorded
    with pytest.raises(EdgekitError, match="not recorded"):
        validate.Recorded(tmp_path / "golden.npz").infer(other.dummy(1, 1, 0))


def test_perplexity_of_a_uniform_model_is_the_vocabulary():
    class Uniform:
        def infer(self, feeds):
            b, s = feeds["input_ids"].shape
            return {"logits": np.zeros((b, s, 50), np.float32)}

    spec = DecoderSpec(resolve("v3-tiny").cfg)
    r = validate.perplexity(Uniform(), spec, list(range(40)) * 10, window=32)
    assert r["ppl"] == pytest.approx(50.0) and r["windows"] == 8
    with pytest.raises(EdgekitError, match="at least"):
        validate.perplexity(Uniform(), spec, [1, 2, 3], window=32)


class _Offset:
    """Logits that give token (t + 1) % 40 -- the next token of ids = range(40) * k -- a log-likelihood `delta[t]`
    below a uniform model's; counts its calls."""

    def __init__(self, delta):
        self.delta, self.calls = np.asarray(delta, np.float32), 0

    def infer(self, feeds):
        self.calls += 1
        ids = feeds["input_ids"]
        logits = np.zeros((*ids.shape, 50), np.float32)
        b, s = np.indices(ids.shape)
        logits[b, s, (ids + 1) % 40] = -self.delta[ids]
        return {"logits": logits}


def _increase(delta, v=50):  # exp(mean per-token NLL difference) - 1, tokens 0..39 equally often
    d = np.log((v - 1 + np.exp(-np.asarray(delta, np.float64))) / v) + delta
    return float(np.expm1(d.mean()))


def test_the_perplexity_gate_stops_once_its_estimate_is_clear_of_the_limit():
    spec = DecoderSpec(resolve("v3-tiny").cfg)
    rng = np.random.default_rng(0)
    # lossless (+0.5 %, per-token sd ~0.03): clear of +2 % after the first two windows
    lossless = _Offset(0.005 + 0.03 * rng.standard_normal(40))
    r = validate.perplexity_gate(_Offset(np.zeros(40)), lossless, spec, list(range(40)) * 52, 0.02)
    assert r["windows"] == validate.GATE_MIN_WINDOWS == lossless.calls and r["stopped"] == "below the limit"
    assert r["tokens"] == 2 * 256 and r["increase_upper"] < 0.02
    assert r["reference"] == pytest.approx(50.0, rel=1e-6)
    assert r["increase"] == pytest.approx(_increase(lossless.delta[np.arange(512) % 40]), rel=1e-4)
    # +10 %: refused as soon as it is clear, without scoring the rest
    lossy = _Offset(np.full(40, 0.1))
    want = rf"perplexity 55.153 vs 50.000 \(\+{100 * _increase(lossy.delta):.2f} % > 2 %\)"
    with pytest.raises(EdgekitError, match=want):
        validate.perplexity_gate(_Offset(np.zeros(40)), lossy, spec, list(range(40)) * 52, 0.02)
    assert lossy.calls == validate.GATE_MIN_WINDOWS
    # near the limit with noisy tokens: never clear, every window scored and judged on the estimate
    z = rng.standard_normal(40)
    noisy = _Offset(0.016 + 0.1 * (z - z.mean()) / z.std())
    r = validate.perplexity_gate(_Offset(np.zeros(40)), noisy, spec, list(range(40)) * 52, 0.02)
    assert r["windows"] == noisy.calls == r["max_windows"] == 8 and r["stopped"] == "all windows"
    assert r["increase"] == pytest.approx(_increase(noisy.delta[np.arange(8 * 256) % 40]), rel=1e-4)
    assert r["increase"] < 0.02 < r["increase_upper"]
