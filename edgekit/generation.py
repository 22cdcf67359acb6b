"""Token generation over any engine: greedy, or sampling with temperature / top-k / seed.

An engine is a `step(ids) -> (logits [V], executed [L] or None)` callable that keeps its own KV
cache: the first call gets the prompt (prefill), later calls one token each (decode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Step = Callable[[list[int]], tuple[np.ndarray, "np.ndarray | None"]]


@dataclass
class Generated:
    tokens: list[int]  # new tokens only
    executed: list[list[bool]] = field(default_factory=list)  # per step, per layer (R1)

    @property
    def layer_runs(self) -> int:
        return int(sum(sum(e) for e in self.executed))

    @property
    def layer_slots(self) -> int:
        return int(sum(len(e) for e in self.executed))

    @property
    def skipped(self) -> int:
        return self.layer_slots - self.layer_runs


def pick(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator, top_p: float = 1.0) -> int:
    """Greedy at temperature 0, else a sample from the temperature-scaled distribution cut to the top_k tokens
    (0: all) and to the smallest set whose probability reaches top_p (1.0: all)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    if 0 < top_k < z.size:
        cut = np.partition(z, -top_k)[-top_k]
        z = np.where(z >= cut, z, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = np.cumsum(p[order]) - p[order] < top_p  # the smallest prefix whose mass reaches top_p
        q = np.zeros_like(p)
        q[order[keep]] = p[order[keep]]
        p = q / q.sum()
    return int(rng.choice(z.size, p=p))


def generate(step: Step, prompt: list[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, seed: int = 0, stop: int | None = None) -> Generated:
    rng = np.random.default_rng(seed)
    out = Generated([])
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits, executed = step(ids)
        if executed is not None:
            out.executed.append([bool(x) for x in np.asarray(executed).reshape(-1)])
        tok = pick(np.asarray(logits, dtype=np.float32).reshape(-1), temperature, top_k, rng)
        out.tokens.append(tok)
        if stop is not None and tok == stop:
            break
        ids = [tok]
    return out
