"""ONNX Runtime: CPU, and the CUDA / TensorRT execution providers where the install has them.

Options: provider ("cpu" | "cuda" | "tensorrt"), threads (intra-op), spin (False: idle intra-op threads sleep
instead of spinning; export's validation sessions, on shared machines), iobinding (keep the KV cache in
OrtValues on the provider's device between steps; on by default for cuda/tensorrt), shared_cache (CPU, a
fused graph: False turns off SharedCacheSession below), fused_session (False: a fused graph runs as one session on
the whole model, through its If: export's validation sessions, which judge the file as stored and load once). A
GPU provider is listed with the CPU provider as fallback, as ONNX Runtime recommends; `describe()` reports what the
session actually got.

A fused graph (exporters/onnx_fuse.py, exporters/onnx_fused_if.py: If(shapes GroupQueryAttention computes) then fused
else general) runs on the CPU as two sessions: its fused branch as a model of its own (`fused_branch`, loaded at
activation: ONNX Runtime runs it ~8 % faster than through the If) for every call the If would send there
(`takes_fused`: decode steps, unpadded prefills), and the whole model, loaded on the first call that needs the
general branch (a left-padded prefill, a batched continuation; a second copy of the weights in memory from then on).
Without the `onnx` package (a device install) or on a GPU provider it is one session on the whole model, as before.
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


class SharedCacheSession(Session):
    """CPU, a fused graph: the KV cache is one buffer per past tensor, [B, heads, capacity, D], that the fused
    branch's GroupQueryAttention reads and writes in place (past and present bound to the same OrtValue: ONNX Runtime
    GenAI's past_present_share_buffer; the graph takes the past's length from the mask). A decode step binds the new
    ids and the mask and reads back only the logits: no copy of the whole cache per token, in the graph or here. A
    step the fused branch cannot take runs the whole model on a copy of the cache and writes its present back. The
    capacity doubles when a step needs more (one copy), up to the model's max_seq_len (its rotary tables' rows)."""

    def __init__(self, runner: OnnxRuntimeRunner, batch: int, thresholds=None):
        super().__init__(runner, batch, thresholds)
        self.shapes = {n: v.shape for n, v in self.cache.items()}  # [B, heads, 0, D]
        self.cache = None
        self.buffers: dict[str, np.ndarray] = {}
        self.capacity = 0
        self.binding = None
        self.logits = np.zeros((0, 0, 0), np.float32)  # bound as the logits output (no OrtValue read back per step)

    def _reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        import onnxruntime as ort

        cap = max(total, min(max(2 * self.capacity, 64), self.runner.cfg.max_seq_len))  # the graph's positions
        old, self.buffers = self.buffers, {}
        for name, (b, h, _, d) in self.shapes.items():
            buf = np.zeros((b, h, cap, d), np.float32)
            if old:
                buf[:, :, :self.length] = old[name][:, :, :self.length]
            self.buffers[name] = buf
        self.capacity = cap
        r = self.runner
        self.binding = r.fused_session.io_binding()
        self.logits = np.zeros((0, 0, 0), np.float32)
        for past, present in zip(r.spec.past_names(), r.spec.present_names()):
            value = ort.OrtValue.ortvalue_from_numpy(self.buffers[past])  # the numpy buffer's memory, not a copy
            self.binding.bind_ortvalue_input(past, value)
            self.binding.bind_ortvalue_output(present, value)

    def step(self, ids, mask=None) -> tuple[np.ndarray, np.ndarray | None]:
        from exporters.onnx_fused_if import takes_fused

        ids = self.check(ids)
        full = self.extend_mask(ids, mask)
        r = self.runner
        total = self.length + ids.shape[1]
        if takes_fused(self.batch, ids.shape[1], self.length, bool(full.all())):
            self._reserve(total)
            self.binding.bind_cpu_input("input_ids", ids)
            self.binding.bind_cpu_input(MASK, full)
            if self.logits.shape[:2] != ids.shape:  # the prefill's, then one for every decode step
                import onnxruntime as ort

                self.logits = np.zeros((*ids.shape, r.cfg.vocab_size), np.float32)
                self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
            try:
                r.fused_session.run_with_iobinding(self.binding)
            except Exception as e:
                raise r.run_error(e) from None
            last = self.logits[:, -1].copy()  # the next step writes the buffer again
        else:
            cache = {n: np.ascontiguousarray(self.buffers[n][:, :, :self.length]) if self.buffers
                     else np.zeros(shape, np.float32) for n, shape in self.shapes.items()}
            out = r.infer({"input_ids": ids, MASK: full, **cache})
            self._reserve(total)
            for past, present in zip(r.spec.past_names(), r.spec.present_names()):
                self.buffers[past][:, :, :total] = out[present]
            last = out["logits"][:, -1]
        self.keep_mask(full, total)
        self.length = total
        return last, None


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
        path = self.resolved.path / self.resolved.manifest.get("model_file", "model.onnx")
        self.provider, self.path = provider, path
        self.sessions: dict[str, object] = {}
        self.notes = []
        self.fused_session, self.shared_cache = None, False
        split = self.options.get("fused_session") is not False
        if provider == "cpu" and not self.options.get("iobinding") and split:
            self.fused_session = self._fused()
        if self.fused_session is None:
            self._check_io(self.ort_session)
        self.io_device = "cpu" if provider == "cpu" else "cuda"
        use = self.options.get("iobinding")
        self.iobinding = (provider != "cpu") if use is None else bool(use)

    def _session(self, model, source: str, external_dir=None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if self.options.get("threads"):
            so.intra_op_num_threads = int(self.options["threads"])
        if self.options.get("spin") is False:  # idle threads sleep instead of spinning (a shared machine)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if external_dir is not None:  # a model given as bytes: its external data lives next to the file
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_dir))
        providers = [PROVIDERS[self.provider]] + (["CPUExecutionProvider"] if self.provider != "cpu" else [])
        try:
            sess = ort.InferenceSession(model, so, providers=providers)
        except Exception as e:  # onnxruntime's InvalidProtobuf / Fail / ...: pybind classes, no common base
            raise EdgekitError(f"onnxruntime cannot load {source}: {_first_line(e)}",
                               "the model file or its external data is damaged; export the artifact again") from None
        if PROVIDERS[self.provider] not in sess.get_providers():
            # onnxruntime-gpu lists TensorRT (and CUDA) whether or not their libraries load; when one does not,
            # it falls back to the CPU provider on its own (seen on an H200 without TensorRT's libraries)
            raise EdgekitError(f"onnxruntime {ort.__version__} lists {PROVIDERS[self.provider]} but could not start it "
                               f"(the session got {', '.join(sess.get_providers())})",
                               f"install its libraries ({INSTALL_HINT.get(self.provider, '')}), or use --provider cpu")
        return sess

    @property
    def ort_session(self):
        """The whole model's session (with a fused branch of its own: loaded on the first call that needs it)."""
        if "model" not in self.sessions:
            self.sessions["model"] = self._session(str(self.path), str(self.path))
            if self.fused_session is not None:
                self._check_io(self.sessions["model"])
        return self.sessions["model"]

    def _fused(self):
        """The fused branch's session, or None (not a fused graph, no `onnx` package, a file onnx cannot read)."""
        try:
            import onnx

            from exporters.onnx_fused_if import fused_branch, shared_cache
        except ImportError:  # a device install: the whole model, through its If
            return None
        try:
            model = onnx.load(str(self.path), load_external_data=False)
        except Exception:  # noqa: BLE001  (a damaged file: the whole model's session reports it)
            return None
        branch = fused_branch(model)
        if branch is None:
            return None
        # a graph fused before the past's length came from the mask cannot take a longer cache buffer
        self.shared_cache = self.options.get("shared_cache") is not False and shared_cache(model)
        sess = self._session(branch.SerializeToString(), f"{self.path} (its fused branch)", self.path.parent)
        self._check_io(sess)
        self.sessions["fused"] = sess
        self.notes.append("runs the graph's fused branch as a session of its own; the whole model (for left-padded "
                          "prefills and batched continuations) is loaded when a call needs it")
        return sess

    def _check_io(self, sess) -> None:
        inputs = [i.name for i in sess.get_inputs()]
        # an artifact exported before attention masks runs unpadded input (the mask is then not fed)
        self.has_mask = MASK in inputs
        if sorted(inputs) != sorted(n for n in self.spec.input_names if n != MASK or self.has_mask):
            missing = sorted(set(self.spec.input_names) - set(inputs))
            extra = sorted(set(inputs) - set(self.spec.input_names))
            raise EdgekitError(f"{self.path} does not match config.json (n_layers {self.cfg.n_layers}): graph inputs "
                               f"missing {missing[:3]}, unexpected {extra[:3]}",
                               "the graph and config.json come from different models; export the artifact again")
        self.output_names = [o.name for o in sess.get_outputs()]
        fusion = self.resolved.manifest.get("fusion") or {}
        note = ("this graph's fp32 GroupQueryAttention has no CUDA kernel: ONNX Runtime runs it on the CPU, copying "
                "every layer's activations across (bench/results/gpu_h200.json: no faster than 16 CPU threads); "
                "export with --no-fuse for a GPU")
        if self.provider != "cpu" and fusion.get("GroupQueryAttention") and note not in self.notes:
            self.notes.append(note)

    def describe(self) -> dict:
        import onnxruntime as ort

        sess = self.fused_session or self.ort_session
        so = sess.get_session_options()
        return {"runtime": self.name, "provider": self.provider, "providers_active": sess.get_providers(),
                "precision": self.resolved.manifest.get("precision", "fp32"), "onnxruntime": ort.__version__,
                "threads": so.intra_op_num_threads or None, "iobinding": self.iobinding,
                "spinning": self.options.get("spin") is not False, "fused_session": self.fused_session is not None,
                "shared_cache": self.shared_cache,
                **({"notes": self.notes} if self.notes else {})}

    def no_mask_error(self) -> EdgekitError:
        return EdgekitError(f"{self.resolved.name} was exported before attention masks: its graph has no "
                            f"'{MASK}' input, so it cannot run left-padded rows",
                            "export it again with this edgekit")

    def run_error(self, e: Exception) -> EdgekitError:
        return EdgekitError(f"onnxruntime failed running {self.resolved.name}: {_first_line(e)}",
                            "the artifact is damaged or does not match its config.json; export it again")

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.has_mask:
            if not feeds[MASK].all():
                raise self.no_mask_error()
            feeds = {n: v for n, v in feeds.items() if n != MASK}
        sess = self.ort_session if self.fused_session is None else self._pick(feeds)
        try:
            return dict(zip(self.output_names, sess.run(self.output_names, feeds)))
        except Exception as e:  # a graph that loads but cannot run (damaged external data, wrong shapes)
            raise self.run_error(e) from None

    def _pick(self, feeds):
        """The fused branch's session for the calls the If would send there, else the whole model."""
        from exporters.onnx_fused_if import takes_fused

        b, s = feeds["input_ids"].shape
        past = feeds[self.spec.past_names()[0]].shape[2]
        return self.fused_session if takes_fused(b, s, past, bool(feeds[MASK].all())) else self.ort_session

    def session_impl(self, batch: int, thresholds) -> Session:
        if self.iobinding:
            return BoundSession(self, batch, thresholds)
        return SharedCacheSession(self, batch, thresholds) if self.shared_cache \
            else Session(self, batch, thresholds)

    def deactivate_impl(self) -> None:
        self.sessions.clear()
        self.fused_session, self.shared_cache = None, False
