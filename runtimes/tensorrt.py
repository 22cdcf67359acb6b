"""TensorRT runtime: runs a serialized engine (built on this device by `edgekit build-engine`).

Bindings are the DecoderSpec names; shapes are dynamic through the engine's optimization profiles (decode:
seq 1; prefill: longer prompts), chosen per call and set with set_input_shape. Buffers live in CUDA memory
allocated through PyTorch (edgekit's one GPU dependency); the TensorRT 8.5+ name-based API
(set_tensor_address / execute_async_v3) runs them. tensorrt is imported lazily: where it or a GPU is
missing, activate() is a one-line EdgekitError, never an ImportError. Building the engine is
runtimes/tensorrt_build.py; what is known about a built engine (engine.json) is read here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.spec import MASK
from edgekit.versions import engine_loadable
from runtimes.base import Runner

ENGINE_FILE = "model.engine"
ENGINE_JSON = "engine.json"

INSTALL_HINT = ("on x86/SBSA: pip install 'edgekit[tensorrt]'; on Jetson: TensorRT comes with JetPack "
                "(python3-libnvinfer); elsewhere build with the recipe's trtexec command")


def load_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EdgekitError("TensorRT is not installed on this machine", INSTALL_HINT) from None
    except Exception as e:  # a broken install (missing libnvinfer, CUDA mismatch) fails at import
        raise EdgekitError(f"TensorRT is installed but cannot load: {e}", INSTALL_HINT) from None
    return trt


def gpu_sm() -> str:
    """This machine's GPU compute capability 'major.minor', or an EdgekitError when no CUDA GPU is visible."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        raise EdgekitError("PyTorch is missing", "reinstall edgekit") from None
    if not torch.cuda.is_available():
        raise EdgekitError("no CUDA GPU is visible (torch.cuda.is_available() is False)",
                           "run on the target device with a CUDA build of PyTorch (JetPack's on Jetson)")
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}.{minor}"


def tensorrt_environment() -> tuple[object, str, str]:
    """(tensorrt module, its version, GPU SM 'major.minor'), or an EdgekitError saying what is missing."""
    trt = load_tensorrt()
    return trt, trt.__version__, gpu_sm()


def tensorrt_available() -> str | None:
    """None when an engine can be built here, else why not (for skips and manifests)."""
    try:
        tensorrt_environment()
    except EdgekitError as e:
        return str(e)
    return None


def engine_facts(directory: Path, manifest: dict | None = None) -> dict:
    """What is known about the engine in an artifact: engine.json (written by build-engine, which leaves the
    hashed manifest -- and a bundle's signature -- untouched), else the manifest's `engine` entry."""
    path = Path(directory) / ENGINE_JSON
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EdgekitError(f"cannot read {path}: {e}",
                               "rebuild the engine: edgekit build-engine DIR --force") from None
    return dict((manifest or {}).get("engine") or {})


class TensorRTRunner(Runner):
    name = "tensorrt"

    def activate_impl(self) -> None:
        import torch

        trt = load_tensorrt()
        sm = gpu_sm()
        path = Path(self.resolved.path or ".")
        engine_file = Path(self.options.get("engine") or path / ENGINE_FILE)
        if not engine_file.is_file():
            raise EdgekitError(f"{path} has no TensorRT engine ({engine_file.name})",
                               f"build it on this device: edgekit build-engine {path}")
        facts = engine_facts(path, self.resolved.manifest)
        built_trt, built_sm = facts.get("tensorrt"), facts.get("sm")
        if (built_trt and not engine_loadable(trt.__version__, built_trt)) or (built_sm and built_sm != sm):
            raise EdgekitError(f"the engine was built with TensorRT {built_trt} for "
                               f"sm_{str(built_sm).replace('.', '')}; this machine has TensorRT {trt.__version__} and "
                               f"sm_{sm.replace('.', '')}",
                               f"rebuild it here: edgekit build-engine {path} --force")
        self.trt, self.torch = trt, torch
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise EdgekitError(f"TensorRT {trt.__version__} cannot load {engine_file}",
                               f"the engine is damaged or from another TensorRT: edgekit build-engine {path} --force")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.has_mask = MASK in inputs  # an engine built from a graph exported before attention masks: unpadded only
        expected = [n for n in self.spec.input_names if n != MASK or self.has_mask]
        if sorted(inputs) != sorted(expected) or sorted(outputs) != sorted(self.spec.output_names):
            raise EdgekitError(f"{engine_file.name} does not match {self.cfg.name}'s graph: inputs {inputs[:3]}..., "
                               f"outputs {outputs[:3]}...", f"rebuild it: edgekit build-engine {path} --force")
        self.inputs, self.outputs = inputs, outputs
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.profiles = [{n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, p)]
                          for n in inputs if -1 in tuple(self.engine.get_tensor_shape(n))}
                         for p in range(self.engine.num_optimization_profiles)]
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EdgekitError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = torch.cuda.Stream()
        self.active_profile = 0
        self.device = torch.device("cuda", 0)

    def describe(self) -> dict:
        return {"runtime": self.name, "tensorrt": self.trt.__version__, "sm": gpu_sm(), "precision":
                self.resolved.manifest.get("precision", "fp16"), "profiles": len(self.profiles),
                "cuda_device": self.torch.cuda.get_device_name(0)}

    def _profile_for(self, shapes: dict[str, tuple]) -> int:
        """The first optimization profile whose [min, max] range holds every input shape (decode comes first)."""
        for p, ranges in enumerate(self.profiles):
            if all(all(lo <= d <= hi for d, lo, hi in zip(shapes[n], mn, mx)) for n, (mn, _o, mx) in ranges.items()):
                return p
        b, s = shapes["input_ids"]
        past = shapes[self.spec.past_names()[0]][2]
        limits = "; ".join(f"profile {p}: " + ", ".join(f"{n} {mn}..{mx}" for n, (mn, _o, mx) in r.items()
                                                         if n in ("input_ids", self.spec.past_names()[0]))
                           for p, r in enumerate(self.profiles))
        raise EdgekitError(f"batch {b}, seq {s}, past {past} is outside the engine's optimization profiles ({limits})",
                           "re-export with a larger --context or feed the prompt in chunks")

    def _buffer(self, shape: tuple, dtype: np.dtype):
        torch = self.torch
        tdtype = torch.from_numpy(np.empty(0, dtype)).dtype
        n = int(np.prod(shape, dtype=np.int64))
        flat = torch.empty(max(n, 1), dtype=tdtype, device=self.device)  # empty tensors still get an address
        return flat, flat[:n].view(shape)

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        if not self.has_mask and not feeds[MASK].all():
            raise EdgekitError(f"{self.resolved.name}'s engine has no '{MASK}' input, so it cannot run left-padded "
                               "rows", "export the model again with this edgekit and rebuild the engine")
        shapes = {n: tuple(np.shape(feeds[n])) for n in self.inputs}
        profile = self._profile_for(shapes)
        keep = []  # device buffers must outlive the launch
        with torch.cuda.stream(self.stream):
            if profile != self.active_profile:
                if not self.context.set_optimization_profile_async(profile, self.stream.cuda_stream):
                    raise EdgekitError(f"TensorRT could not switch to optimization profile {profile}")
                self.active_profile = profile
            for n in self.inputs:
                arr = np.ascontiguousarray(feeds[n], dtype=self.dtypes[n])
                flat, view = self._buffer(arr.shape, self.dtypes[n])
                if arr.size:
                    view.copy_(torch.from_numpy(arr), non_blocking=False)
                if not self.context.set_input_shape(n, arr.shape):
                    raise EdgekitError(f"TensorRT rejected shape {arr.shape} for input {n}")
                self.context.set_tensor_address(n, flat.data_ptr())
                keep.append(flat)
            results = {}
            for n in self.outputs:
                shape = tuple(self.context.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise EdgekitError(f"output {n} has a data-dependent shape {shape}, which this runner does not "
                                       "support")
                flat, view = self._buffer(shape, self.dtypes[n])
                self.context.set_tensor_address(n, flat.data_ptr())
                keep.append(flat)
                results[n] = view
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EdgekitError("TensorRT failed to run the engine (its log above says why)")
        self.stream.synchronize()
        out = {}
        for n, view in results.items():
            a = view.cpu().numpy()
            out[n] = a.astype(bool) if n == "executed" else a.astype(np.float32, copy=False)
        return out

    def deactivate_impl(self) -> None:
        for attr in ("context", "engine", "runtime"):
            if hasattr(self, attr):
                delattr(self, attr)
