"""PyTorch runtime: presets and checkpoints, fp32 / fp16 / bf16, CPU or CUDA."""

from __future__ import annotations

import numpy as np

from edgekit.errors import EdgekitError
from runtimes.base import Runner

DTYPES = ("fp32", "fp16", "bf16")


class TorchRunner(Runner):
    name = "torch"

    def activate_impl(self) -> None:
        import torch

        dtype = self.options.get("dtype", "fp32")
        device = self.options.get("device", "cpu")
        if dtype not in DTYPES:
            raise EdgekitError(f"torch runtime: unknown dtype '{dtype}'", f"use one of {', '.join(DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EdgekitError("torch runtime: CUDA requested but no CUDA GPU is visible", "use --device cpu")
        if self.options.get("threads"):
            torch.set_num_threads(int(self.options["threads"]))
        self.torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        self.device = torch.device(device)
        self.model = self.resolved.load_model().to(self.device, self.torch_dtype)

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        def t(name, dtype=None):
            return torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device, dtype or self.torch_dtype)

        past = [(t(k), t(v)) for k, v in zip(self.spec.past_names()[::2], self.spec.past_names()[1::2])]
        thr = t("thresholds", torch.float32) if self.spec.gated else None
        with torch.inference_mode():
            logits, presents, executed = self.model(t("input_ids", torch.long), past, thr)
        out = {"logits": logits.float().cpu().numpy()}
        names = iter(self.spec.present_names())
        for k, v in presents:
            out[next(names)] = k.float().cpu().numpy()
            out[next(names)] = v.float().cpu().numpy()
        if self.spec.gated:
            out["executed"] = executed.cpu().numpy()
        return out

    def deactivate_impl(self) -> None:
        del self.model
