"""Validation, the one place (layer 4): run two runners on the same seeded cases -> results (a JSON
document) -> judged by a tolerance (exact graphs) or a fidelity floor (quantized ones).

Export (fp32 graph vs PyTorch, int8 graph vs PyTorch), quantize (torch int8 vs torch fp32), compare
(runtime vs runtime, never judged) and TensorRT (engine vs PyTorch) all use it (STYLE.md, Polygraphy).

    results = run(reference, candidate, spec)          # compare, nothing judged
    judge(results, tolerance=1e-3)                     # raises EdgekitError on a miss
    save(results, "results.json")                      # compare later, elsewhere

A reference can also be a recording: `Recording(runner)` captures every output a runner gives during
`run` and `.save(path)` writes them (npz, no pickle); `Recorded(path)` replays them, so a Jetson run can
be judged against outputs recorded on a workstation (same seeded cases, so the same feeds).

Tolerances scale with the outputs: real pretrained logits are O(10) and an exact fp32 graph differs from
PyTorch by up to ~3e-3 absolute (summation order; SmolLM2-135M on a random KV cache: 1.2e-4 of the logits'
scale), while a graph with one weight off by 1 % differs by >= 1e-2 of the scale of some output (measured on
SmolLM2 and the tiny presets; tests/edgekit/test_validate.py breaks graphs on purpose). The bound on each
output of each case is `tolerance x max(1, max |reference|)`, tolerance 1e-3 by default.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.spec import MASK, DecoderSpec


def cases(spec: DecoderSpec) -> list[dict]:
    """Seeded (batch, seq, past) shapes (with left padding, `pads` per row) x threshold settings that give
    different skip patterns."""
    cfg = spec.cfg
    routed = 2 * cfg.block_size + 5
    shapes = [(1, 1, 0), (2, 7, 0), (1, 1, 19), (3, 4, routed)]
    padded = [((3, 4, routed), (0, 7, routed - 1)),  # left padding in the past: rows that joined with shorter pasts
              ((3, 9, 0), (0, 3, 8))]  # a left-padded prefill
    if cfg.memory_len:
        shapes.append((1, 4, cfg.memory_len - 2))  # crosses the segment memory: the cache is truncated
    shapes = [(s, None) for s in shapes] + padded
    if not spec.gated:
        return [{"shape": s, "pads": p, "thresholds": None, "label": "dense"} for s, p in shapes]
    n = cfg.n_layers
    settings = {"run-all": np.zeros(n, np.float32), "skip-all-gated": np.full(n, 2.0, np.float32),
                "skip-alternate": np.array([2.0 * (i % 2) for i in range(n)], np.float32),
                "default": np.full(n, cfg.default_threshold, np.float32)}
    return [{"shape": s, "pads": p, "thresholds": t, "label": k} for s, p in shapes for k, t in settings.items()]


def compare_outputs(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], names: list[str]) -> dict[str, dict]:
    """Per output: max abs difference and the reference's scale (max |ref|); a missing name or a shape
    mismatch raises."""
    stats = {}
    for n in names:
        if n not in got:
            raise EdgekitError(f"validation: the candidate has no output '{n}'")
        if got[n].shape != ref[n].shape:
            raise EdgekitError(f"validation: output '{n}' has shape {got[n].shape}, the reference gives {ref[n].shape}")
        a, b = got[n].astype(np.float64), ref[n].astype(np.float64)
        if a.size and not np.isfinite(a).all():
            raise EdgekitError(f"validation: output '{n}' of the candidate is not finite (NaN or inf)")
        stats[n] = {"max_abs_diff": float(np.abs(a - b).max()) if a.size else 0.0,
                    "scale": float(np.abs(b).max()) if b.size else 0.0}
    return stats


def _cache_from(spec: DecoderSpec, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {past: outputs[present] for past, present in zip(spec.past_names(), spec.present_names())}


def run(reference, candidate, spec: DecoderSpec, fidelity: bool = False, text=None, text_source: str = "text",
        advance=lambda *a, **k: None) -> dict:
    """Both runners (activated) on the same seeded cases; the results, not judged.

    fidelity: each side decodes on the cache its own prefill produced, as in real use (a random cache makes
    R1's discrete block routing flip on tiny int8 errors), and `text` (in-distribution token ids,
    Resolved.fidelity_text) replaces random tokens, which are out of distribution for a trained model."""
    text = text if fidelity else None
    results = {"cases": [], "inputs": "random tokens" if text is None else text_source, "fidelity": fidelity}
    cos_all, agree, total = [], 0, 0
    for i, case in enumerate(cases(spec)):
        feeds = spec.dummy(*case["shape"], seed=100 + i, thresholds=case["thresholds"], text=text, pads=case["pads"])
        if fidelity and case["shape"][2] > 0:
            b, seq, past = case["shape"]
            prefill = spec.dummy(b, past + (0 if text is None else seq), 0, seed=200 + i,
                                 thresholds=case["thresholds"], text=text)
            if text is not None:  # one continuous window of the text: the prefill, then what follows it
                feeds["input_ids"] = prefill["input_ids"][:, past:]
                prefill["input_ids"] = prefill["input_ids"][:, :past]
            prefill[MASK] = feeds[MASK][:, :past]  # the same left padding
            ref = reference.infer({**feeds, **_cache_from(spec, reference.infer(prefill))})
            got = candidate.infer({**feeds, **_cache_from(spec, candidate.infer(prefill))})
        else:
            ref, got = reference.infer(feeds), candidate.infer(feeds)
        stats = compare_outputs(ref, got, spec.output_names)
        relative = {n: s["max_abs_diff"] / max(1.0, s["scale"]) for n, s in stats.items()}
        worst = max(relative, key=relative.get)
        entry = {"batch_seq_past": list(case["shape"]), "setting": case["label"],
                 **({"left_pads": list(case["pads"])} if case["pads"] is not None else {}),
                 "max_abs_diff": max(s["max_abs_diff"] for s in stats.values()),
                 "logits_max_abs_diff": stats["logits"]["max_abs_diff"], "logits_scale": stats["logits"]["scale"],
                 "worst_output": worst, "worst_relative_diff": relative[worst]}
        if spec.gated:
            entry["executed"] = ref["executed"].astype(int).tolist()
            entry["executed_candidate"] = np.asarray(got["executed"]).astype(int).tolist()
        a, b = ref["logits"].reshape(-1, ref["logits"].shape[-1]), got["logits"].reshape(-1, got["logits"].shape[-1])
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        cos_all.append(cos)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        entry["logit_cosine_min"] = float(cos.min())
        results["cases"].append(entry)
        advance(1)
    cos = np.concatenate(cos_all)
    results.update(logit_cosine_mean=float(cos.mean()), logit_cosine_min=float(cos.min()),
                   argmax_agreement=agree / total, max_abs_diff=max(c["max_abs_diff"] for c in results["cases"]),
                   max_relative_diff=max(c["worst_relative_diff"] for c in results["cases"]),
                   distinct_skip_patterns=len({str(c.get("executed")) for c in results["cases"]}))
    return results


def judge(results: dict, tolerance: float | None = None, min_cosine: float | None = None) -> dict:
    """Pass or raise. tolerance: every output of every case within tolerance x max(1, max |reference|),
    and the same skip pattern as the reference (an exact graph); min_cosine: the mean logit cosine floor
    (a quantized graph, whose discrete skip decisions may flip near a threshold)."""
    for c in results["cases"]:
        if tolerance is not None and c.get("executed") != c.get("executed_candidate"):
            raise EdgekitError(f"validation: skip pattern differs at {c['setting']} {tuple(c['batch_seq_past'])}: "
                               f"reference {c['executed']} vs candidate {c['executed_candidate']}")
        if tolerance is not None and c["worst_relative_diff"] > tolerance:
            raise EdgekitError(f"validation failed: output '{c['worst_output']}' differs by "
                               f"{c['worst_relative_diff']:.3g} of its scale > {tolerance:g} at {c['setting']} "
                               f"batch/seq/past={tuple(c['batch_seq_past'])} (max abs diff {c['max_abs_diff']:.3g})",
                               "the exported graph is wrong")
    if min_cosine is not None and results["logit_cosine_mean"] < min_cosine:
        raise EdgekitError(f"validation failed: logit cosine {results['logit_cosine_mean']:.4f} < {min_cosine}",
                           "lower --min-cosine only if you accept the loss")
    return {**results, "tolerance": tolerance, "tolerance_basis": "max abs diff / max(1, max |reference|)",
            "min_cosine": min_cosine, "passed": True}


def validate(reference, candidate, spec: DecoderSpec, tolerance: float | None = 1e-3, min_cosine: float | None = None,
             advance=lambda *a, **k: None, text=None, text_source: str = "text") -> dict:
    """run + judge: an exact check (tolerance) or a fidelity check (min_cosine, own-prefill caches, text)."""
    results = run(reference, candidate, spec, fidelity=min_cosine is not None, text=text, text_source=text_source,
                  advance=advance)
    return judge(results, tolerance=tolerance, min_cosine=min_cosine)


def against_torch(model, candidate, min_cosine: float, advance=None) -> dict:
    """A graph or engine (`candidate`, anything with infer) vs the PyTorch `model` on the seeded cases: the
    logit-cosine gate, and for a gated model the skip pattern must match exactly where it is unambiguous (all
    gates open, all closed); other settings may flip near a threshold at reduced precision. A short report."""
    from edgekit.resolve import Resolved
    from runtimes.torch import TorchRunner

    spec = DecoderSpec(model.cfg)
    with TorchRunner(Resolved("preset", model.cfg.name, model.cfg, model=model), dtype="fp32", device="cpu") as ref:
        results = run(ref, candidate, spec, fidelity=True, advance=advance or (lambda *a, **k: None))
        if spec.gated:
            for i, case in enumerate(cases(spec)):
                if case["label"] not in ("run-all", "skip-all-gated"):
                    continue
                feeds = spec.dummy(*case["shape"], seed=100 + i, thresholds=case["thresholds"], pads=case["pads"])
                want, got = ref.infer(feeds)["executed"], candidate.infer(feeds)["executed"]
                if not np.array_equal(want.astype(bool), got.astype(bool)):
                    raise EdgekitError(f"validation: skip pattern {got.astype(int).tolist()} != PyTorch "
                                       f"{want.astype(int).tolist()} at {case['label']} {case['shape']}",
                                       "the exported conditionals are wrong")
    report = judge(results, min_cosine=min_cosine)
    keep = ("logit_cosine_mean", "logit_cosine_min", "argmax_agreement", "max_abs_diff", "distinct_skip_patterns",
            "min_cosine", "passed")
    return {k: report[k] for k in keep if k in report} | {"cases": len(report["cases"])}


def save(results: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(results, indent=1, allow_nan=False))


def window_nll(runner, spec: DecoderSpec, ids: np.ndarray, window: int, w: int, thresholds=None) -> np.ndarray:
    """Per-token negative log-likelihood [window] of `runner` on window `w` of `ids`, scored from an empty
    cache (every position predicts the next token)."""
    chunk = ids[w * window:(w + 1) * window + 1]
    feeds = spec.dummy(1, window, 0, thresholds=thresholds)
    feeds["input_ids"] = chunk[None, :-1]
    logits = runner.infer(feeds)["logits"][0]  # [S, V]
    top = logits.max(-1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(-1, dtype=np.float64)) + top[:, 0]  # float32 exp, float64 sums
    return lse - logits[np.arange(window), chunk[1:]].astype(np.float64)


def _windows(ids, window: int, max_windows: int) -> tuple[np.ndarray, int]:
    ids = np.asarray(ids, np.int64)
    n = min(max_windows, (len(ids) - 1) // window)
    if n < 1:
        raise EdgekitError(f"perplexity needs at least {window + 1} tokens of text, got {len(ids)}",
                           "pass a longer text file")
    return ids, n


def perplexity(runner, spec: DecoderSpec, ids: list[int], window: int = 256, max_windows: int = 8,
               thresholds=None) -> dict:
    """Perplexity of `runner` on token ids: non-overlapping windows, each scored from an empty cache
    (every position predicts the next token). Returns ppl, tokens, windows."""
    ids, n = _windows(ids, window, max_windows)
    nll = sum(float(window_nll(runner, spec, ids, window, w, thresholds).sum()) for w in range(n))
    return {"ppl": math.exp(nll / (n * window)), "tokens": n * window, "windows": n, "window": window}


GATE_SIGMAS = 3.0  # the perplexity gate stops once its estimate is this many standard errors from the limit
GATE_MIN_WINDOWS = 2


def perplexity_gate(reference, candidate, spec: DecoderSpec, ids: list[int], max_increase: float,
                    source: str = "text", max_windows: int = 8) -> dict:
    """Perplexity of both runners on the same windows of `ids`; raises when the candidate's exceeds the
    reference's by more than `max_increase` (0.02 = the brief's "< 2 % loss").

    Sequential: the increase is exp(mean per-token NLL difference) - 1 over the windows scored so far; from
    GATE_MIN_WINDOWS on, scoring stops once that mean is GATE_SIGMAS standard errors below (pass) or above
    (fail) log(1 + max_increase), and otherwise goes on to max_windows, judged on the estimate as a fixed-length
    gate would be. The standard error is sd / sqrt(tokens): on SmolLM2-135M int8 vs fp32 the per-token
    differences are nearly independent (lag-1 autocorrelation 0.02; the sd of 256-token window means, 0.0065,
    matches 0.124 / sqrt(256)), so a lossless int8 (+0.5 %, sd 0.12) passes after 3 windows instead of 8."""
    window = max(8, min(256, spec.cfg.max_seq_len, (len(ids) - 1) // 2))
    ids, n = _windows(ids, window, max_windows)
    limit = math.log1p(max_increase)
    ref_nll, diffs, stopped = [], [], "all windows"
    for w in range(n):
        r = window_nll(reference, spec, ids, window, w)
        diffs.append(window_nll(candidate, spec, ids, window, w) - r)
        ref_nll.append(float(r.sum()))
        d = np.concatenate(diffs)
        mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))
        if w + 1 >= GATE_MIN_WINDOWS and abs(mean - limit) > GATE_SIGMAS * se:
            stopped = "below the limit" if mean < limit else "above the limit"
            break
    tokens = d.size
    ref_ppl = math.exp(sum(ref_nll) / tokens)
    increase = math.expm1(mean)
    report = {"reference": ref_ppl, "candidate": ref_ppl * math.exp(mean), "increase": increase,
              "increase_se": se, "increase_upper": math.expm1(mean + GATE_SIGMAS * se), "sigmas": GATE_SIGMAS,
              "max_increase": max_increase, "tokens": tokens, "windows": len(diffs), "max_windows": n,
              "window": window, "stopped": stopped, "text": source}
    if not math.isfinite(increase) or increase > max_increase:
        raise EdgekitError(f"validation failed: perplexity {report['candidate']:.3f} vs {ref_ppl:.3f} "
                           f"(+{100 * increase:.2f} % > {100 * max_increase:g} %) on {source}",
                           "raise --max-ppl-increase only if you accept the loss")
    return report


def _key(feeds: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(feeds):
        a = np.ascontiguousarray(feeds[name])
        h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:32]


class Recording:
    """Wraps an activated runner; remembers every output it gives, keyed by a hash of the feeds."""

    def __init__(self, runner):
        self.runner, self.outputs = runner, {}

    def infer(self, feeds):
        out = self.runner.infer(feeds)
        self.outputs[_key(feeds)] = out
        return out

    def save(self, path: str | Path) -> None:
        flat = {f"{k}/{name}": np.asarray(v) for k, out in self.outputs.items() for name, v in out.items()}
        with open(path, "wb") as f:
            np.savez_compressed(f, **flat)


class Recorded:
    """Replays a Recording: infer(feeds) returns the recorded outputs for the same feeds."""

    def __init__(self, path: str | Path):
        try:
            with np.load(path, allow_pickle=False) as z:
                flat = {k: z[k] for k in z.files}
        except (OSError, ValueError) as e:
            raise EdgekitError(f"cannot read recorded outputs {path}: {e}", "record them again") from None
        self.outputs: dict[str, dict[str, np.ndarray]] = {}
        for k, v in flat.items():
            key, _, name = k.partition("/")
            self.outputs.setdefault(key, {})[name] = v

    def infer(self, feeds):
        try:
            return self.outputs[_key(feeds)]
        except KeyError:
            raise EdgekitError("these inputs were not recorded", "record with the same model config and cases "
                               "(edgekit.validate.cases)") from None
