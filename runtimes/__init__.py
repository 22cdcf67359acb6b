"""Runtimes: one module per engine (torch, onnxruntime, tensorrt), one lifecycle (base.Runner)."""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import unknown_name

RUNTIMES = ("torch", "onnxruntime", "tensorrt")


def open_runner(target: str | Path, runtime: str | None = None, **options):
    """A runner (not yet activated) for a preset name, checkpoint directory or artifact.

    With runtime=None the artifact's own format decides: ONNX -> onnxruntime, engine -> tensorrt,
    checkpoint or preset -> torch.
    """
    from edgekit.resolve import resolve

    res = resolve(target)
    runtime = runtime or res.default_runtime
    if runtime not in RUNTIMES:
        raise unknown_name("runtime", runtime, RUNTIMES)
    if runtime == "torch":
        from runtimes.torch import TorchRunner

        return TorchRunner(res, **options)
    if runtime == "onnxruntime":
        from runtimes.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(res, **options)
    from runtimes.tensorrt import TensorRTRunner

    return TensorRTRunner(res, **options)
