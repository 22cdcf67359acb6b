"""Weight sources for streamed export (issue 18): fp32 numpy arrays one tensor at a time, by parameter name
(the model's state_dict names), never the whole model in memory.

- SafetensorsWeights: edgekit checkpoints and Hugging Face directories (safetensors `safe_open` reads one
  tensor per call; *.safetensors shards are indexed by their headers).
- RandomWeights: deterministic random weights for profiling full-size models: each tensor seeded by
  (seed, its name), uniform with the mean and standard deviation that the model's own initialisation gives
  that kind of parameter (measured once on a tiny copy: norms 1, position tables 0, linears std 0.02);
  uniform, not normal: drawing is the cost of a full-size export and of its validation (4x cheaper).
- StateWeights: an in-memory state_dict (tests, small models).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

_LAYER_NUMBER = re.compile(r"\.(\d+)\.")


class WeightSource:
    """names() in a stable order, shape(name), get(name) -> fp32 numpy array."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def missing(self, wanted: list[str]) -> None:
        have = set(self.names())
        lost = [n for n in wanted if n not in have]
        if lost:
            raise EdgekitError(f"the weights lack {len(lost)} tensor(s) the model needs, e.g. {lost[0]}",
                               "the weights and the config come from different models")

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for n in self.names():
            yield n, self.get(n)


class StateWeights(WeightSource):
    def __init__(self, state: dict):
        self.state = state

    def names(self) -> list[str]:
        return list(self.state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.state[name].shape)

    def get(self, name: str) -> np.ndarray:
        t = self.state[name]
        if hasattr(t, "detach"):
            t = t.detach().float().cpu().numpy()
        return np.asarray(t, np.float32)


class SafetensorsWeights(WeightSource):
    """Every *.safetensors file of a directory (or one file); a name -> file index from the headers only."""

    def __init__(self, path: Path, strip: str = ""):
        from safetensors import safe_open

        path = Path(path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files:
            raise EdgekitError(f"{path}: no *.safetensors weights", "pass a checkpoint or Hugging Face directory")
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.strip = strip
        for f in files:
            try:
                with safe_open(str(f), "np") as h:
                    for k in h.keys():
                        self.where[k.removeprefix(strip)] = f
                        self.shapes[k.removeprefix(strip)] = tuple(h.get_slice(k).get_shape())
            except Exception as e:  # SafetensorError / OSError on a damaged header
                raise EdgekitError(f"{f} is corrupt or truncated: {str(e).splitlines()[0] if str(e) else e}",
                                   "copy or save it again") from None

    def names(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self.where[name]), "pt") as h:  # "pt": bf16 files too
            t = h.get_tensor(self.strip + name)
        return t.float().numpy() if t.is_floating_point() else t.numpy()


def _kind(name: str) -> str:
    """A parameter's name with its layer numbers replaced: the key for its initialisation statistics."""
    return _LAYER_NUMBER.sub(".N.", name)


class RandomWeights(WeightSource):
    """Seeded uniform(mean, std) per tensor, (mean, std) of the parameter's kind in `reference` (a small model of
    the same family built with its own initialisation); a kind with std 0 is that constant (norms, tables)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], reference: dict, seed: int = 0):
        self.shapes = shapes
        self.seed = seed
        self.stats: dict[str, tuple[float, float]] = {}
        for name, t in reference.items():
            a = StateWeights({name: t}).get(name)
            self.stats.setdefault(_kind(name), (float(a.mean()), float(a.std()) if a.size > 1 else 0.0))

    def names(self) -> list[str]:
        return list(self.shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def get(self, name: str) -> np.ndarray:
        mean, std = self.stats.get(_kind(name), (0.0, 0.02))
        shape = self.shapes[name]
        if std == 0:
            return np.full(shape, mean, np.float32)
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        a = rng.random(shape, dtype=np.float32)  # U[0, 1): 4x cheaper than standard_normal (8 B weights
        a -= np.float32(0.5)  # are drawn again for validation); uniform of the same mean and std
        a *= np.float32(std * 12 ** 0.5)
        if mean:
            a += np.float32(mean)
        return a


def model_from(cfg, source: WeightSource):
    """The whole model with the source's weights (small models: the in-memory reference)."""
    import torch

    from edgekit.models import build

    model = build(cfg, device="meta")
    state = {n: torch.from_numpy(source.get(n)) for n in model.state_dict()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.float().eval()


def layer_streamed_model(cfg, source: WeightSource):
    """The PyTorch model (V3 / R1) with its blocks materialised one at a time from the source when the forward
    reaches them (the previous one released): a reference for models whose fp32 weights do not fit in memory.
    Memory: embedding, head, gates and one block. Eager forward only. Several forwards can share each block's
    materialisation: `lockstep(model, calls)`."""
    import torch
    from torch import nn

    from edgekit.models import build

    model = build(cfg, device="meta")
    for name, _ in model.named_parameters():
        if not name.startswith("blocks."):
            parent, _, leaf = name.rpartition(".")
            module = model.get_submodule(parent) if parent else model
            setattr(module, leaf, nn.Parameter(torch.from_numpy(source.get(name)), requires_grad=False))

    class LazyBlocks(nn.ModuleList):
        loaded = -1
        loads = 0

        def load(self, i: int) -> None:
            if i == self.loaded:
                return
            if self.loaded >= 0:
                super().__getitem__(self.loaded).to_empty(device="meta")
            block = super().__getitem__(i)
            block.to_empty(device="cpu")
            with torch.no_grad():
                for n, p in block.named_parameters():
                    p.copy_(torch.from_numpy(source.get(f"blocks.{i}.{n}")))
            self.loaded = i
            self.loads += 1

        def __getitem__(self, i):
            if isinstance(i, int):
                self.turns.request(i % len(self))
            return super().__getitem__(i)

        def __iter__(self):
            return (self[i] for i in range(len(self)))

    blocks = LazyBlocks(list(model.blocks))
    blocks.turns = _Turns(blocks)
    model.blocks = blocks
    return model.eval()


class Prefixed(WeightSource):
    """Another source's tensors under `prefix` + their names (a Hugging Face directory's `model.layers.0...` as
    HFCausalLM's `hf.model.layers.0...`)."""

    def __init__(self, source: WeightSource, prefix: str):
        self.source, self.prefix = source, prefix

    def names(self) -> list[str]:
        return [self.prefix + n for n in self.source.names()]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(name.removeprefix(self.prefix))

    def get(self, name: str) -> np.ndarray:
        return self.source.get(name.removeprefix(self.prefix))


def hf_layer_streamed_model(hf_config, cfg, source: WeightSource, lazy: bool = True):
    """The Hugging Face llama / qwen2 model (HFCausalLM, parameters named `hf.`...) with each decoder layer
    materialised from the source when the forward reaches it and released after it: a reference for models whose
    fp32 weights do not fit in memory. Memory: embedding, head, final norm and one layer. Eager forward only.
    lazy=False: every layer loaded now (the whole model, for small ones)."""
    import torch
    import transformers
    from torch import nn

    from edgekit.models.hf import HFCausalLM

    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32, attn_implementation="eager")
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.model.rotary_emb.config)  # built on the CPU
    tied = {n for n, _ in hf.named_parameters(remove_duplicate=False)} - {n for n, _ in hf.named_parameters()}
    for name, _ in hf.named_parameters(remove_duplicate=False):
        if ".layers." not in name:
            parent, _, leaf = name.rpartition(".")
            module = hf.get_submodule(parent) if parent else hf
            if name in tied:  # lm_head tied to the embedding: the same tensor
                continue
            setattr(module, leaf, nn.Parameter(torch.from_numpy(source.get(f"hf.{name}")), requires_grad=False))
    if tied:
        hf.tie_weights()

    def load(layer, _args, index):
        layer.to_empty(device="cpu")
        with torch.no_grad():
            for n, p in layer.named_parameters():
                p.copy_(torch.from_numpy(source.get(f"hf.model.layers.{index}.{n}")))

    for i, layer in enumerate(hf.model.layers):
        if not lazy:
            load(layer, (), i)
            continue
        layer.register_forward_pre_hook(lambda m, a, i=i: load(m, a, i))
        layer.register_forward_hook(lambda m, a, out: m.to_empty(device="meta") and None)
    return HFCausalLM(hf.eval(), cfg)


class _Turns:
    """Block requests of concurrent forwards: a block is swapped only while every running forward waits for
    one (none is using a block); the loaded block, else the most wanted one, is served next. One forward:
    each request is served at once."""

    def __init__(self, blocks):
        import threading

        self.blocks = blocks  # .load(i), .loaded
        self.cv = threading.Condition()
        self.active = 1
        self.waiting: dict[int, int] = {}
        self.error: BaseException | None = None

    def request(self, block: int) -> None:
        import threading

        me = threading.get_ident()
        with self.cv:
            if self.error is None:
                self.waiting[me] = block
                self._serve()
                while me in self.waiting and self.error is None:
                    self.cv.wait()
            if self.error is not None:
                self.waiting.pop(me, None)
                raise self.error

    def leave(self) -> None:
        with self.cv:
            self.active -= 1
            self._serve()

    def _serve(self) -> None:
        if not self.waiting or len(self.waiting) < self.active:
            return
        wanted = list(self.waiting.values())
        loaded = self.blocks.loaded
        block = loaded if loaded in wanted else max(sorted(set(wanted)), key=wanted.count)
        try:
            self.blocks.load(block)
        except BaseException as e:  # every waiting forward raises it
            self.error = e
        for who in [w for w, b in self.waiting.items() if b == block]:
            del self.waiting[who]
        self.cv.notify_all()


def lockstep(model, calls: list) -> list:
    """Run calls (each a forward of a `layer_streamed_model`) in threads that share each block's
    materialisation: blocks requested in the same order by every call are read from the source once, not once
    per call. Returns the calls' results in order; the first error is raised."""
    import threading

    turns = model.blocks.turns
    turns.active, turns.error = len(calls), None
    turns.waiting.clear()
    results: list = [None] * len(calls)
    errors: list = []

    def run(k: int) -> None:
        try:
            results[k] = calls[k]()
        except BaseException as e:
            errors.append(e)
        finally:
            turns.leave()

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    turns.active = 1
    if errors:
        raise errors[0]
    return results
