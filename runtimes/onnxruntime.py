"""ONNX Runtime: CPU, and the CUDA / TensorRT execution providers where the install has them."""

from __future__ import annotations

import numpy as np

from edgekit.errors import EdgekitError
from runtimes.base import Runner

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def activate_impl(self) -> None:
        import onnxruntime as ort

        if self.resolved.kind != "onnx":
            raise EdgekitError(f"onnxruntime runs ONNX artifacts; {self.resolved.name} is a {self.resolved.kind}",
                               "export it first: edgekit export MODEL --format onnx --out DIR")
        provider = self.options.get("provider", "cpu")
        if provider not in PROVIDERS:
            raise EdgekitError(f"unknown provider '{provider}'", f"use one of {', '.join(PROVIDERS)}")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise EdgekitError(f"this onnxruntime has no {PROVIDERS[provider]} (available: {', '.join(available)})",
                               "install onnxruntime-gpu on a CUDA machine, or use --provider cpu")
        so = ort.SessionOptions()
        if self.options.get("threads"):
            so.intra_op_num_threads = int(self.options["threads"])
        path = self.resolved.path / self.resolved.manifest.get("model_file", "model.onnx")
        self.session = ort.InferenceSession(str(path), so, providers=[PROVIDERS[provider]])
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))

    def deactivate_impl(self) -> None:
        del self.session
