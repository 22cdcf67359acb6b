"""The runner lifecycle and the KV-cache session on every runtime this machine has: torch (fp32, bf16,
fp16, int8 checkpoint; CUDA where present) and onnxruntime (CPU; IOBinding path; GPU providers where
installed). Runtimes agree on the same seeded inputs."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.resolve import resolve
from edgekit.spec import DecoderSpec
from runtimes import open_runner
from runtimes.base import Session

PROMPT = np.random.default_rng(7).integers(0, 256, (2, 9), dtype=np.int64)


def run_session(runner, thresholds=None, steps: int = 4, batch: int = 2) -> tuple[np.ndarray, list]:
    """Prefill PROMPT, then greedy decode: stacked last-position logits [steps+1, B, V] and executed flags."""
    sess = runner.session(batch, thresholds)
    logits, executed = sess.step(PROMPT[:batch])
    out, flags = [logits], [executed]
    for _ in range(steps):
        logits, executed = sess.step(logits.argmax(-1)[:, None])
        out.append(logits)
        flags.append(executed)
    assert sess.length == PROMPT.shape[1] + steps
    return np.stack(out), flags


@pytest.mark.parametrize("name", ["r1-tiny", "v3-tiny"])
def test_torch_session_matches_numpy_session(name):
    """The torch session (cache kept as tensors) equals the generic numpy session over `infer`."""
    with open_runner(name, "torch") as r:
        fast, flags = run_session(r, 0.5 if name.startswith("r1") else None)
        generic = Session(r, 2, 0.5 if name.startswith("r1") else None)
        logits, _ = generic.step(PROMPT)
        ref = [logits]
        for _ in range(4):
            logits, _ = generic.step(logits.argmax(-1)[:, None])
            ref.append(logits)
    np.testing.assert_allclose(fast, np.stack(ref), atol=1e-5)
    assert (flags[0] is None) == name.startswith("v3")


@pytest.mark.parametrize("fixture", ["onnx_r1_tiny", "onnx_v3_tiny"])
def test_torch_and_onnxruntime_agree(fixture, request):
    art = request.getfixturevalue(fixture)
    gated = fixture.startswith("onnx_r1")
    for thr in ([0.0, 2.0, [0.0, 2.0, 0.0, 2.0]] if gated else [None]):
        with open_runner(resolve(art).manifest["source"], "torch") as t, open_runner(art, "onnxruntime") as o:
            a, fa = run_session(t, thr)
            b, fb = run_session(o, thr)
        np.testing.assert_allclose(a, b, atol=2e-4)
        if gated:
            assert all(np.array_equal(x, y) for x, y in zip(fa, fb))


def test_onnxruntime_threads_may_sleep_instead_of_spinning(onnx_r1_tiny):
    feeds = DecoderSpec(resolve(onnx_r1_tiny).cfg).dummy(1, 3, 0, seed=1)
    with open_runner(onnx_r1_tiny, "onnxruntime") as spin, open_runner(onnx_r1_tiny, "onnxruntime", spin=False) as rest:
        assert spin.describe()["spinning"] and not rest.describe()["spinning"]
        assert np.array_equal(spin.infer(feeds)["logits"], rest.infer(feeds)["logits"])


def test_onnxruntime_iobinding_session_matches(onnx_r1_tiny):
    with open_runner(onnx_r1_tiny, "onnxruntime") as plain, \
            open_runner(onnx_r1_tiny, "onnxruntime", iobinding=True) as bound:
        assert bound.describe()["iobinding"] and not plain.describe()["iobinding"]
        a, fa = run_session(plain, 0.5)
        b, fb = run_session(bound, 0.5)
    np.testing.assert_array_equal(a, b)
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb))


def test_generate_same_tokens_on_both_runtimes(onnx_r1_tiny):
    with open_runner("r1-tiny", "torch") as t, open_runner(onnx_r1_tiny) as o:
        assert o.name == "onnxruntime"
        assert t.generate([256, 72, 105], 8).tokens == o.generate([256, 72, 105], 8).tokens
        skipped = o.generate([256, 72, 105], 4, thresholds=2.0)
        assert skipped.skipped == 2 * 4 and skipped.layer_slots == 4 * 4  # 2 gated layers x 4 steps


@pytest.mark.parametrize("dtype,atol", [("bf16", 0.1), ("fp16", 0.05)])
def test_torch_reduced_precision_on_cpu(dtype, atol):
    with open_runner("v3-tiny", "torch") as ref, open_runner("v3-tiny", "torch", dtype=dtype) as low:
        assert low.describe()["dtype"] == dtype and low.describe()["precision"] == dtype
        a, _ = run_session(ref, steps=2)
        b, _ = run_session(low, steps=2)
    assert np.abs(a - b).max() < atol


def test_torch_runner_does_not_convert_a_callers_model():
    import torch

    from edgekit.models import build
    from edgekit.resolve import Resolved

    model = build("v3-tiny")
    with open_runner("v3-tiny", "torch") as r:
        res = Resolved("preset", "v3-tiny", r.cfg, model=model)
    from runtimes.torch import TorchRunner

    with TorchRunner(res, dtype="bf16"):
        pass
    assert model.embed.weight.dtype == torch.float32


def test_torch_int8_checkpoint(tmp_path):
    from edgekit import api

    out = api.quantize("r1-tiny", tmp_path / "q")
    with open_runner(out["out"], "torch") as q:
        assert q.describe()["precision"] == "int8"
        logits, _ = run_session(q, 0.5, steps=2)
        assert np.isfinite(logits).all()
    for opts in ({"dtype": "fp16"}, {"device": "cuda"}):
        with pytest.raises(EdgekitError, match="torch-int8 checkpoint|CUDA"):
            open_runner(out["out"], "torch", **opts).activate()


def test_lifecycle_and_user_errors(onnx_v3_tiny):
    r = open_runner("v3-tiny", "torch")
    with pytest.raises(EdgekitError, match="not active"):
        r.session()
    with r:
        with pytest.raises(EdgekitError, match="already active"):
            r.activate()
        with pytest.raises(EdgekitError, match=r"ids must be \[batch=2"):
            r.session(2).step(PROMPT[:1])
        with pytest.raises(EdgekitError, match="wrong inputs"):
            r.infer({"input_ids": PROMPT})
    assert not r.is_active
    with pytest.raises(EdgekitError, match="unknown dtype"):
        open_runner("v3-tiny", "torch", dtype="fp8").activate()
    with pytest.raises(EdgekitError, match="unknown device"):
        open_runner("v3-tiny", "torch", device="tpu").activate()
    with pytest.raises(EdgekitError, match="export it first"):
        open_runner("v3-tiny", "onnxruntime").activate()
    with pytest.raises(EdgekitError, match="unknown provider"):
        open_runner(onnx_v3_tiny, "onnxruntime", provider="rocm").activate()


def test_missing_gpu_is_a_clear_message(onnx_v3_tiny):
    import onnxruntime as ort
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the absent-GPU message cannot be shown")
    with pytest.raises(EdgekitError, match="no CUDA GPU is visible") as e:
        open_runner("v3-tiny", "torch", device="cuda").activate()
    assert "use --device cpu" in str(e.value)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(EdgekitError, match="has no CUDAExecutionProvider") as e:
        open_runner(onnx_v3_tiny, "onnxruntime", provider="cuda").activate()
    assert "onnxruntime-gpu" in str(e.value) and "--provider cpu" in str(e.value)


def test_torch_cuda_session_matches_cpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    with open_runner("r1-tiny", "torch") as cpu, open_runner("r1-tiny", "torch", device="cuda") as gpu:
        a, fa = run_session(cpu, 0.5)
        b, fb = run_session(gpu, 0.5)
        assert gpu.describe()["device"].startswith("cuda")
    np.testing.assert_allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_onnxruntime_gpu_provider(provider, onnx_r1_tiny):
    import onnxruntime as ort

    from runtimes.onnxruntime import PROVIDERS

    if PROVIDERS[provider] not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no {PROVIDERS[provider]}")
    try:
        open_runner(onnx_r1_tiny, "onnxruntime", provider=provider).activate()
    except EdgekitError as e:  # listed but its libraries are absent (onnxruntime-gpu without TensorRT)
        if "could not start" not in str(e):
            raise
        pytest.skip(str(e))
    with open_runner(onnx_r1_tiny, "onnxruntime") as cpu, \
            open_runner(onnx_r1_tiny, "onnxruntime", provider=provider) as gpu:
        assert gpu.describe()["iobinding"]
        a, _ = run_session(cpu, 0.5)
        b, _ = run_session(gpu, 0.5)
    np.testing.assert_allclose(a, b, atol=1e-2)


def test_a_listed_provider_that_does_not_start_is_an_error_not_a_silent_cpu_run(onnx_r1_tiny, monkeypatch):
    """onnxruntime-gpu lists TensorrtExecutionProvider without TensorRT's libraries and then runs on the CPU
    provider (seen on an H200); here a CPU-only onnxruntime is made to list CUDA the same way."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(UserWarning), pytest.raises(EdgekitError, match="lists CUDAExecutionProvider but could not "
                                                                      "start it .*got CPUExecutionProvider"):
        open_runner(onnx_r1_tiny, "onnxruntime", provider="cuda").activate()


def chunked_vs_one_call(one, chunked, prompt, thresholds=None, steps: int = 3):
    """Prefill `prompt` in one call on `one` and in chunks on `chunked`, then greedy decode on both:
    the largest logit difference over all steps, the executed flags of both prefills, and the chunk calls."""
    a, b = one.session(prompt.shape[0], thresholds), chunked.session(prompt.shape[0], thresholds)
    calls = []
    inner_step = b.inner.step
    b.inner.step = lambda ids, *rest: calls.append(ids.shape[1]) or inner_step(ids, *rest)
    la, ea = a.step(prompt)
    lb, eb = b.step(prompt)
    diff = [np.abs(la - lb).max()]
    for _ in range(steps):
        tok = la.argmax(-1)[:, None]
        la, _ = a.step(tok)
        lb, _ = b.step(tok)
        diff.append(np.abs(la - lb).max())
    assert a.length == b.length == prompt.shape[1] + steps
    return max(diff), (ea, eb), calls


@pytest.mark.parametrize("name, length, chunk, thresholds", [
    ("v3-tiny", 700, 128, None),  # past v3-tiny's 512-token segment memory: the chunks cross it
    ("r1-tiny", 300, 40, -1e9),   # every gate runs
    ("r1-tiny", 300, 40, [0.0, 2.0, 0.0, 2.0]),  # a skip pattern (the gates decide per call, here alike per chunk)
])
def test_chunked_prefill_matches_one_call_torch(name, length, chunk, thresholds):
    prompt = np.random.default_rng(3).integers(0, 256, (2, length), dtype=np.int64)
    with open_runner(name, "torch") as one, open_runner(name, "torch", prefill_chunk=chunk) as chunked:
        diff, (ea, eb), calls = chunked_vs_one_call(one, chunked, prompt, thresholds)
    assert calls == [chunk] * (length // chunk) + [length % chunk] + [1] * 3
    assert diff <= 1e-5
    assert (ea is None and eb is None) if name.startswith("v3") else np.array_equal(ea, eb)
    if thresholds == [0.0, 2.0, 0.0, 2.0]:
        assert not eb.all()  # something was skipped


@pytest.mark.parametrize("fixture", ["onnx_v3_tiny", "onnx_r1_tiny"])
def test_chunked_prefill_matches_one_call_onnxruntime(fixture, request):
    art = request.getfixturevalue(fixture)
    thresholds = -1e9 if fixture.startswith("onnx_r1") else None
    prompt = np.random.default_rng(4).integers(0, 256, (1, 600), dtype=np.int64)
    with open_runner(art, "onnxruntime") as one, open_runner(art, "onnxruntime", prefill_chunk=100) as chunked:
        diff, (ea, eb), calls = chunked_vs_one_call(one, chunked, prompt, thresholds)
    assert calls == [100] * 6 + [1] * 3
    assert diff <= 1e-4 and (ea is None or np.array_equal(ea, eb))


def test_prefill_chunk_is_checked():
    with pytest.raises(EdgekitError, match="--prefill-chunk"):
        open_runner("v3-tiny", "torch", prefill_chunk=0)
    with open_runner("v3-tiny", "torch", prefill_chunk=None) as r:
        assert isinstance(r.session(1), Session)  # default: the prompt in one call
