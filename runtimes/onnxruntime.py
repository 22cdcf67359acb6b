"""ONNX Runtime: CPU, and the CUDA / TensorRT execution providers where the install has them.

Options: provider ("cpu" | "cuda" | "tensorrt"), threads (intra-op), spin (False: idle intra-op threads sleep
instead of spinning; export's validation sessions, on shared machines), iobinding (keep the KV cache in
OrtValues on the provider's device between steps; on by default for cuda/tensorrt). A GPU provider is
listed with the CPU provider as fallback, as ONNX Runtime recommends; `describe()` reports what the
session actually got.
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.spec import MASK
from runtimes.base import Runner, Session

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
INSTALL_HINT = {"cuda": "pip install onnxruntime-gpu (the build for your CUDA major version) on a machine with an "
                        "NVIDIA GPU",
                "tensorrt": "pip install onnxruntime-gpu and TensorRT on a machine with an NVIDIA GPU"}


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


class BoundSession(Session):
    """KV cache kept in OrtValues on the provider's device (IOBinding): only the logits come back."""

    def __init__(self, runner: OnnxRuntimeRunner, batch: int, thresholds=None):
        import onnxruntime as ort

        super().__init__(runner, batch, thresholds)
        dev = runner.io_device
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), dev, 0)
                       for n, v in self.cache.items()}
        self.cache = None

    def step(self, ids, mask=None) -> tuple[np.ndarray, np.ndarray | None]:
        ids = self.check(ids)
        r = self.runner
        full = self.extend_mask(ids, mask)
        binding = r.ort_session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        if r.has_mask:
            binding.bind_cpu_input(MASK, full)
        elif not full.all():
            raise r.no_mask_error()
        for name, value in self.values.items():
            binding.bind_ortvalue_input(name, value)
        for name in r.output_names:
            binding.bind_output(name, "cpu" if name in ("logits", "executed") else r.io_device)
        r.ort_session.run_with_iobinding(binding)
        out = dict(zip(r.output_names, binding.get_outputs()))
        for past, present in zip(r.spec.past_names(), r.spec.present_names()):
            self.values[past] = out[present]
        self.keep_mask(full, self.values[r.spec.past_names()[0]].shape()[2])
        self.length += ids.shape[1]
        executed = out["executed"].numpy().reshape(-1) if "executed" in out else None
        return out["logits"].numpy()[:, -1], executed


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def activate_impl(self) -> None:
        import onnxruntime as ort

        if self.resolved.kind != "onnx":
            raise EdgekitError(f"onnxruntime runs ONNX artifacts; {self.resolved.name} is a {self.resolved.kind}",
                               "export it first: edgekit export MODEL --format onnx --out DIR")
        provider = self.options.get("provider") or "cpu"
        if provider not in PROVIDERS:
            raise EdgekitError(f"unknown provider '{provider}'", f"use one of {', '.join(PROVIDERS)}")
        available = ort.get_available_providers()
        if PROVIDERS[provider] not in available:
            raise EdgekitError(f"this onnxruntime ({ort.__version__}) has no {PROVIDERS[provider]} "
                               f"(available: {', '.join(available)})",
                               f"{INSTALL_HINT.get(provider, '')}, or use --provider cpu".lstrip(", "))
        so = ort.SessionOptions()
        if self.options.get("threads"):
            so.intra_op_num_threads = int(self.options["threads"])
        if self.options.get("spin") is False:  # idle threads sleep instead of spinning (a shared machine)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = self.resolved.path / self.resolved.manifest.get("model_file", "model.onnx")
        providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
        self.provider = provider
        try:
            self.ort_session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime's InvalidProtobuf / Fail / ...: pybind classes, no common base
            raise EdgekitError(f"onnxruntime cannot load {path}: {_first_line(e)}",
                               "the model file or its external data is damaged; export the artifact again") from None
        if PROVIDERS[provider] not in self.ort_session.get_providers():
            # onnxruntime-gpu lists TensorRT (and CUDA) whether or not their libraries load; when one does not,
            # it falls back to the CPU provider on its own (seen on an H200 without TensorRT's libraries)
            raise EdgekitError(f"onnxruntime {ort.__version__} lists {PROVIDERS[provider]} but could not start it "
                               f"(the session got {', '.join(self.ort_session.get_providers())})",
                               f"install its libraries ({INSTALL_HINT.get(provider, '')}), or use --provider cpu")
        self.notes = []
        fusion = self.resolved.manifest.get("fusion") or {}
        if provider != "cpu" and fusion.get("GroupQueryAttention"):
            self.notes.append("this graph's fp32 GroupQueryAttention has no CUDA kernel: ONNX Runtime runs it on the "
                              "CPU, copying every layer's activations across (bench/results/gpu_h200.json: no faster "
                              "than 16 CPU threads); export with --no-fuse for a GPU")
        inputs = [i.name for i in self.ort_session.get_inputs()]
        # an artifact exported before attention masks runs unpadded input (the mask is then not fed)
        self.has_mask = MASK in inputs
        if sorted(inputs) != sorted(n for n in self.spec.input_names if n != MASK or self.has_mask):
            missing = sorted(set(self.spec.input_names) - set(inputs))
            extra = sorted(set(inputs) - set(self.spec.input_names))
            raise EdgekitError(f"{path} does not match config.json (n_layers {self.cfg.n_layers}): graph inputs "
                               f"missing {missing[:3]}, unexpected {extra[:3]}",
                               "the graph and config.json come from different models; export the artifact again")
        self.output_names = [o.name for o in self.ort_session.get_outputs()]
        self.io_device = "cpu" if provider == "cpu" else "cuda"
        use = self.options.get("iobinding")
        self.iobinding = (provider != "cpu") if use is None else bool(use)

    def describe(self) -> dict:
        import onnxruntime as ort

        so = self.ort_session.get_session_options()
        return {"runtime": self.name, "provider": self.provider, "providers_active": self.ort_session.get_providers(),
                "precision": self.resolved.manifest.get("precision", "fp32"), "onnxruntime": ort.__version__,
                "threads": so.intra_op_num_threads or None, "iobinding": self.iobinding,
                "spinning": self.options.get("spin") is not False, **({"notes": self.notes} if self.notes else {})}

    def no_mask_error(self) -> EdgekitError:
        return EdgekitError(f"{self.resolved.name} was exported before attention masks: its graph has no "
                            f"'{MASK}' input, so it cannot run left-padded rows",
                            "export it again with this edgekit")

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.has_mask:
            if not feeds[MASK].all():
                raise self.no_mask_error()
            feeds = {n: v for n, v in feeds.items() if n != MASK}
        try:
            return dict(zip(self.output_names, self.ort_session.run(self.output_names, feeds)))
        except Exception as e:  # a graph that loads but cannot run (damaged external data, wrong shapes)
            raise EdgekitError(f"onnxruntime failed running {self.resolved.name}: {_first_line(e)}",
                               "the artifact is damaged or does not match its config.json; export it again") \
                from None

    def session_impl(self, batch: int, thresholds) -> Session:
        return BoundSession(self, batch, thresholds) if self.iobinding else Session(self, batch, thresholds)

    def deactivate_impl(self) -> None:
        del self.ort_session
