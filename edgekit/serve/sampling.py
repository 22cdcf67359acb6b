"""Per-request token choice and the confidence numbers a cascade can route on.

Greedy at temperature 0 (the argmax, exactly as edgekit.generation picks it), else softmax sampling with
temperature, top-k and top-p from the request's own seeded generator. Every accepted token also updates
the request's confidence record: the first token's margin (top-1 minus top-2 probability) and entropy,
and the running sum of the chosen tokens' log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgekit.generation import pick


@dataclass
class Confidence:
    margin: float | None = None  # first token: p(top1) - p(top2)
    entropy: float | None = None  # first token: entropy of the next-token distribution (nats)
    logprob_sum: float = 0.0  # chosen tokens' log-probabilities (greedy or sampled)
    tokens: int = 0
    executed: list[float] = field(default_factory=list)  # per call: fraction of gated layers that ran

    @property
    def mean_logprob(self) -> float | None:
        return self.logprob_sum / self.tokens if self.tokens else None

    def signals(self) -> dict[str, float | None]:
        """Higher = more confident, for every signal (entropy is negated)."""
        return {"margin": self.margin, "neg_entropy": None if self.entropy is None else -self.entropy,
                "mean_logprob": self.mean_logprob,
                "executed_fraction": float(np.mean(self.executed[:1])) if self.executed else None}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def choose(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    return pick(logits, temperature, top_k, rng, top_p)  # the one sampler (edgekit.generation)


def observe(conf: Confidence, logits: np.ndarray, token: int) -> None:
    lp = log_softmax(np.asarray(logits).reshape(-1))
    if conf.tokens == 0:
        p = np.exp(lp)
        top = np.partition(p, -2)[-2:] if p.size > 1 else np.array([0.0, p[0]])
        conf.margin = float(top[1] - top[0])
        conf.entropy = float(-(p * lp).sum())
    conf.logprob_sum += float(lp[token])
    conf.tokens += 1
