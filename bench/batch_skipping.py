"""What batching does to R1's layer skipping (issue 17): r1-ref's trained gates decide per row, and a gated
layer's `If` runs when any row of the batch needs it. Random held-out task prompts (edgekit.tasks.test_split,
seeded order) are left-padded into batches of 1 / 4 / 16 in arrival order and greedy-decoded through the torch
runtime with their attention mask; each batch decodes until its longest answer is done (rows that finished keep
decoding: a server that drops them would skip a little more). Reports, per batch size, the executed fraction of
the gated layers (per call: the If ran; prefill and decode apart) and exact-match accuracy, which masking keeps
equal to batch 1's.

    PYTHONPATH=. python bench/batch_skipping.py [--prompts 192] [--out bench/results/batch_skipping.json]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from edgekit import tasks
from edgekit.resolve import resolve
from runtimes.torch import TorchRunner


def run(runner, problems, batch: int) -> dict:
    gated = list(runner.cfg.gated_layers)
    pre, dec, correct = [], [], 0
    for start in range(0, len(problems), batch):
        group = problems[start:start + batch]
        prompts = [p.prompt_ids() for p in group]
        wants = [p.answer_ids() for p in group]
        width = max(map(len, prompts))
        ids = np.zeros((len(group), width), np.int64)
        mask = np.zeros_like(ids)
        for b, pr in enumerate(prompts):
            ids[b, width - len(pr):], mask[b, width - len(pr):] = pr, 1
        sess = runner.session(len(group))
        out = [[] for _ in group]
        tok, m = ids, mask
        for step in range(max(map(len, wants))):
            logits, executed = sess.step(tok, m)
            (dec if step else pre).append(executed[gated].astype(bool))
            tok, m = logits.argmax(-1)[:, None], None
            for b in range(len(group)):
                out[b].append(int(tok[b, 0]))
        for got, want in zip(out, wants):
            got = got[:got.index(tasks.EOS) + 1] if tasks.EOS in got else got
            correct += got == want
    pre, dec = np.stack(pre), np.stack(dec)
    return {"batch": batch, "calls": len(pre) + len(dec), "prefill_executed_fraction": float(pre.mean()),
            "decode_executed_fraction": float(dec.mean()),
            "executed_fraction": float(np.concatenate([pre, dec]).mean()),
            "executed_fraction_per_layer": [round(float(x), 4) for x in np.concatenate([pre, dec]).mean(0)],
            "accuracy": correct / len(problems)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=192)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    problems = tasks.test_split()
    random.Random(args.seed).shuffle(problems)
    problems = problems[:args.prompts]
    with TorchRunner(resolve("r1-ref"), threads=1) as runner:
        rows = [run(runner, problems, int(b)) for b in args.batches.split(",")]
    cfg = runner.cfg
    report = {"model": "r1-ref", "threshold": cfg.default_threshold, "gated_layers": list(cfg.gated_layers),
              "prompts": len(problems), "seed": args.seed, "results": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
