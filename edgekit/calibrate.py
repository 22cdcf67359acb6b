"""Post-hoc selective activation for Hugging Face models (`edgekit calibrate-skip`, issue 9).

A pretrained qwen2 / llama / deepseek_v3 model has no skip gates, so we fit them after the fact:

1. Measure. On calibration text (tokenized with the model's tokenizer.json, cut into chunks) every
   decoder layer's contribution per token: r = ||h_out - h_in|| / ||h_in||, the relative change the
   layer makes to the residual stream.
2. Fit. One cheap probe per layer on the layer's own normed input x = input_layernorm(h_in), which the
   layer computes anyway: log r ~ x . w + b, ridge least squares in float64 (normal equations, torch).
   The gate predicts r_hat = exp(x . w + b) > 0 per token; one decision per layer per call, as R1:
   the layer runs when mean(r_hat over batch and tokens) > threshold, else it is skipped.
3. Choose. On held-out calibration chunks: the probe's R^2, and perplexity at one threshold per
   "k layers skipped" step, both with one decision per chunk (a prompt) and one per token (decoding;
   computed in one pass, see GatedHFCausalLM.per_token); the default threshold is the largest whose
   perplexity stays within --max-ppl-increase of the ungated model in both modes.
4. Write. A checkpoint directory: the source's config/tokenizer files, its *.safetensors hard-linked
   (copied across file systems), skip_gates.safetensors (the probes) and skip_gates.json (gated
   layers, default threshold, calibration stats). edgekit.hf resolves it as a gated model.

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

import json
import math
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.hf import HFCausalLM, HFConfig

GATES_FILE = "skip_gates.safetensors"
STATS_FILE = "skip_gates.json"
FORMAT = "edgekit-skip-gates/1"


class SkipGate(nn.Module):
    """Predicted relative contribution r_hat = exp(x . w + b) per token [B, S] (x: the layer's normed input)."""

    def __init__(self, d_model: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d_model))
        self.b = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x @ self.w + self.b)


class _FixedKV:
    """Stands in for a transformers Cache inside the condition: `update` ignores what the attention
    computed and returns the full K/V that were computed and appended outside the condition."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.k, self.v


def _cache_kv(model_type: str, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The (key, value) this layer's attention writes to its cache for the new tokens, computed as
    transformers does (same modules, same rotary function), without the query or the attention."""
    mod = sys.modules[type(attn).__module__]
    b, s, _ = x.shape
    if model_type == "deepseek_v3":  # MLA: cache = normed compressed latent, shared rotary key
        ckv = attn.kv_a_proj_with_mqa(x)
        k_pass, k_rot = torch.split(ckv, [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
        k_pass = attn.kv_a_layernorm(k_pass).view(b, 1, s, attn.kv_lora_rank)
        k_rot = k_rot.view(b, 1, s, attn.qk_rope_head_dim)
        rope = mod.apply_rotary_pos_emb_interleave if attn.config.rope_interleave else mod.apply_rotary_pos_emb
        return k_pass, rope(k_rot, k_rot, cos, sin)[1]
    shape = (b, s, -1, attn.head_dim)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    return mod.apply_rotary_pos_emb(k, k, cos, sin)[1], v


def _layer_rest(model_type: str, layer: nn.Module, h, x, k_all, v_all, cos, sin, mask) -> torch.Tensor:
    """The decoder layer given its normed input x and the full K/V: query, attention, residual, MLP.
    qwen2 / llama: spelled out with transformers' own rotary and eager attention functions, so nothing
    computed outside the condition is recomputed inside. deepseek_v3: the transformers layer itself with
    a cache stand-in returning the precomputed latent K/V (its norm and latent projection run again in
    the branch: correct, a little wasted work)."""
    if model_type == "deepseek_v3":
        return layer(h, attention_mask=mask, position_embeddings=(cos, sin), cache=_FixedKV(k_all, v_all))
    attn = layer.self_attn
    mod = sys.modules[type(attn).__module__]
    b, s, _ = x.shape
    q = attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    q = mod.apply_rotary_pos_emb(q, q, cos, sin)[0]
    out, _ = mod.eager_attention_forward(attn, q, k_all, v_all, mask, scaling=attn.scaling, dropout=0.0)
    h = h + attn.o_proj(out.reshape(b, s, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _exporting() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


class GatedHFCausalLM(HFCausalLM):
    """HFCausalLM with a SkipGate per gated layer: forward(input_ids, past, thresholds) ->
    (logits, presents, executed [n_layers] bool). Runs the decoder loop itself so that K/V and the
    cache append sit outside each layer's condition."""

    def __init__(self, hf: nn.Module, cfg: HFConfig, gates: dict[int, SkipGate]):
        super().__init__(hf, cfg)
        self.gates = nn.ModuleDict({str(i): g for i, g in gates.items()})
        self.record: list | None = None  # calibration: per layer (x, r) of the last call
        # Evaluation only (eager): decide per token instead of per call; executed is then [n_layers, B, S].
        # Equals feeding the tokens one per call with the cache (a token's K/V come from its own hidden
        # state, skipped or not), so decode-mode perplexity costs one forward.
        self.per_token = False

    def default_thresholds(self) -> torch.Tensor:
        return torch.full((self.cfg.n_layers,), float(self.cfg.default_threshold))

    def forward(self, input_ids: torch.Tensor, past=None, thresholds=None):
        m = self.hf.model
        b, s = input_ids.shape
        dev = input_ids.device
        past = past if past is not None else self.empty_past(b, dev)
        thresholds = thresholds if thresholds is not None else self.default_thresholds().to(dev)
        p = past[0][0].shape[2]
        pos = torch.arange(s, device=dev) + p  # [S]
        keys = torch.arange(p + s, device=dev)  # [P+S]
        h = m.embed_tokens(input_ids)  # [B, S, D]
        dtype = h.dtype
        mask = torch.where(keys[None, :] <= pos[:, None], torch.zeros((), dtype=dtype, device=dev),
                           torch.full((), torch.finfo(dtype).min, dtype=dtype, device=dev))
        mask = mask[None, None].expand(b, 1, s, p + s)  # additive causal mask [B, 1, S, P+S]
        cos, sin = m.rotary_emb(h, pos[None].expand(b, s))
        presents, executed = [], []
        for i, layer in enumerate(m.layers):
            x = layer.input_layernorm(h)
            k, v = _cache_kv(self.cfg.model_type, layer.self_attn, x, cos, sin)
            k_all, v_all = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            presents.append((k_all, v_all))

            def run(h, x, k_all, v_all, cos, sin, mask, layer=layer):
                return _layer_rest(self.cfg.model_type, layer, h, x, k_all, v_all, cos, sin, mask)

            gate = self.gates[str(i)] if str(i) in self.gates else None
            operands = (h, x, k_all, v_all, cos, sin, mask)
            if gate is None:
                h = run(*operands)
                executed.append(torch.ones((), dtype=torch.bool, device=dev))
                continue
            if self.per_token:  # evaluation: what token-by-token decoding would decide, in one pass
                keep = gate(x) > thresholds[i]  # [B, S]
                h = torch.where(keep[..., None], run(*operands), h)
                executed.append(keep)
                continue
            pred = gate(x).mean() > thresholds[i]  # 0-D bool: one decision per layer per call
            if _exporting():
                h = torch.cond(pred, run, lambda h, *_: h.clone(), operands)
            elif bool(pred):
                h_in = h
                h = run(*operands)
                if self.record is not None:
                    r = (h - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-12)  # [B, S]
                    self.record.append((i, x.detach(), r.detach()))
            executed.append(pred)
        logits = self.hf.lm_head(m.norm(h))
        if self.per_token:
            executed = [e.expand(b, s) for e in executed]
        return logits, presents, torch.stack(executed)


# --- checkpoint files -------------------------------------------------------------------------------

def has_gates(directory: Path) -> bool:
    return (Path(directory) / STATS_FILE).is_file()


def read_stats(directory: Path) -> dict:
    path = Path(directory) / STATS_FILE
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        [int(i) for i in d["gated_layers"]]
        float(d["default_threshold"])
        return d
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EdgekitError(f"cannot read {path}: {e}", "rerun 'edgekit calibrate-skip'") from None


def gated_config(cfg: HFConfig, directory: Path) -> HFConfig:
    """cfg with the gated layers and default threshold from skip_gates.json (unchanged without one)."""
    import dataclasses

    if not has_gates(directory):
        return cfg
    d = read_stats(directory)
    return dataclasses.replace(cfg, gated_layers=tuple(int(i) for i in d["gated_layers"]),
                               default_threshold=float(d["default_threshold"]))


def load_gated(hf: nn.Module, cfg: HFConfig, directory: Path) -> GatedHFCausalLM:
    """The loaded transformers model plus the probes of skip_gates.safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory) / GATES_FILE
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise EdgekitError(f"cannot read {path}: {e}", "rerun 'edgekit calibrate-skip'") from None
    gates = {}
    for i in cfg.gated_layers:
        g = SkipGate(cfg.d_model)
        try:
            g.load_state_dict({"w": tensors[f"layers.{i}.w"], "b": tensors[f"layers.{i}.b"]})
        except (KeyError, RuntimeError) as e:
            raise EdgekitError(f"{path}: no valid gate for layer {i} ({e})", "rerun 'edgekit calibrate-skip'") from None
        gates[i] = g
    return GatedHFCausalLM(hf, cfg, gates).eval()


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "hard-link"
    except OSError:
        shutil.copyfile(src, dst)
        return "copy"


# --- measuring and fitting --------------------------------------------------------------------------

def read_tokens(directory: Path, cfg: HFConfig, data: Path) -> list[int]:
    from edgekit.hf import HFTokenizer
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


def calibrate_skip(source: str | Path, data: str | Path, out: str | Path, layers: list[int] | None = None,
                   seq_len: int = 128, max_tokens: int | None = 65536, holdout: float = 0.2,
                   max_ppl_increase: float = 0.05, threshold: float | None = None, force: bool = False,
                   progress=None) -> dict:
    """Fit skip gates for a Hugging Face model directory on calibration text and write a gated checkpoint."""
    from edgekit.artifact import sha256_file, staging
    from edgekit.hf import is_hf_dir, load, read_hf_config, write_side_files

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
             "gate": "run layer i when mean over batch and tokens of exp(input_layernorm(h) . w_i + b_i) > threshold_i",
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
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=1))
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
