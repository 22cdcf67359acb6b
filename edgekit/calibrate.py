"""Post-hoc selective activation for Hugging Face models (`edgekit calibrate-skip`, issue 9).

A pretrained qwen2 / llama / deepseek_v3 model has no skip gates, so we fit them after the fact:

1. Measure. On calibration text (tokenized with the model's tokenizer.json, cut into chunks) every
   decoder layer's contribution per token: r = ||h_out - h_in|| / ||h_in||, the relative change the
   layer makes to the residual stream.
2. Fit. One cheap probe per layer on the layer's own normed input x = input_layernorm(h_in), which the
   layer computes anyway: log r ~ x . w + b, ridge least squares in float64 (normal equations, torch).
   The gate predicts r_hat = exp(x . w + b) > 0 per token; one decision per layer, row and call, as R1:
   a row runs the layer when mean(r_hat over its real new tokens) > threshold, else it keeps its hidden state.
3. Choose. On held-out calibration chunks: the probe's R^2, and perplexity at one threshold per
   "k layers skipped" step, both with one decision per chunk (a prompt) and one per token (decoding;
   computed in one pass, see GatedHFCausalLM.per_token); the default threshold is the largest whose
   perplexity stays within --max-ppl-increase of the ungated model in both modes.
4. Write. A checkpoint directory: the source's config/tokenizer files, its *.safetensors hard-linked
   (copied across file systems), skip_gates.safetensors (the probes) and skip_gates.json (gated
   layers, default threshold, calibration stats). edgekit.hfconfig resolves it as a gated model.

The KV cache of a skipped layer: later tokens attend to every layer's cache, so a skipped layer must
still append its K/V. As R1 does, each gated layer computes x = input_layernorm(h) and its cached K/V
(k_proj/v_proj + rotary key; for DeepSeek-V3's MLA the compressed latent + rotary key) *outside* the
condition and appends them to the cache; the condition (torch.cond -> ONNX If) decides only the query,
attention output, residual and MLP. A skipped layer therefore costs its norm, K/V projections and the
gate dot product, and leaves exactly the cache the layer would have written for the hidden state it
saw. Inside the branch: the query, transformers' own eager attention over the cached K/V, o_proj and the
MLP (qwen2 / llama); for deepseek_v3 the transformers decoder layer itself (MLA, MoE) reading K/V
through a cache stand-in that returns the precomputed tensors.
Approximation (documented, measured by the perplexity curve): the gates are fitted on hidden states of
the ungated model; after an earlier skip a later layer sees a slightly different input.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.hfconfig import FORMAT, GATES_FILE, STATS_FILE, HFConfig, has_gates
from edgekit.models.hf import GatedHFCausalLM, SkipGate


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "hard-link"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


# --- measuring and fitting --------------------------------------------------------------------------

def read_tokens(directory: Path, cfg: HFConfig, data: Path) -> list[int]:
    from edgekit.hfconfig import HFTokenizer
    from edgekit.resolve import read_text

    text = read_text(data, "--data")
    return HFTokenizer(directory, cfg).encode(text)


def chunks_of(ids: list[int], seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """[N, seq_len] non-overlapping chunks (the tail shorter than seq_len is dropped)."""
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n < 2:
        raise EdgekitError(f"calibration text gives {len(ids)} tokens: fewer than 2 chunks of --seq-len {seq_len}",
                           "pass more text or a smaller --seq-len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _all_run(n: int) -> torch.Tensor:
    return torch.full((n,), -math.inf)


@torch.no_grad()
def measure(model: GatedHFCausalLM, chunks: torch.Tensor, batch: int = 8):
    """Yield, per forward batch, {layer: (x [T, D], r [T])} from the ungated model (every layer runs)."""
    for start in range(0, len(chunks), batch):
        model.record = []
        try:
            model(chunks[start:start + batch], thresholds=_all_run(model.cfg.n_layers))
            yield {i: (x.reshape(-1, x.shape[-1]).double(), r.reshape(-1).double()) for i, x, r in model.record}
        finally:
            model.record = None


@torch.no_grad()
def fit_gates(model: GatedHFCausalLM, chunks: torch.Tensor, ridge: float = 1e-3) -> dict[int, dict]:
    """Ridge least squares of log r on [x, 1] per gated layer (normal equations, float64); sets the gates."""
    d = model.cfg.d_model
    layers = [int(i) for i in model.gates]
    xtx = {i: torch.zeros(d + 1, d + 1, dtype=torch.float64) for i in layers}
    xty = {i: torch.zeros(d + 1, dtype=torch.float64) for i in layers}
    n = {i: 0 for i in layers}
    for rec in measure(model, chunks):
        for i, (x, r) in rec.items():
            xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            xtx[i] += xa.T @ xa
            xty[i] += xa.T @ r.clamp_min(1e-8).log()
            n[i] += len(x)
    out = {}
    for i in layers:
        reg = ridge * xtx[i].diagonal()[:d].mean().clamp_min(1e-12) * torch.eye(d + 1, dtype=torch.float64)
        reg[d, d] = 0.0  # the bias is not shrunk
        sol = torch.linalg.solve(xtx[i] + reg, xty[i])
        gate = model.gates[str(i)]
        gate.w.copy_(sol[:d].to(gate.w.dtype))
        gate.b.copy_(sol[d].to(gate.b.dtype))
        out[i] = {"fit_tokens": n[i]}
    return out


@torch.no_grad()
def probe_quality(model: GatedHFCausalLM, chunks: torch.Tensor) -> dict[int, dict]:
    """Per gated layer on held-out chunks: measured mean r, predicted mean r, R^2 of log r (per token) and
    the correlation of per-chunk mean r with the per-chunk mean prediction (what one decision uses)."""
    acc: dict[int, dict[str, list]] = {}
    seq = chunks.shape[1]
    for rec in measure(model, chunks):
        for i, (x, r) in rec.items():
            a = acc.setdefault(i, {"r": [], "pred": []})
            a["r"].append(r)
            a["pred"].append(model.gates[str(i)](x.float()).double())
    out = {}
    for i, a in sorted(acc.items()):
        r, pred = torch.cat(a["r"]), torch.cat(a["pred"])
        y, yhat = r.clamp_min(1e-8).log(), pred.log()
        r2 = 1 - float(((y - yhat) ** 2).sum() / ((y - y.mean()) ** 2).sum().clamp_min(1e-30))
        cr, cp = r.view(-1, seq).mean(1), pred.view(-1, seq).mean(1)
        corr = float(torch.corrcoef(torch.stack([cr, cp]))[0, 1]) if len(cr) > 1 else float("nan")
        out[i] = {"r_mean": float(r.mean()), "r_pred_mean": float(pred.mean()), "r2_log_token": r2,
                  "corr_chunk_mean": None if math.isnan(corr) else corr}
    return out


@torch.no_grad()
def perplexity(model: GatedHFCausalLM, chunks: torch.Tensor, threshold: float, per_token: bool = False,
               batch: int = 1) -> dict:
    """Next-token perplexity over the chunks and the mean number of layers skipped per decision.
    per_token=False (prefill): each chunk is one call, one skip decision per layer per chunk.
    per_token=True (decode): one decision per layer per token, as when the chunk is fed one token per call."""
    thr = torch.full((model.cfg.n_layers,), float(threshold))
    nll, count, skipped, decisions = 0.0, 0, 0, 0
    model.per_token = per_token
    try:
        for start in range(0, len(chunks), batch):
            ids = chunks[start:start + batch]
            logits, _, executed = model(ids, thresholds=thr)
            nll += float(nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
            if per_token:
                executed = executed[..., :-1]  # the tokens that are scored (as in decoding: no call after the last)
            skipped += int((~executed).sum())
            decisions += executed[0].numel()
    finally:
        model.per_token = False
    return {"threshold": float(threshold), "ppl": math.exp(nll / count), "layers_skipped_mean": skipped / decisions}


def candidate_thresholds(quality: dict[int, dict], per_gap: int = 3) -> list[float]:
    """0 (nothing skipped); below, between (per_gap geometric steps) and at the layers' mean predicted
    contributions sorted; then 10x the largest (every gated layer skipped on a typical call). Per-call
    and per-token predictions spread around the means, so the points in between skip fractions of layers."""
    m = sorted(q["r_pred_mean"] for q in quality.values())
    if not m:
        return [0.0]
    grid = [m[0] * 0.7, m[0] * 0.85]
    for a, b in zip(m, m[1:]):
        grid += [a ** (1 - f) * b ** f for f in (k / (per_gap + 1) for k in range(per_gap + 1))]
    grid += [m[-1], 10 * m[-1]]
    return [0.0, *sorted(set(grid))]


def calibrate_skip(*args, **kwargs) -> dict:
    """_calibrate_skip, with third-party warnings and logs in OUT/logs/calibrate.log (edgekit.quiet)."""
    from edgekit.quiet import captured

    with captured(None, "calibrate-skip") as log:
        return _calibrate_skip(*args, log=log, **kwargs)


def _calibrate_skip(source: str | Path, data: str | Path, out: str | Path, layers: list[int] | None = None,
                    seq_len: int = 128, max_tokens: int | None = 65536, holdout: float = 0.2,
                    max_ppl_increase: float = 0.05, threshold: float | None = None, force: bool = False,
                    progress=None, log=None) -> dict:
    """Fit skip gates for a Hugging Face model directory on calibration text and write a gated checkpoint."""
    from edgekit.artifact import check_target, dumps, sha256_file, staging

    check_target(Path(out), force)  # before any work
    from edgekit.hfconfig import is_hf_dir, read_hf_config, write_side_files
    from edgekit.models.hf import load

    source = Path(source)
    if not source.is_dir() or not is_hf_dir(source):
        raise EdgekitError(f"{source} is not a Hugging Face model directory (config.json with model_type)",
                           "pass a local qwen2, llama or deepseek_v3 directory")
    if has_gates(source):
        raise EdgekitError(f"{source} already has skip gates", "calibrate the original Hugging Face directory")
    cfg = read_hf_config(source)  # unsupported model_type -> error naming the supported ones
    if seq_len < 2:
        raise EdgekitError(f"--seq-len {seq_len} is too short", "use at least 2 tokens per chunk")
    seq_len = min(seq_len, cfg.max_seq_len)
    if not 0.0 < holdout < 1.0:
        raise EdgekitError(f"--holdout {holdout} must be between 0 and 1", "e.g. 0.2")
    if layers is None:
        layers = list(range(cfg.n_layers))
    bad = [i for i in layers if not 0 <= i < cfg.n_layers]
    if bad or not layers:
        raise EdgekitError(f"--layers {bad or layers}: the model has layers 0..{cfg.n_layers - 1}",
                           "pass layer indices in that range")
    layers = sorted(set(layers))
    chunks = chunks_of(read_tokens(source, cfg, data), seq_len, max_tokens)
    n_eval = max(1, round(len(chunks) * holdout))
    fit_chunks, eval_chunks = chunks[:-n_eval], chunks[-n_eval:]

    step = progress or (lambda *a, **k: None)
    model = load(source)
    gated = GatedHFCausalLM(model.hf, cfg, {i: SkipGate(cfg.d_model) for i in layers}).eval()
    step("measuring layer contributions and fitting gates")
    fit = fit_gates(gated, fit_chunks)
    step("checking the gates on held-out chunks")
    quality = probe_quality(gated, eval_chunks)
    candidates = candidate_thresholds(quality)
    curve = [perplexity(gated, eval_chunks, t) for t in candidates]
    curve_decode = [perplexity(gated, eval_chunks, t, per_token=True) for t in candidates]
    base = curve[0]["ppl"]
    if threshold is None:  # within the budget both for prompts (prefill) and generated tokens (decode)
        limit = base * (1 + max_ppl_increase)
        threshold = max(a["threshold"] for a, b in zip(curve, curve_decode) if a["ppl"] <= limit and b["ppl"] <= limit)
    chosen = perplexity(gated, eval_chunks, threshold)
    chosen_decode = perplexity(gated, eval_chunks, threshold, per_token=True)
    stats = {"format": FORMAT, "source": str(source.resolve()), "model_type": cfg.model_type,
             "gated_layers": layers, "default_threshold": float(threshold),
             "gate": "run layer i for a row when the mean over its real new tokens of exp(input_layernorm(h) . w_i + "
                     "b_i) > threshold_i (the layer runs when any row of the batch needs it)",
             "contribution": "||h_out - h_in|| / ||h_in|| per token",
             "kv_cache": "K/V of every layer computed and cached outside the condition; a skip drops query, "
                         "attention output and MLP",
             "calibration": {"data": str(Path(data).resolve()), "seq_len": seq_len, "fit_chunks": len(fit_chunks),
                             "eval_chunks": len(eval_chunks), "fit_tokens": fit_chunks.numel(),
                             "max_ppl_increase": max_ppl_increase},
             "layers": {str(i): {**fit[i], **quality[i]} for i in layers},
             "curve": curve, "curve_decode": curve_decode,
             "chosen": {**chosen, "ppl_increase": chosen["ppl"] / base - 1,
                        "decode": {**chosen_decode, "ppl_increase": chosen_decode["ppl"] / base - 1}}}
    out = Path(out)
    linked = {}
    with staging(out, force) as tmp:
        write_side_files(tmp, source)
        if log is not None:
            log.copy_into(tmp, "calibrate.log")
        for f in sorted(source.glob("*.safetensors")):
            linked[f.name] = _link_or_copy(f, tmp / f.name)
        if (source / "model.safetensors.index.json").is_file():
            shutil.copyfile(source / "model.safetensors.index.json", tmp / "model.safetensors.index.json")
        from safetensors.torch import save_file

        tensors = {}
        for i in layers:
            g = gated.gates[str(i)]
            tensors[f"layers.{i}.w"] = g.w.detach().contiguous()
            tensors[f"layers.{i}.b"] = g.b.detach().contiguous()
        save_file(tensors, str(tmp / GATES_FILE), metadata={"format": FORMAT})
        stats["gates_sha256"] = sha256_file(tmp / GATES_FILE)
        stats["weights"] = linked
        (tmp / STATS_FILE).write_text(dumps(stats, indent=1))
    return {"out": str(out), **{k: v for k, v in stats.items() if k != "format"}}


def parse_layers(text: str | None) -> list[int] | None:
    """'1,2,5' -> [1, 2, 5]; None -> None (all layers)."""
    if text is None:
        return None
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise EdgekitError(f"--layers '{text}' is not a comma-separated list of layer numbers",
                           "e.g. --layers 2,3,4") from None
