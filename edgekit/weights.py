"""Weight sources for streamed export (issue 18): fp32 numpy arrays one tensor at a time, by parameter name
(the model's state_dict names), never the whole model in memory.

- SafetensorsWeights: edgekit checkpoints and Hugging Face directories (safetensors `safe_open` reads one
  tensor per call; *.safetensors shards are indexed by their headers).
- RandomWeights: deterministic random weights for profiling full-size models: each tensor seeded by
  (seed, its name), drawn with the mean and standard deviation that the model's own initialisation gives
  that kind of parameter (measured once on a tiny copy: norms 1, position tables 0, linears N(0, 0.02)).
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
    """Seeded N(mean, std) per tensor, (mean, std) of the parameter's kind in `reference` (a small model of
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
        a = rng.standard_normal(shape, dtype=np.float32)
        a *= np.float32(std)
        if mean:
            a += np.float32(mean)
        return a
