"""The measured loop: one run = prefill of a seeded prompt (time to first token) + (new_tokens - 1)
greedy single-token decode steps through the runner's KV-cache session. Every step returns the last
position's logits to the host, which also synchronises a GPU, so the per-step times are wall-clock
latencies a caller would see. Times are kept per step, so an interrupted run still counts."""

from __future__ import annotations

import time

import numpy as np

from edgekit.spec import DecoderSpec


def stats_ms(seconds: list[float]) -> dict | None:
    """p50/p90/p99 (linear interpolation: p50 <= p90 <= p99 always), mean, min, max in ms."""
    if not seconds:
        return None
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean()),
            "min": float(ms.min()), "max": float(ms.max()), "n": int(ms.size)}


class Samples:
    """What one setting measured so far."""

    def __init__(self):
        self.ttft: list[float] = []
        self.decode: list[float] = []
        self.e2e: list[float] = []
        self.executed: list[np.ndarray] = []  # per measured call (prefill and decode)
        self.decode_executed: list[np.ndarray] = []
        self.tokens = 0  # generated tokens (all rows) in measured runs
        self.runs = 0  # completed measured runs


def seeded_prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, min(vocab, 256), (batch, length), dtype=np.int64)


def one_run(runner, prompts: np.ndarray, new_tokens: int, thresholds, sink: Samples | None, advance,
            mask: np.ndarray | None = None) -> None:
    """Prefill + (new_tokens - 1) greedy decode steps; times go to `sink` (None: warm-up). mask: the prompts'
    attention mask (0 = left padding), None = no padding."""
    batch = prompts.shape[0]
    sess = runner.session(batch, thresholds)
    t0 = time.perf_counter()
    token = prompts
    for i in range(new_tokens):  # step 0: the prefill (time to first token), then greedy decode steps
        ta = time.perf_counter()
        logits, executed = sess.step(token, mask if i == 0 else None)
        token = logits.argmax(-1).reshape(batch, 1)
        seconds = time.perf_counter() - ta
        if sink is not None:
            (sink.decode if i else sink.ttft).append(seconds)
            sink.tokens += batch
            if executed is not None:
                sink.executed.append(executed)
                if i:
                    sink.decode_executed.append(executed)
        advance(1)
    if sink is not None:
        sink.e2e.append(time.perf_counter() - t0)
        sink.runs += 1


def gating(cfg, executed: list[np.ndarray], decode_executed: list[np.ndarray]) -> dict | None:
    """Skip statistics of a gated model (R1, or a Hugging Face model with calibrate-skip gates); None otherwise."""
    if not DecoderSpec(cfg).gated:
        return None
    gated = list(cfg.gated_layers)
    out = {"gated_layers": gated, "calls": len(executed),
           "note": "each row decides each gated layer on its own tokens; a layer counts as executed in a call "
                   "when it ran for any row of the batch"}
    if not executed:
        return out
    ex = np.stack(executed).astype(bool)  # [calls, layers]
    g = ex[:, gated]
    out.update(gated_executions=int(g.size), gated_skipped=int((~g).sum()),
               skipped_fraction=float((~g).mean()) if g.size else 0.0,
               layer_skipped_fraction=float((~ex).mean()))
    if decode_executed:
        d = np.stack(decode_executed).astype(bool)
        out["decode_skipped_fraction"] = float((~d[:, gated]).mean()) if gated else 0.0
        out["decode_run_fraction_per_layer"] = [round(float(x), 4) for x in d.mean(0)]
    return out


def summarize(s: Samples, batch: int, prompt_len: int) -> dict:
    decode_s = sum(s.decode)
    e2e_s = sum(s.e2e)
    return {"ttft_ms": stats_ms(s.ttft), "decode_ms_per_token": stats_ms(s.decode), "e2e_ms": stats_ms(s.e2e),
            "decode_tokens_per_s": batch * len(s.decode) / decode_s if decode_s else None,
            "prefill_tokens_per_s": batch * prompt_len * len(s.ttft) / sum(s.ttft) if s.ttft else None,
            "requests_per_s": batch * s.runs / e2e_s if e2e_s else None,
            "measured_runs": s.runs}


def sweep_entry(t: float, s: Samples, cfg, batch: int, prompt_len: int) -> dict:
    """One threshold of `--sweep-threshold`."""
    lat = summarize(s, batch, prompt_len)
    g = gating(cfg, s.executed, s.decode_executed) or {}
    return {"threshold": t, "ttft_ms_p50": lat["ttft_ms"]["p50"],
            "decode_ms_p50": (lat["decode_ms_per_token"] or {}).get("p50"),
            "decode_ms_p90": (lat["decode_ms_per_token"] or {}).get("p90"),
            "decode_ms_p99": (lat["decode_ms_per_token"] or {}).get("p99"),
            "decode_tokens_per_s": lat["decode_tokens_per_s"], "skipped_fraction": g.get("skipped_fraction"),
            "decode_skipped_fraction": g.get("decode_skipped_fraction"), "measured_runs": s.runs}
