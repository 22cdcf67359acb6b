"""PyTorch runtime: presets and checkpoints (fp32 / fp16 / bf16, and the torch-int8 checkpoint from
`edgekit quantize`), on CPU or CUDA.

Options: dtype ("fp32" | "fp16" | "bf16"), device ("cpu" | "cuda" | "cuda:N"), threads (CPU intra-op).
The KV-cache session keeps the cache as tensors on the device; only the last position's logits (and
R1's executed flags) come back to the host each step, which also synchronises CUDA for timing. R1's cache is
its model's RoutedCache: pre-allocated K/V buffers written in place plus the mean K of every completed block,
so a decode step routes over the block summaries and reads only the selected blocks (no copy of the cache).
A full-size preset (fp32 weights above config.FULL_SIZE_BYTES) profiled on a GPU draws its seeded random
weights on that GPU when they fit there in fp32: the CPU draws ~45 M parameters/s, minutes for r1-8.5b. Such a
model's weights then differ from the CPU's draw of the same seed; smaller presets are drawn on the CPU as always.
"""

from __future__ import annotations

import copy

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.spec import MASK
from runtimes.base import Runner, Session

DTYPES = ("fp32", "fp16", "bf16")


class TorchSession(Session):
    def __init__(self, runner: TorchRunner, batch: int, thresholds=None):
        import torch

        self.runner, self.batch, self.length = runner, batch, 0
        self.mask = np.ones((batch, 0), np.int64)
        model = runner.model
        # R1: a RoutedCache (K/V written in place, block summaries: a decode step reads k + 1 blocks, not the cache)
        new_cache = getattr(model, "new_cache", None)
        self.past = (new_cache or model.empty_past)(batch, runner.device, runner.act_dtype)
        self.thresholds = None
        if runner.spec.gated:
            thr = runner.cfg.default_threshold if thresholds is None else thresholds
            thr = np.broadcast_to(np.asarray(thr, np.float32), (runner.cfg.n_layers,)).copy()
            self.thresholds = torch.from_numpy(thr).to(runner.device)

    def step(self, ids, mask=None) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        ids = self.check(ids)
        r = self.runner
        full = self.extend_mask(ids, mask)
        # no padding: no mask (R1 keeps its RoutedCache); padding: R1 continues on the plain (k, v) cache
        attn = torch.from_numpy(full).to(r.device) if not full.all() else None
        with torch.inference_mode():
            logits, self.past, executed = r.model(torch.from_numpy(ids).to(r.device), self.past, self.thresholds,
                                                  attention_mask=attn)
            last = logits[:, -1].float().cpu().numpy()
            flags = executed.cpu().numpy().reshape(-1) if r.spec.gated else None
        self.keep_mask(full, getattr(self.past, "length", None) or self.past[0][0].shape[2])
        self.length += ids.shape[1]
        return last, flags


def _preset_on_gpu(res, device: str):
    """A full-size preset built directly on `device` (CUDA) when its fp32 weights fit there; else None."""
    if res.kind != "preset" or not device.startswith("cuda"):
        return None
    import torch

    from edgekit.config import FULL_SIZE_BYTES
    from edgekit.models import build, fp32_bytes

    need = fp32_bytes(res.cfg)
    if need <= FULL_SIZE_BYTES or need > 0.9 * torch.cuda.mem_get_info(torch.device(device))[0]:
        return None
    return build(res.cfg, device=device)


class TorchRunner(Runner):
    name = "torch"

    def activate_impl(self) -> None:
        import torch

        dtype = self.options.get("dtype") or "fp32"
        device = self.options.get("device") or "cpu"
        if dtype not in DTYPES:
            raise EdgekitError(f"torch runtime: unknown dtype '{dtype}'", f"use one of {', '.join(DTYPES)}")
        if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
            raise EdgekitError(f"torch runtime: unknown device '{device}'", "use cpu, cuda or cuda:N")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise EdgekitError("torch runtime: CUDA requested but no CUDA GPU is visible "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})",
                               "use --device cpu, or install a CUDA build of torch on a GPU machine")
        if self.options.get("threads"):
            torch.set_num_threads(int(self.options["threads"]))
        given = self.resolved.model is not None
        from edgekit.checkpoint import load_model

        model = _preset_on_gpu(self.resolved, device) if not given else None
        model = model if model is not None else load_model(self.resolved)
        self.quantized = bool(getattr(model, "quantized", False))
        if self.quantized and (dtype != "fp32" or device != "cpu"):
            raise EdgekitError(f"{self.resolved.name} is a torch-int8 checkpoint: it runs in fp32 on the CPU only "
                               "(torch's dynamic int8 Linear is a CPU kernel)",
                               "drop --dtype/--device, or profile the fp32 model on the GPU")
        self.dtype_name, self.device = dtype, torch.device(device)
        self.torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        if given and (dtype != "fp32" or device != "cpu"):
            model = copy.deepcopy(model)  # never convert a caller's model in place
        self.model = model if self.quantized else model.to(self.device, self.torch_dtype)
        # int8 Linears return fp32 whatever comes in: the cache follows the embedding's dtype
        self.act_dtype = self.model.embed.weight.dtype

    def describe(self) -> dict:
        import torch

        d = {"runtime": self.name, "dtype": self.dtype_name, "device": str(self.device),
             "threads": torch.get_num_threads(), "precision": "int8" if self.quantized else self.dtype_name}
        if self.device.type == "cuda":
            d["cuda_device"] = torch.cuda.get_device_name(self.device)
        return d

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        def t(name, dtype=None):
            return torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device, dtype or self.act_dtype)

        past = [(t(k), t(v)) for k, v in zip(self.spec.past_names()[::2], self.spec.past_names()[1::2])]
        thr = t("thresholds", torch.float32) if self.spec.gated else None
        with torch.inference_mode():
            logits, presents, executed = self.model(t("input_ids", torch.long), past, thr,
                                                    attention_mask=t(MASK, torch.long))
        out = {"logits": logits.float().cpu().numpy()}
        names = iter(self.spec.present_names())
        for k, v in presents:
            out[next(names)] = k.float().cpu().numpy()
            out[next(names)] = v.float().cpu().numpy()
        if self.spec.gated:
            out["executed"] = executed.cpu().numpy()
        return out

    def session_impl(self, batch: int, thresholds) -> TorchSession:
        return TorchSession(self, batch, thresholds)

    def deactivate_impl(self) -> None:
        import torch

        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
