"""`edgekit cascade calibrate R1 V3 --data FILE --rate 0.2 --out POLICY.json`.

Data: a .jsonl file of {"prompt": ..., "answer": ...} objects (answer optional) or a text file with one
prompt per line. Both models answer every prompt greedily (through the scheduler, batched); a request
is correct when the model stops (EOS) with exactly the answer. With answers the probe is fitted to predict
"primary wrong, fallback right"; the threshold puts round(rate x n) requests of the data below it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.serve.cascade import POLICY_FORMAT, SIGNALS, Policy, features, fit_probe, threshold_for
from edgekit.serve.scheduler import Request, Scheduler


def read_data(path: str | Path) -> list[dict]:
    from edgekit.resolve import read_text

    path = Path(path)
    text = read_text(path, "--data")
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except ValueError as e:
                raise EdgekitError(f"{path}:{n} is not JSON ({e})", "one {\"prompt\": ..., \"answer\": ...} "
                                   "object per line") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) \
                    or not isinstance(row.get("answer", ""), str):
                raise EdgekitError(f"{path}:{n} needs a string \"prompt\" (and optionally a string \"answer\")",
                                   "one {\"prompt\": ..., \"answer\": ...} object per line")
            rows.append(row)
        else:
            rows.append({"prompt": line})
    if len(rows) < 2:
        raise EdgekitError(f"{path} has {len(rows)} prompt(s)", "calibrating a threshold needs many (hundreds)")
    return rows


def answer_all(runner, tokenizer, prompts: list[list[int]], max_tokens: list[int],
               max_batch: int = 16, thresholds=None) -> list[Request]:
    """Greedy answers for every prompt through one scheduler (no thread: step until idle)."""
    s = Scheduler(runner, "dynamic", max_batch, queue_limit=len(prompts) + 1, thresholds=thresholds,
                  eos=tokenizer.eos_id, solo_prefill=True)  # as the cascade's primary serves
    reqs = [s.submit(Request(p, m)) for p, m in zip(prompts, max_tokens)]
    while not s.idle():
        s.step()
    if s.error is not None:
        raise s.error
    return reqs


def correct(tokenizer, req: Request, answer: str) -> bool:
    return req.finish_reason == "stop" and tokenizer.decode([t for t in req.tokens if t != tokenizer.eos_id]) == answer


def calibrate(primary, fallback, data: str | Path, rate: float, out: str | Path, signal: str = "probe",
              max_tokens: int = 32, threads: int | None = None, force: bool = False) -> dict:
    import contextlib

    from edgekit.artifact import sha256_file
    from edgekit.serve.service import Options, model_hash, open_model

    if signal not in SIGNALS:
        raise EdgekitError(f"unknown --signal {signal!r}", f"use one of {', '.join(SIGNALS)}")
    if not 0.0 <= rate <= 1.0:
        raise EdgekitError(f"--rate must be between 0 and 1, got {rate}", "pass --rate 0.2 for 20 % escalation")
    out = Path(out)
    if out.exists() and not force:
        raise EdgekitError(f"{out} already exists", "pass --force to replace it, or choose another --out")
    rows = read_data(data)
    answers = [r.get("answer") for r in rows]
    have_answers = all(a is not None for a in answers)
    if signal == "probe" and not have_answers:
        raise EdgekitError(f"the probe is fitted on answers; {data} has prompts without an \"answer\"",
                           "add answers (.jsonl), or pass --signal margin / neg_entropy / mean_logprob")
    result = {}
    with contextlib.ExitStack() as stack:
        runners = []
        for target in (primary, fallback):
            runner, _ = open_model(target, Options(threads=threads), stack)
            runners.append(stack.enter_context(runner))
        tok = runners[0].resolved.tokenizer()
        prompts = [tok.encode(r["prompt"]) for r in rows]
        # with answers: as many tokens as the answer and its EOS (decides exact match, like edgekit.tasks)
        limits = [_answer_len(tok, a) + 1 if have_answers else max_tokens for a in answers]
        limits = [max(1, min(m, runners[0].cfg.max_seq_len - len(p))) for m, p in zip(limits, prompts)]
        first = answer_all(runners[0], tok, prompts, limits)
        second = answer_all(runners[1], tok, prompts, limits) if have_answers else None
        ok1 = np.array([correct(tok, r, a) for r, a in zip(first, answers)]) if have_answers else None
        ok2 = np.array([correct(tok, r, a) for r, a in zip(second, answers)]) if have_answers else None
        policy = {"edgekit_cascade_policy": POLICY_FORMAT, "signal": signal, "rate": rate,
                  "models": {role: {"name": r.cfg.name, "sha256": model_hash(r), "source": str(t)}
                             for role, r, t in (("primary", runners[0], primary), ("fallback", runners[1], fallback))},
                  "data": {"file": str(data), "sha256": sha256_file(Path(data)), "n": len(rows)}}
        if signal == "probe":
            x = np.stack([features(r) for r in first])
            policy["probe"] = fit_probe(x, (ok2 & ~ok1).astype(np.float64))
        scorer = Policy({**policy, "threshold": 0.0})
        scores = [scorer.score(r) for r in first]
        policy["threshold"] = threshold = threshold_for(scores, rate)
        escalate = np.array([s < threshold for s in scores])
        policy["achieved_rate"] = float(escalate.mean())
        if have_answers:
            result = {"primary_accuracy": float(ok1.mean()), "fallback_accuracy": float(ok2.mean()),
                      "cascade_accuracy": float(np.where(escalate, ok2, ok1).mean())}
            policy["calibration"] = result
    tmp = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(policy, indent=1) + "\n")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise EdgekitError(f"cannot write {out}: {e.strerror or e}", "choose another --out") from None
    return {"policy": str(out), "signal": signal, "threshold": threshold, "rate": rate,
            "achieved_rate": policy["achieved_rate"], "n": len(rows), **result}


def _answer_len(tok, answer: str) -> int:
    from edgekit.tokenizer import ByteTokenizer

    return len(tok.encode(answer, bos=False) if isinstance(tok, ByteTokenizer) else tok.encode(answer))
