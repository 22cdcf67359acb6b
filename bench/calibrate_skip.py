"""Post-hoc selective activation (`edgekit calibrate-skip`, issue 9): held-out perplexity vs layers skipped.

    .venv/bin/python bench/calibrate_skip.py [--steps 700] [--work out/calibrate_skip] [--no-export] [--reuse]

There are no real Hugging Face weights on this machine and nothing is downloaded, so the model is
trained here, from scratch, in a few minutes on one CPU thread:

- text: Python's own reference documentation as shipped with the interpreter (`pydoc_data.topics`,
  ~465 K characters of English prose + code), split by position into train (85%), calibration (5%)
  and held-out test (10%);
- tokenizer: a byte-level BPE (1024 tokens) trained on the train split with `tokenizers`;
- model: a tiny Qwen2 (transformers' Qwen2ForCausalLM: 8 layers, d_model 128, 4 query / 2 KV heads,
  MLP 352, tied embeddings, ~1.2 M parameters) trained with AdamW on 128-token windows (seeded).

Then `edgekit.calibrate.calibrate_skip` fits gates on the calibration text (every layer gated) and
the held-out test text is scored at each candidate threshold in two modes:
- prefill: each 128-token chunk is one call (one skip decision per layer per chunk);
- decode: one decision per layer per token, as when the chunk is fed one token per call with the KV
  cache (skipped layers still append their K/V), which is how generation runs. Computed in one pass
  (GatedHFCausalLM.per_token); --decode-chunks chunks are also decoded token by token as a check.
Baseline: static layer dropping in the order of the layers' measured mean contribution (drop the k
least-contributing layers for every call), i.e. what the gates can at best do with one decision per
call if the per-call variation carried no information. With --export the gated model is exported to
ONNX and the validation numbers (ONNX Runtime vs PyTorch) are recorded.
Writes bench/results/calibrate_skip.json and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekit import calibrate  # noqa: E402
from edgekit.hfconfig import HFTokenizer, read_hf_config  # noqa: E402
from edgekit.models.hf import load  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SEQ = 128


def corpus() -> str:
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def splits(text: str) -> dict[str, str]:
    n = len(text)
    a, b = int(n * 0.85), int(n * 0.90)
    return {"train": text[:a], "calibration": text[a:b], "test": text[b:]}


def train_tokenizer(text: str, path: Path, vocab: int = 1024) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    tok.save(str(path))


def train_model(directory: Path, ids: torch.Tensor, steps: int, seed: int = 0) -> dict:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=8,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    g = torch.Generator().manual_seed(seed)
    batch = 8
    losses, t0 = [], time.time()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - SEQ - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss:.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return {"steps": steps, "batch": batch, "seq": SEQ, "final_loss_mean_last_50": sum(losses[-50:]) / 50,
            "params": sum(p.numel() for p in model.parameters()), "seconds": round(time.time() - t0, 1)}


@torch.no_grad()
def decode_ppl(model, chunks: torch.Tensor, threshold: float) -> dict:
    """Token-by-token with the KV cache: one skip decision per layer per token."""
    thr = torch.full((model.cfg.n_layers,), float(threshold))
    nll, count, skipped, calls = 0.0, 0, 0, 0
    for chunk in chunks:
        past = None
        for t in range(chunk.numel() - 1):
            logits, past, executed = model(chunk[None, t:t + 1], past, thr)
            nll += float(torch.nn.functional.cross_entropy(logits[0, -1:], chunk[t + 1:t + 2]))
            count += 1
            skipped += int((~executed).sum())
            calls += 1
    return {"threshold": float(threshold), "ppl": math.exp(nll / count), "layers_skipped_mean": skipped / calls}


@torch.no_grad()
def static_drop_ppl(model, chunks: torch.Tensor, drop: list[int]) -> float:
    thr = torch.tensor([math.inf if i in drop else -math.inf for i in range(model.cfg.n_layers)])
    nll, count = 0.0, 0
    for ids in chunks:
        logits, _, _ = model(ids[None], thresholds=thr)
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:], reduction="sum"))
        count += ids.numel() - 1
    return math.exp(nll / count)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, label, style in (("prefill", "gated, prefill (1 decision / 128-token chunk)", "o-"),
                              ("decode", "gated, decode (1 decision / token)", "s-")):
        pts = result["test"].get(key) or []
        ax.plot([p["layers_skipped_mean"] for p in pts], [p["ppl"] for p in pts], style, label=label)
    st = result["test"]["static_drop"]
    ax.plot([p["layers_dropped"] for p in st], [p["ppl"] for p in st], "x--", color="gray",
            label="static drop, least measured contribution first")
    ax.set_yscale("log")
    base = result["test"]["prefill"][0]["ppl"]
    ax.set_ylim(base * 0.9, base * 4)  # skipping layer 0 too (all 8) is off the chart: see the JSON
    ax.set_xlabel(f"layers skipped per decision: call (prefill) or token (decode), of {result['model']['layers']}")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("calibrate-skip on a tiny trained Qwen2 (Python docs text)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "calibrate_skip")
    ap.add_argument("--decode-chunks", type=int, default=2, help="held-out chunks also decoded token by token "
                    "(checks the one-pass per-token evaluation)")
    ap.add_argument("--no-export", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="keep the model trained by an earlier run in --work")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    work = args.work
    model_dir = work / "qwen2-tiny"
    parts = splits(corpus())
    if args.reuse and (work / "training.json").is_file():  # the model trained by an earlier run (same steps)
        training = json.loads((work / "training.json").read_text())
        for d in ("gated", "onnx"):
            shutil.rmtree(work / d, ignore_errors=True)
        train_ids = torch.tensor(HFTokenizer(model_dir, read_hf_config(model_dir)).encode(parts["train"]))
    else:
        shutil.rmtree(work, ignore_errors=True)
        model_dir.mkdir(parents=True)
        for name, text in parts.items():
            (work / f"{name}.txt").write_text(text, encoding="utf-8")
        train_tokenizer(parts["train"], model_dir / "tokenizer.json")
        cfg_stub = type("C", (), {"bos_token_id": 0, "eos_token_id": 0})
        tok = HFTokenizer(model_dir, cfg_stub)
        train_ids = torch.tensor(tok.encode(parts["train"]))
        training = train_model(model_dir, train_ids, args.steps)
        (work / "training.json").write_text(json.dumps(training))

    t0 = time.time()
    stats = calibrate.calibrate_skip(model_dir, work / "calibration.txt", work / "gated", seq_len=SEQ,
                                     max_tokens=None)
    calib_s = time.time() - t0
    gated = load(work / "gated")
    test_ids = HFTokenizer(model_dir, read_hf_config(model_dir)).encode(parts["test"])
    test = calibrate.chunks_of(test_ids, SEQ)
    thresholds = [c["threshold"] for c in stats["curve"]]
    prefill = [calibrate.perplexity(gated, test, t) for t in thresholds]
    decode = [calibrate.perplexity(gated, test, t, per_token=True) for t in thresholds]
    # the one-pass per-token evaluation vs real token-by-token decoding with the cache, on a few chunks
    check = []
    for t in thresholds[1:-1:2]:
        real = decode_ppl(gated, test[:args.decode_chunks], t)
        fast = calibrate.perplexity(gated, test[:args.decode_chunks], t, per_token=True)
        check.append({"threshold": t, "token_by_token": real, "one_pass": fast,
                      "ppl_rel_diff": abs(real["ppl"] / fast["ppl"] - 1)})
    order = sorted(stats["layers"], key=lambda i: stats["layers"][i]["r_mean"])
    static = [{"layers_dropped": k, "dropped": [int(i) for i in order[:k]],
               "ppl": static_drop_ppl(gated, test, [int(i) for i in order[:k]])} for k in range(len(order) + 1)]
    result = {
        "what": "held-out perplexity vs layers skipped, gates fitted post hoc by edgekit calibrate-skip",
        "model": {"kind": "tiny Qwen2 trained here from scratch (not a real pretrained model)", "layers": 8,
                  "d_model": 128, "heads": "4 query / 2 KV", "vocab": 1024, "training": training},
        "data": {"text": "pydoc_data.topics (Python reference docs shipped with CPython "
                         f"{sys.version.split()[0]})", "chars": {k: len(v) for k, v in parts.items()},
                 "train_tokens": len(train_ids), "test_tokens": test.numel(), "test_chunks": len(test)},
        "calibration": {k: stats[k] for k in ("default_threshold", "layers", "curve", "chosen", "calibration")}
        | {"seconds": round(calib_s, 1)},
        "test": {"prefill": prefill, "decode": decode, "static_drop": static,
                 "decode_check": {"chunks": args.decode_chunks, "points": check}},
        "torch": torch.__version__, "threads": args.threads,
    }
    if not args.no_export:
        from edgekit import api

        t0 = time.time()
        r = api.export(work / "gated", "onnx", work / "onnx")
        v = r["validation"]["fp32"]
        result["export"] = {"if_nodes": r["graph_ops"].get("If", 0), "inputs": r["inputs"][:2],
                            "max_abs_diff": v["max_abs_diff"], "cases": len(v["cases"]),
                            "distinct_skip_patterns": v["distinct_skip_patterns"], "seconds": round(time.time() - t0)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibrate_skip.json").write_text(json.dumps(result, indent=1))
    plot(result, RESULTS / "calibrate_skip.png")
    print(json.dumps({"prefill": prefill, "decode": decode, "static": static, "check": check,
                      "export": result.get("export")}, indent=1))


if __name__ == "__main__":
    main()
