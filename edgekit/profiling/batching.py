"""`--workload mixed`: a seeded set of requests of mixed prompt lengths, batched in arrival order
("fixed") or grouped by length under a token budget ("dynamic"), and what each batching achieves."""

from __future__ import annotations

import statistics
import time

import numpy as np

from edgekit.profiling.timing import Samples, gating, one_run


def mixed_requests(n: int, prompt_len: int, seed: int) -> list[int]:
    """Seeded prompt lengths, uniform in [prompt_len/4, 7*prompt_len/4] (mean ~ prompt_len)."""
    rng = np.random.default_rng(seed + 1)
    return [int(x) for x in rng.integers(max(1, prompt_len // 4), max(2, 7 * prompt_len // 4) + 1, n)]


def plan_fixed(lengths: list[int], batch: int) -> list[list[int]]:
    """Arrival order, `batch` requests per call, padded to the longest in the batch."""
    return [list(range(i, min(i + batch, len(lengths)))) for i in range(0, len(lengths), batch)]


def plan_dynamic(lengths: list[int], new_tokens: int, budget: int) -> list[list[int]]:
    """Length-aware: longest first, a batch grows while rows x (its longest prompt + new tokens) <= budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * (lengths[groups[-1][0]] + new_tokens) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def run_workload(runner, lengths: list[int], groups: list[list[int]], new_tokens: int, thresholds, seed: int,
                 pad: int, advance) -> dict:
    """Every group: left-padded prefill (with its attention mask) + decode; wall time over all groups."""
    rng = np.random.default_rng(seed + 2)
    vocab = min(runner.cfg.vocab_size, 256)
    prompts = [rng.integers(0, vocab, n, dtype=np.int64) for n in lengths]
    s = Samples()
    padded = real = 0
    t0 = time.perf_counter()
    for group in groups:
        width = max(lengths[i] for i in group)
        ids = np.full((len(group), width), pad, dtype=np.int64)
        mask = np.zeros((len(group), width), dtype=np.int64)
        for row, i in enumerate(group):
            ids[row, width - lengths[i]:] = prompts[i]
            mask[row, width - lengths[i]:] = 1
        padded += ids.size
        real += sum(lengths[i] for i in group)
        one_run(runner, ids, new_tokens, thresholds, s, lambda *a: None, mask)
        advance(1)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "batches": len(groups), "rows_per_batch_mean": len(lengths) / len(groups),
            "generated_tokens_per_s": len(lengths) * new_tokens / wall, "requests_per_s": len(lengths) / wall,
            "prompt_padding_fraction": 1 - real / padded,
            "gating": gating(runner.cfg, s.executed, s.decode_executed)}


def workload_report(work: dict, lengths: list[int], budget: int, batch: int, new_tokens: int, n: int) -> dict:
    """Per batching mode, the pass with the median throughput (passes alternate between the modes)."""
    out = {"requests": n, "prompt_lengths": lengths, "new_tokens": new_tokens, "batch": batch, "token_budget": budget,
           "note": "prompts are left-padded within a batch and masked (attention_mask), so every row gets the "
                   "tokens it gets alone. R1's gates decide per row; a layer runs (its If) when any row of the "
                   "batch needs it, so batching lowers how often a layer is skipped as a whole."}
    for mode, passes in work.items():
        if not passes:
            continue
        median = statistics.median(p["generated_tokens_per_s"] for p in passes)
        best = min(passes, key=lambda p: abs(p["generated_tokens_per_s"] - median))
        out[mode] = {**best, "generated_tokens_per_s": median, "passes": len(passes),
                     "generated_tokens_per_s_all": [p["generated_tokens_per_s"] for p in passes]}
    if "fixed" in out and "dynamic" in out:
        out["dynamic_over_fixed"] = out["dynamic"]["generated_tokens_per_s"] / out["fixed"]["generated_tokens_per_s"]
    return out
