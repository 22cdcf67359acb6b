"""The R1 -> V3 cascade: R1 answers; a request whose R1 confidence is below the policy's threshold is
handed to the fallback model (V3) and answered there.

Signals (higher = more confident; measured on the held-out task split, bench/serve.py):

    margin        first token: p(top1) - p(top2)                       decided after R1's prefill
    neg_entropy   first token: minus the entropy of the distribution   decided after R1's prefill
    mean_logprob  mean log-probability of R1's whole answer            decided when R1 has finished
    probe         a logistic probe over the first-token signals, R1's prefill gate activity and the
                  prompt length, fitted by `calibrate` on data with answers to predict "R1 wrong and the
                  fallback right"; its score is minus that probability   decided after R1's prefill

`calibrate` runs both models over the data, fits the probe (when the data has answers) and sets the
threshold so that exactly round(rate x n) of the data's requests fall below it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError

SIGNALS = ("probe", "margin", "neg_entropy", "mean_logprob")
AT_END = ("mean_logprob",)
FEATURES = ("margin", "neg_entropy", "executed_fraction", "log_prompt_len")
POLICY_FORMAT = 1


def features(req) -> np.ndarray:
    s = req.confidence.signals()
    ex = s["executed_fraction"]
    return np.array([s["margin"], s["neg_entropy"], 1.0 if ex is None else ex, math.log(len(req.prompt))],
                    np.float64)


class Policy:
    def __init__(self, data: dict):
        self.data = data
        self.signal, self.threshold = data["signal"], float(data["threshold"])
        if self.signal == "probe":
            p = data["probe"]
            self.mean, self.scale = np.asarray(p["mean"]), np.asarray(p["scale"])
            self.weights, self.bias = np.asarray(p["weights"]), float(p["bias"])

    @property
    def stage(self) -> str:
        return "end" if self.signal in AT_END else "first"

    def score(self, req) -> float:
        if self.signal == "probe":
            z = (features(req) - self.mean) / self.scale @ self.weights + self.bias
            return -float(1.0 / (1.0 + math.exp(-z)))
        value = req.confidence.signals()[self.signal]
        return -math.inf if value is None else float(value)

    def decide(self, req, stage: str) -> bool:
        """True: hand `req` to the fallback. Called by the scheduler after R1's prefill and at R1's end."""
        if stage != self.stage:
            return False
        req.score = self.score(req)
        return req.score < self.threshold


def read_policy(path: str | Path) -> Policy:
    path = Path(path)
    fix = "write one with 'edgekit cascade calibrate R1 V3 --data FILE --out POLICY.json'"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EdgekitError(f"{path} does not exist", fix) from None
    except (OSError, ValueError) as e:
        raise EdgekitError(f"cannot read the cascade policy {path}: {e}", fix) from None
    if not isinstance(data, dict) or data.get("edgekit_cascade_policy") != POLICY_FORMAT \
            or data.get("signal") not in SIGNALS or not isinstance(data.get("threshold"), (int, float)):
        raise EdgekitError(f"{path} is not an edgekit cascade policy (format {POLICY_FORMAT})", fix)
    if data["signal"] == "probe" and not isinstance(data.get("probe"), dict):
        raise EdgekitError(f"{path}: signal 'probe' without its probe weights", fix)
    return Policy(data)


def check_models(policy: Policy, primary: str, fallback: str) -> None:
    models = policy.data.get("models", {})
    for role, name in (("primary", primary), ("fallback", fallback)):
        want = models.get(role, {}).get("name")
        if want is not None and want != name:
            raise EdgekitError(f"the policy was calibrated for {role} model {want}, not {name}",
                               "calibrate a policy for these models with 'edgekit cascade calibrate'")


def fit_probe(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, iters: int = 3000) -> dict:
    """Logistic regression (standardised features, L2, gradient descent): P(y=1 | x)."""
    mean, scale = x.mean(0), x.std(0) + 1e-9
    z = np.column_stack([(x - mean) / scale, np.ones(len(x))])
    w = np.zeros(z.shape[1])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        w -= 0.5 * (z.T @ (p - y) / len(y) + l2 * np.r_[w[:-1], 0.0])
    return {"features": list(FEATURES), "mean": mean.tolist(), "scale": scale.tolist(),
            "weights": w[:-1].tolist(), "bias": float(w[-1])}


def threshold_for(scores: list[float], rate: float) -> float:
    """A threshold with exactly round(rate x n) scores below it (midway between neighbours)."""
    s = sorted(scores)
    k = round(rate * len(s))
    if k <= 0:
        return s[0] - 1.0 if s else 0.0
    if k >= len(s):
        return s[-1] + 1.0
    return (s[k - 1] + s[k]) / 2.0
