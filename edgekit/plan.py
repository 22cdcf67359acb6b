"""`edgekit plan`: will a model fit a device, and roughly how fast will it run? An ESTIMATE, always.

Roofline arithmetic on the model's Shape (edgekit/shapes.py: an edgekit config, or a Hugging Face config.json) and the
device profile (profiles/*.toml, or the measured host); every device number comes from the profile. What it
estimates, per precision:

    weights      stored parameters at the precision (V3 13.02 B; R1 8.36 B unique)
    KV cache     layers x K/V heads x (K + V dims) x positions x batch x activation bytes (the formula of
                 edgekit.spec.DecoderSpec.kv_bytes, tested equal); V3 keeps at most
                 memory_len positions (Transformer-XL segment memory), R1 keeps all, in each of its
                 80 layers (shared blocks share weights, not cache). Hugging Face models: KV heads x head_dim
                 (GQA); DeepSeek-V3's MLA caches a kv_lora_rank + qk_rope_head_dim latent per token per layer
                 (the decompressed per-head K/V, 71x larger, is reported beside it)
    activations  peak of one chunked-prefill step (hidden/MLP tensors, [B,H,S,K] score tensors, logits)
    overhead     the device's reserve (driver, CUDA context, OS) from the profile
    prefill      compute-bound: FLOPs / (efficiency x throughput), per chunk max(compute, memory)
    decode       bandwidth-bound: bytes read per token (every executed weight, the KV cache) / bandwidth;
                 MoE: weights = every expert, a decode token reads only its top-k + shared experts

`select()` applies the brief's selection framework and says where its rule and the numbers disagree.
"""

from __future__ import annotations

import math

from edgekit.config import route_k
from edgekit.errors import EdgekitError, unknown_name
from edgekit.shapes import Shape, hf_shape, shape  # noqa: F401 (plan.shape / hf_shape: the API)

DEFAULT_CONTEXT = 4096  # tokens (prompt + generated); capped at the model's max_seq_len
DEFAULT_BATCH = 1
PREFILL_CHUNK = 512  # prompt tokens per prefill step (bounds the [B, H, S, K] score tensors)
# Modelling assumptions (not device numbers): fraction of the ceiling a real run reaches.
COMPUTE_EFFICIENCY = {"datasheet": 0.5, "measured": 0.7}  # prefill vs dense peak / vs a measured GEMM
BANDWIDTH_EFFICIENCY = {"datasheet": 0.8, "measured": 1.0}  # decode vs peak / vs a measured copy
SCORE_COPIES = 3  # live [B, H, S, K] tensors in one attention: scores, position bias, probabilities
TIGHT_MARGIN = 0.10  # a fit with less than 10% of the device's memory to spare is "tight"
MIN_USEFUL_CONTEXT = 512  # shorter fits are not worth suggesting
SKIP_WHAT_IF = 0.6  # the brief's claim: selective activation removes ~60% of gated-layer compute
GIB = 2**30

WEIGHT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "fp8": 8, "int8": 8, "int4": 4 + 16 / 128}
QUANTIZED = ("fp8", "int8", "int4")
# accuracy tiers for select(): near-lossless, int8 (the brief claims <2% loss, to be measured), int4
TIER = {"fp32": 0, "fp16": 0, "bf16": 0, "fp8": 0, "int8": 1, "int4": 2}
PREFERENCE = {  # most accurate first; the recommendation is the first that fits
    "gpu": ("fp16", "bf16", "fp8", "int8", "int4", "fp32"),
    "jetson": ("fp16", "bf16", "fp8", "int8", "int4", "fp32"),
    "cpu": ("fp32", "int8"),
}
TASKS = {
    "reasoning": "complex multi-step reasoning: answer quality first",
    "chat": "interactive assistant: tokens per second first",
    "general": "anything else: quality where it fits",
}
SELECT_MODELS = {"v3": "v3-13b", "r1": "r1-8.5b"}
RULE_MEMORY_GB = 24
BRIEF_CONTEXT, BRIEF_PRECISION = 5000, "fp16"  # the brief: R1 uses ~42% less memory than V3 at 5K tokens
BRIEF_R1_SAVING = 0.42


# the arithmetic ---------------------------------------------------------------------------------
def act_bytes(precision: str, kind: str) -> int:
    """Activation (and KV cache) bytes: fp32 on CPUs and for fp32 plans, else 16-bit."""
    return 4 if precision == "fp32" or kind == "cpu" else 2


def weight_bytes(s: Shape, precision: str, kind: str) -> float:
    """Stored weights: Linear weights at the precision; for quantized precisions the embedding table
    (read by Gather, not a MatMul), norms and position tables stay at the activation dtype."""
    wb, ab = WEIGHT_BITS[precision] / 8, act_bytes(precision, kind)
    embed_b = ab if precision in QUANTIZED else wb
    return (s.stored_linear * wb + s.stored_small * ab + s.head * wb + s.embed * embed_b + s.other_small * ab)


def kv_bytes(s: Shape, precision: str, kind: str, context: int, batch: int, width: int | None = None) -> float:
    """The cache: `width` (default the model's) elements per token per layer x layers x positions x batch."""
    width = s.kv_per_token if width is None else width
    return width * s.layers * s.kv_positions(context) * batch * act_bytes(precision, kind)


def _chunks(s: Shape, context: int) -> list[tuple[int, int]]:
    """(new tokens, keys attended) of each prefill step for a `context`-token prompt."""
    out, done = [], 0
    while done < context:
        c = min(PREFILL_CHUNK, context - done)
        out.append((c, s.kv_positions(done) + c))
        done += c
    return out


def activation_bytes(s: Shape, precision: str, kind: str, context: int, batch: int) -> float:
    """Peak transient memory of the largest prefill step (the last chunk: most keys)."""
    a = act_bytes(precision, kind)
    c, keys = max(_chunks(s, context), key=lambda ck: ck[0] * ck[1])
    hidden = c * (4 * s.d_model + 3 * s.d_ff) * a  # residual, normed x, q/k/v or attention out; MLP gate, up, product
    scores = SCORE_COPIES * s.n_heads * c * s.keys_read(keys) * a  # routed: [B, H, chunk, (k + 1) x block]
    logits = c * s.vocab * 4  # fp32 logits for the chunk
    return batch * (hidden + scores + logits)


def _attention_flops(s: Shape, tokens: int, keys: int, layers: int) -> float:
    """QK^T and PV of `tokens` queries over `keys` positions (routed: (k + 1) x block keys per query, counted at the
    chunk's last query), plus the routing scores against every block's mean key."""
    flops = 2 * s.attn_per_key * tokens * s.keys_read(keys) * layers
    if s.routed:
        flops += 2 * s.d_model * tokens * math.ceil(keys / s.block_size) * layers
    return flops


def _ceilings(profile, precision: str) -> tuple[float, float, str, str]:
    """(FLOP/s, byte/s) a run reaches, and how each was obtained."""
    peak, measured = profile.throughput(precision)
    ce = COMPUTE_EFFICIENCY["measured" if measured else "datasheet"]
    bw, bw_measured = profile.bandwidth()
    be = BANDWIDTH_EFFICIENCY["measured" if bw_measured else "datasheet"]
    unit = "TOPS" if precision == "int8" else "TFLOPS"
    how_c = f"{ce:.0%} of {'measured' if measured else 'datasheet'} {peak:g} {unit}"
    how_b = f"{be:.0%} of {'measured' if bw_measured else 'datasheet'} {bw:g} GB/s"
    return peak * 1e12 * ce, bw * 1e9 * be, how_c, how_b


def prefill_seconds(s: Shape, profile, precision: str, context: int, batch: int) -> float:
    """Prefill of a `context`-token prompt in chunks: each chunk max(compute, weight + KV traffic)."""
    flops_s, bytes_s, _, _ = _ceilings(profile, precision)
    kind, a = profile.kind, act_bytes(precision, profile.kind)
    matmul = s.read_linear() + s.head  # FLOPs: each token runs its own top-k experts
    # a MoE prefill chunk of 512 tokens x top-k routes reaches practically every expert: all weights are read
    weights_read = weight_bytes(s, precision, kind) if s.moe else decode_weight_bytes(s, precision, kind, batch)
    total = 0.0
    for c, keys in _chunks(s, context):
        flops = batch * (2 * matmul * c + _attention_flops(s, c, keys, s.layers))
        traffic = weights_read + batch * s.kv_per_token * s.layers * keys * a
        total += max(flops / flops_s, traffic / bytes_s)
    return total


def decode_weight_bytes(s: Shape, precision: str, kind: str, batch: int, skip: float = 0.0) -> float:
    """Weights read for one decode step: every executed layer reads its block again (R1's shared blocks
    are not re-used from cache: a block is ~200 MB at full size); a skipped R1 layer still reads its K/V."""
    wb, ab = WEIGHT_BITS[precision] / 8, act_bytes(precision, kind)
    skipped = skip * s.gated_layers
    embed_rows = batch * s.d_model * (ab if precision in QUANTIZED else wb)
    return (s.read_linear(batch) * wb + s.read_small * ab - skipped * (s.block_linear - s.block_kv) * wb + s.head * wb
            + embed_rows + s.other_small * ab)


def decode_step(s: Shape, profile, precision: str, context: int, batch: int, skip: float = 0.0) -> tuple[float, str]:
    """(seconds per decode step with a full cache of `context` tokens, which ceiling binds)."""
    flops_s, bytes_s, _, _ = _ceilings(profile, precision)
    a = act_bytes(precision, profile.kind)
    keys = s.kv_positions(context)
    attn_layers = s.layers - skip * s.gated_layers
    kv_read = batch * s.kv_per_token * attn_layers * keys * a
    bytes_ = decode_weight_bytes(s, precision, profile.kind, batch, skip) + kv_read
    matmul = s.read_linear() - skip * s.gated_layers * (s.block_linear - s.block_kv) + s.head
    flops = batch * (2 * matmul + _attention_flops(s, 1, keys, 1) * attn_layers)
    t_mem, t_compute = bytes_ / bytes_s, flops / flops_s
    return max(t_mem, t_compute), "bandwidth" if t_mem >= t_compute else "compute"


def memory_gib(s: Shape, profile, precision: str, context: int, batch: int) -> dict:
    kind = profile.kind
    parts = {"weights_gib": weight_bytes(s, precision, kind) / GIB,
             "kv_cache_gib": kv_bytes(s, precision, kind, context, batch) / GIB,
             "activations_gib": activation_bytes(s, precision, kind, context, batch) / GIB,
             "overhead_gib": profile.reserved_gib}
    parts["total_gib"] = sum(parts.values())
    return parts


def max_context(s: Shape, profile, precision: str, batch: int) -> int:
    """Longest context (up to the model's max_seq_len) that fits the device at this batch; 0 if none."""
    def fits(n: int) -> bool:
        return memory_gib(s, profile, precision, n, batch)["total_gib"] <= profile.memory_gib

    if not fits(1):
        return 0
    lo, hi = 1, s.max_seq_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def runtime_for(profile, precision: str) -> str:
    if profile.kind == "cpu":
        return "onnxruntime (dynamic int8)" if precision == "int8" else "torch or onnxruntime"
    versions = list(dict.fromkeys(profile.tensorrt_versions))
    trt = f"TensorRT {', '.join(versions)}" if versions else "TensorRT"
    return {"int8": f"{trt} (W8A8, calibrated Q/DQ)", "int4": f"{trt} (weight-only W4A16, block 128)",
            "fp8": f"{trt} (FP8 Q/DQ)"}.get(precision, trt)


def estimate(s: Shape, profile, precision: str, context: int, batch: int) -> dict:
    """One row of the plan: memory parts, fit, margin, prefill and decode, for one precision."""
    mem = memory_gib(s, profile, precision, context, batch)
    margin = profile.memory_gib - mem["total_gib"]
    step, bound = decode_step(s, profile, precision, context, batch)
    _, _, how_compute, how_bandwidth = _ceilings(profile, precision)
    prefill = prefill_seconds(s, profile, precision, context, batch)
    row = {"precision": precision, **{k: round(v, 3) for k, v in mem.items()},
           **({"kv_cache_decompressed_gib": round(kv_bytes(s, precision, profile.kind, context, batch,
                                                           s.kv_alt_width) / GIB, 3)} if s.kv_alt_width else {}),
           "device_gib": profile.memory_gib, "margin_gib": round(margin, 3), "fits": margin >= 0,
           "tight": 0 <= margin < TIGHT_MARGIN * profile.memory_gib,
           "max_context": max_context(s, profile, precision, batch),
           "prefill_s": round(prefill, 4), "prefill_tokens_per_s": round(batch * context / prefill, 1),
           "decode_tokens_per_s": round(batch / step, 2), "decode_bound": bound,
           "runtime": runtime_for(profile, precision),
           "compute_ceiling": how_compute, "bandwidth_ceiling": how_bandwidth}
    if s.routed and s.gated_layers:
        step_skip, _ = decode_step(s, profile, precision, context, batch, skip=SKIP_WHAT_IF)
        row["decode_tokens_per_s_if_60pct_skipped"] = round(batch / step_skip, 2)
    return row


def kv_summary(s: Shape) -> dict:
    """What one token costs in the cache, per layer and over all layers (elements; x2 bytes in fp16)."""
    out = {"values_per_token_per_layer": s.kv_per_token, "values_per_token": s.kv_per_token * s.layers,
           "fp16_bytes_per_token": 2 * s.kv_per_token * s.layers,
           "basis": s.kv_basis or f"K and V of d_model {s.d_model} per token per layer"}
    if s.kv_alt_width:
        out["decompressed"] = {"values_per_token_per_layer": s.kv_alt_width,
                               "fp16_bytes_per_token": 2 * s.kv_alt_width * s.layers, "basis": s.kv_alt_basis}
    return out


# inputs --------------------------------------------------------------------------------------
def _check_inputs(s: Shape, context: int | None, batch: int) -> int:
    if batch < 1:
        raise EdgekitError(f"--batch must be at least 1, got {batch}")
    context = min(DEFAULT_CONTEXT, s.max_seq_len) if context is None else context
    if not 1 <= context <= s.max_seq_len:
        raise EdgekitError(f"--context {context} is impossible for {s.name}: it must be between 1 and the "
                           f"model's context of {s.max_seq_len} tokens", f"pass --context {s.max_seq_len} or less")
    return context


def _check_precision(profile, precision: str) -> None:
    from profiles import PRECISIONS, why_unsupported

    if precision not in PRECISIONS:
        raise unknown_name("precision", precision, PRECISIONS)
    if precision not in profile.precisions:
        reason = why_unsupported(profile, precision) or f"not in the profile's precisions ({profile.path})"
        raise EdgekitError(f"{profile.name} cannot run {precision}: {reason}",
                           f"use --precision {' or '.join(profile.precisions)}")


def _ordered_precisions(profile) -> list[str]:
    return [p for p in PREFERENCE[profile.kind] if p in profile.precisions]


def device_notes(profile) -> list[str]:
    """What the device can and cannot do, for the plan's reader."""
    from profiles import PRECISIONS, why_unsupported

    notes = []
    for st in profile.stacks:
        jp = f"JetPack {st['jetpack']}: " if "jetpack" in st else ""
        sw = ", ".join(f"{k} {st[k]}" for k in ("cuda", "tensorrt") if k in st) or "see its release notes"
        notes.append(f"{jp}{sw}".replace("cuda", "CUDA").replace("tensorrt", "TensorRT"))
    for p in PRECISIONS:
        if p not in profile.precisions:
            notes.append(f"no {p}: {why_unsupported(profile, p) or 'not in the profile'}")
    trt = profile.max_tensorrt()
    if trt is not None:
        if trt < (10, 11):
            notes.append("TensorRT before 10.11: both branches of an If must return identical shapes "
                         "(torch.cond guarantees it for R1's gates)")
        if profile.sm:
            sm = profile.sm.replace(".", "")
            notes.append(f"a TensorRT engine runs only on the TensorRT version and GPU (sm_{sm}) that built it"
                         ": bundles carry ONNX + a build recipe, the engine is built on the device")
        if "int8" in profile.precisions:
            notes.append("int8 on TensorRT is calibrated W8A8 (explicit Q/DQ): onnxruntime's dynamic int8 graph "
                         "(DynamicQuantizeLinear / MatMulInteger) is a CPU artifact TensorRT cannot parse")
    if profile.dla:
        notes.append(f"{profile.dla} DLA core(s): CNN-style static-shape layers only; LLM layers and conditionals "
                     "stay on the GPU")
    return notes + list(profile.notes)


def assumptions(s: Shape, profile, context: int, batch: int, defaulted: bool) -> list[str]:
    kv = (f"V3 keeps at most memory_len = {s.memory_len} positions per layer (Transformer-XL segment memory)"
          if s.segment_memory and s.memory_len else
          f"R1 keeps every position in each of its {s.layers} layers (its {s.unique_blocks} shared blocks share "
          "weights, not cache)" if s.routed else "every position is kept")
    if s.kv_basis:
        kv = f"{kv}; {s.kv_basis}"
    if s.kv_alt_basis:
        kv += ("; the estimate uses the compressed latent because that is what is cached by transformers 5.x (it "
               "caches the latent and expands K/V per step), by edgekit's exported graph and by DeepSeek's own / "
               f"vLLM / SGLang MLA kernels; the 'KV decompressed' column is the {s.kv_alt_basis}, what transformers "
               "4.x's eager cache and any attention without MLA support store")
    ctx = f"context {context} tokens x batch {batch}"
    if defaulted:
        ctx += f" (default: {DEFAULT_CONTEXT} tokens or the model's max_seq_len if smaller, batch {DEFAULT_BATCH})"
    out = [
        "ESTIMATE: arithmetic on the model config and the device profile, not a measurement",
        ctx, "memory in GiB (2^30 bytes; device capacities are binary); bandwidth in decimal GB/s",
        f"weights: {s.params_unique / 1e9:.2f} B stored parameters; x@W weights at the precision (int4 = 4 bits "
        "+ one fp16 scale per 128 weights); for fp8/int8/int4 the embedding table (a Gather), norms and position "
        "tables stay at the activation dtype",
        f"KV cache in the activation dtype (fp16 on GPUs, fp32 on CPUs and for fp32); {kv}",
        f"activations: prefill in chunks of {PREFILL_CHUNK} tokens; peak = one layer's hidden and MLP tensors + "
        f"{SCORE_COPIES} [batch, heads, chunk, keys] attention tensors (the exported graph materialises them"
        + ("; routed: keys = the (k + 1) x block a query reads" if s.routed else "") + ") + the chunk's fp32 logits",
        f"overhead: the device's reserve from its profile ({profile.reserved_gib:g} GiB: driver, CUDA context, "
        "OS, other processes); allocator fragmentation not modelled",
        f"prefill: the whole {context}-token context as the prompt, per chunk max(compute, weight + KV traffic); "
        f"compute at {COMPUTE_EFFICIENCY['datasheet']:.0%} of the datasheet dense peak or "
        f"{COMPUTE_EFFICIENCY['measured']:.0%} of a measured GEMM; attention "
        + ("over each query's own + k routed blocks ((k + 1) x block keys) plus the routing against every block's "
           "mean key" if s.routed else "counted dense"),
        f"decode: one token with a full cache, bandwidth at {BANDWIDTH_EFFICIENCY['datasheet']:.0%} of the "
        f"datasheet peak or {BANDWIDTH_EFFICIENCY['measured']:.0%} of a measured one; every executed layer reads "
        f"its weights once per step ({s.params_executed / 1e9:.2f} B for {s.name}) plus the whole KV cache",
    ]
    if s.moe:
        n, k, shared, moe_layers, _ = s.moe
        out.append(f"MoE: weight memory holds all {s.params_unique / 1e9:.1f} B parameters ({n} routed experts in "
                   f"each of {moe_layers} layers); a decode token reads only the {s.params_executed / 1e9:.1f} B "
                   f"active ones (top-{k} routed + {shared} shared expert(s), router, attention, embeddings), a "
                   f"batch of B sequences the expected distinct experts {n} x (1 - (1 - {k}/{n})^B); a prefill "
                   "chunk reads all experts. This assumes a runtime that dispatches tokens to their experts: "
                   "edgekit's own ONNX export computes every expert on every token (a static graph), which reads "
                   "all weights per token")
        out.append("MLA attention counted in the absorbed form (scores and values in the latent space: "
                   f"{s.attn_per_key} multiply-adds per query per key per layer)")
    if s.family.startswith("hf-"):
        out.append("Hugging Face config: parameters counted from config.json alone (no weights read); multi-token "
                   "prediction layers (num_nextn_predict_layers) are not loaded by transformers and not counted")
    if s.routed:
        c, keys = max(_chunks(s, context), key=lambda ck: ck[0] * ck[1])
        kmax = route_k(-(-s.max_seq_len // s.block_size)) if s.max_seq_len else 0
        head_dim = s.d_model // s.n_heads
        gathered = 2 * s.n_heads * c * (kmax + 1) * s.block_size * head_dim * batch * 2
        out.append(f"R1's exported graph gathers each query's blocks of K and V ({kmax} routed slots fixed by "
                   f"max_seq_len + its own: 2 x [batch, heads, chunk, {kmax + 1} x {s.block_size}, {head_dim}], "
                   f"{gathered / GIB:.2f} GiB in 16-bit for a {c}-token chunk), not counted above: the eager torch "
                   "kernel groups queries per key block instead and holds only the scores")
        out.append("R1: every layer executes (gates open); selective activation skips attention + MLP of gated "
                   f"layers at run time, so decode can only be faster (the *_if_60pct_skipped column: "
                   f"{SKIP_WHAT_IF:.0%} of the {s.gated_layers} gated layers skipped, the brief's claim)")
    return out


# plan ------------------------------------------------------------------------------------------
def would_fit(s: Shape, profile, context: int, batch: int) -> list[dict]:
    """What fits the device instead: this model at lower precisions (with the longest context that fits),
    then the other presets (largest first) at the most accurate precision that fits the requested context,
    else the one that fits the longest. Fits shorter than MIN_USEFUL_CONTEXT tokens are left out."""
    from edgekit.models import PRESETS

    def option(m: Shape, p: str, n: int) -> dict:
        return {"model": m.name, "precision": p, "max_context": n, "fits_requested_context": n >= context}

    precisions = _ordered_precisions(profile)
    out = []
    for p in precisions:
        n = max_context(s, profile, p, batch)
        if n >= min(context, MIN_USEFUL_CONTEXT):
            out.append(option(s, p, n))
    others = sorted((shape(cfg) for name, cfg in PRESETS.items() if name != s.name and not name.endswith("-tiny")),
                    key=lambda m: -m.params_unique)
    for m in others:
        ctx = min(context, m.max_seq_len)
        fits = [(p, max_context(m, profile, p, batch)) for p in precisions]
        full = [(p, n) for p, n in fits if n >= ctx]
        p, n = full[0] if full else max(fits, key=lambda pn: pn[1])
        if n >= min(ctx, MIN_USEFUL_CONTEXT):
            out.append(option(m, p, n))
    return out


def _describe_fit(f: dict) -> str:
    return f"{f['model']} {f['precision']} (up to {f['max_context']} tokens)"


def plan(model, device: str, precision: str | None = None, context: int | None = None,
         batch: int = DEFAULT_BATCH, fallback=None) -> dict:
    """The estimate for `model` (preset, checkpoint or artifact) on `device` (a profile name or 'host'); with
    `fallback`, also both models of a cascade (`edgekit serve MODEL --fallback FALLBACK`) held at once."""
    import profiles

    if fallback is not None:
        result = plan(model, device, precision, context, batch)
        result["cascade"] = cascade_memory(shape(model), shape(fallback), profiles.load(device),
                                           result["context"], batch, precision)
        return result
    s = shape(model)
    defaulted = context is None
    context = _check_inputs(s, context, batch)
    profile = profiles.load(device)
    if precision is not None:
        _check_precision(profile, precision)
    precisions = [precision] if precision else _ordered_precisions(profile)
    rows = [estimate(s, profile, p, context, batch) for p in precisions]
    fitting = [r for r in rows if r["fits"]]
    result = {
        "estimate": True,
        "label": "ESTIMATE (roofline arithmetic, not a measurement)",
        "model": s.name, "family": s.family,
        "params": {"unique": s.params_unique, "executed": s.params_executed,
                   **({"total": s.params_unique, "active": s.params_executed} if s.moe else {})},
        "kv_cache": kv_summary(s),
        "device": profile.name, "device_title": profile.title, "device_gib": profile.memory_gib,
        "context": context, "batch": batch, "precision": precision, "rows": rows,
    }
    if fitting:
        best = fitting[0]
        tight = " (tight)" if best["tight"] else ""
        rec = (f"{best['precision']}: {s.name} fits {profile.name} at {context} tokens x batch {batch} with "
               f"{best['margin_gib']:.1f} GiB to spare{tight}; ~{best['prefill_s']:.3g} s prefill, "
               f"~{best['decode_tokens_per_s']:.3g} tokens/s decode")
        faster = max(fitting, key=lambda r: r["decode_tokens_per_s"])
        if faster is not best and faster["decode_tokens_per_s"] >= 1.3 * best["decode_tokens_per_s"]:
            gain = faster["decode_tokens_per_s"] / best["decode_tokens_per_s"]
            rec += f"; {faster['precision']} would decode ~{gain:.1f}x faster (validate its accuracy first)"
        result["recommendation"] = rec
        result["recommended_precision"] = best["precision"]
    else:
        alternatives = would_fit(s, profile, context, batch)
        result["would_fit"] = alternatives
        what = "; ".join(_describe_fit(f) for f in alternatives) or "nothing: not even the mini presets"
        needed = min(r["total_gib"] for r in rows)
        scope = precision if precision else "any supported precision"
        result["recommendation"] = (f"{s.name} does not fit {profile.name} ({profile.memory_gib:g} GiB) at {scope} "
                                    f"with {context} tokens x batch {batch} (needs >= {needed:.1f} GiB). "
                                    f"What would fit: {what}")
        result["recommended_precision"] = None
    result["device_notes"] = device_notes(profile)
    result["assumptions"] = assumptions(s, profile, context, batch, defaulted)
    if s.name in SELECT_MODELS.values():  # the full-size presets: the brief's memory claim, checked
        result["r1_vs_v3_memory"] = r1_vs_v3_memory(profile)
    return result


def cascade_memory(primary: Shape, fallback: Shape, profile, context: int, batch: int,
                   precision: str | None = None) -> dict:
    """Both models of a cascade in one process on `profile` (`edgekit serve PRIMARY --fallback FALLBACK` loads
    both and runs one model thread each, so both can compute at once): each one's weights, KV cache (`batch`
    requests at `context` tokens each) and activations, plus the device's reserve once. Each model at `precision`,
    or at the first precision of its own plan that fits."""
    rows = {}
    for role, s in (("primary", primary), ("fallback", fallback)):
        precisions = [precision] if precision else _ordered_precisions(profile)
        fitting = [p for p in precisions if estimate(s, profile, p, context, batch)["fits"]]
        chosen = fitting[0] if fitting else precisions[-1]
        rows[role] = {"model": s.name, "precision": chosen,
                      **{k: round(v, 3) for k, v in memory_gib(s, profile, chosen, context, batch).items()}}
    parts = ("weights_gib", "kv_cache_gib", "activations_gib")
    total = sum(rows[r][k] for r in rows for k in parts) + profile.reserved_gib
    margin = profile.memory_gib - total
    p, f = rows["primary"], rows["fallback"]
    return {**rows, "total_gib": round(total, 3), "margin_gib": round(margin, 3), "fits": margin >= 0,
            "device_gib": profile.memory_gib, "context": context, "batch": batch,
            "line": f"cascade {p['model']} ({p['precision']}) -> {f['model']} ({f['precision']}) together: "
                    f"{total:.3g} GiB of {profile.memory_gib:g} GiB ({p['total_gib'] - profile.reserved_gib:.3g} + "
                    f"{f['total_gib'] - profile.reserved_gib:.3g} GiB + {profile.reserved_gib:g} GiB reserve): "
                    + ("fits" if margin >= 0 else f"does NOT fit (short by {-margin:.3g} GiB)")}


def r1_vs_v3_memory(profile, precision: str = BRIEF_PRECISION, context: int = BRIEF_CONTEXT,
                    batch: int = DEFAULT_BATCH) -> dict:
    """r1-8.5b vs v3-13b total memory (memory_gib) at the brief's 5,000 tokens, same precision, on `profile`,
    beside the brief's claim that R1 uses ~42% less."""
    v3, r1 = (memory_gib(shape(SELECT_MODELS[f]), profile, precision, context, batch)["total_gib"]
              for f in ("v3", "r1"))
    saving = 1 - r1 / v3
    return {"context": context, "precision": precision, "batch": batch,
            "v3_gib": round(v3, 3), "r1_gib": round(r1, 3),
            "ratio": round(r1 / v3, 4), "saving": round(saving, 4), "brief_saving": BRIEF_R1_SAVING,
            "line": f"R1 vs V3 at {context:,} tokens, {precision}: {SELECT_MODELS['r1']} {r1:.1f} GiB vs "
                    f"{SELECT_MODELS['v3']} {v3:.1f} GiB total, {saving:.1%} less (ratio {r1 / v3:.3f}); the brief "
                    f"claims ~{BRIEF_R1_SAVING:.0%} less"}


# select ----------------------------------------------------------------------------------------
def _best_row(s: Shape, profile, context: int, batch: int) -> dict | None:
    for p in _ordered_precisions(profile):
        row = estimate(s, profile, p, context, batch)
        if row["fits"]:
            return row
    return None


def select(device: str, task: str, context: int | None = None, batch: int = DEFAULT_BATCH) -> dict:
    """The brief's selection framework on `device` for `task`, checked against the numbers."""
    import profiles

    if task not in TASKS:
        raise unknown_name("task", task, TASKS)
    v3, r1 = shape(SELECT_MODELS["v3"]), shape(SELECT_MODELS["r1"])
    defaulted = context is None
    context = _check_inputs(v3, context, batch)
    _check_inputs(r1, context, batch)
    profile = profiles.load(device)
    best = {"v3": _best_row(v3, profile, context, batch), "r1": _best_row(r1, profile, context, batch)}
    cloud = profile.kind == "gpu"

    # the rule, as the brief states it; the first rule that applies decides
    rules = [{"rule": f"under {RULE_MEMORY_GB} GB of (GPU) memory -> R1",
              "applies": profile.memory_gib < RULE_MEMORY_GB, "says": "r1"},
             {"rule": "complex reasoning -> V3 where it fits",
              "applies": task == "reasoning" and best["v3"] is not None, "says": "v3"},
             {"rule": "cloud -> V3, edge -> R1", "applies": True, "says": "v3" if cloud else "r1"}]
    decisive = next(r for r in rules if r["applies"])
    rule_family = decisive["says"]

    # the numbers: what fits, at which precision, how fast
    def line(fam: str) -> str:
        row = best[fam]
        name = SELECT_MODELS[fam]
        if row is None:
            return f"{name} does not fit at any precision"
        return (f"{name} fits at {row['precision']} ({row['total_gib']:.1f} of {profile.memory_gib:g} GiB, "
                f"~{row['decode_tokens_per_s']:.3g} tokens/s decode, ~{row['prefill_s']:.3g} s prefill)")

    if best["v3"] is None and best["r1"] is None:
        numbers_family, why = None, "neither full-size model fits"
    elif best["v3"] is None or best["r1"] is None:
        numbers_family = "r1" if best["v3"] is None else "v3"
        why = f"only {SELECT_MODELS[numbers_family]} fits"
    else:
        tv, tr = TIER[best["v3"]["precision"]], TIER[best["r1"]["precision"]]
        both = f"both fit ({best['v3']['precision']} / {best['r1']['precision']})"
        if tv != tr:
            numbers_family = "v3" if tv < tr else "r1"
            worse = "r1" if numbers_family == "v3" else "v3"
            why = (f"{SELECT_MODELS[numbers_family]} fits at {best[numbers_family]['precision']}, "
                   f"{SELECT_MODELS[worse]} only at the lossier {best[worse]['precision']}")
        elif task == "chat":
            numbers_family = max(("v3", "r1"), key=lambda f: best[f]["decode_tokens_per_s"])
            why = f"{both}; {SELECT_MODELS[numbers_family]} decodes faster"
        else:
            numbers_family = "v3"
            why = f"{both}; V3 is the larger model R1 is distilled from (quality first for {task})"

    agree = numbers_family == rule_family
    notes = []
    if not agree:
        if numbers_family is None:
            notes.append(f"the rule picks {SELECT_MODELS[rule_family]}, but at {context} tokens x batch {batch} "
                         f"neither full-size model fits {profile.name}")
        else:
            notes.append(f"the rule picks {SELECT_MODELS[rule_family]} ({decisive['rule']}), the numbers pick "
                         f"{SELECT_MODELS[numbers_family]}: {why}; {line(rule_family)}")
    if best["v3"] and best["r1"] and best["r1"]["decode_tokens_per_s"] < best["v3"]["decode_tokens_per_s"]:
        notes.append(f"R1 saves memory, not bandwidth: with all gates open its 80 layers read "
                     f"{r1.params_executed / 1e9:.1f} B weights per token vs V3's {v3.params_executed / 1e9:.1f} B, so "
                     "it decodes slower unless selective activation skips layers (~"
                     f"{best['r1'].get('decode_tokens_per_s_if_60pct_skipped', 0):.3g} tokens/s at 60% skipped)")
    choice = numbers_family or None
    explanation = [f"task: {task} ({TASKS[task]}); device: {profile.name}, {profile.memory_gib:g} GiB, "
                   f"{'cloud' if cloud else 'edge'}"]
    explanation += [f"rule '{r['rule']}': {'applies' if r['applies'] else 'does not apply'}" for r in rules]
    explanation += [line("v3"), line("r1")]
    result = {
        "estimate": True, "label": "ESTIMATE (roofline arithmetic, not a measurement)",
        "device": profile.name, "task": task, "context": context, "batch": batch,
        "rule": {"choice": SELECT_MODELS[rule_family], "because": decisive["rule"], "rules": rules},
        "numbers": {"choice": SELECT_MODELS[choice] if choice else None, "because": why,
                    "v3": best["v3"], "r1": best["r1"]},
        "agree": agree,
        "choice": SELECT_MODELS[choice] if choice else None,
        "precision": best[choice]["precision"] if choice else None,
        "explanation": explanation, "disagreement": notes[0] if not agree else None, "notes": notes,
        "r1_vs_v3_memory": r1_vs_v3_memory(profile),
    }
    if choice is None:
        alternatives = would_fit(r1, profile, context, batch)
        result["would_fit"] = alternatives
        notes.append("what would fit: " + ("; ".join(_describe_fit(f) for f in alternatives) or "nothing"))
    result["assumptions"] = assumptions(v3, profile, context, batch, defaulted)[:2] + [
        "both full-size presets planned at the most accurate precision that fits; see 'edgekit plan' for the rest",
        "accuracy tiers: fp32/fp16/bf16/fp8 near-lossless, then int8, then int4 (measure before trusting); within "
        "a tier V3 wins on quality, or the faster decoder for chat"]
    return result


# devices ---------------------------------------------------------------------------------------
def list_devices(include_host: bool = True) -> list[dict]:
    """One row per profile, for `edgekit devices`."""
    import profiles

    rows = []
    for p in profiles.all_profiles(include_host=include_host):
        rows.append({"name": p.name, "title": p.title, "kind": p.kind, "sm": p.sm or "-",
                     "memory_gib": p.memory_gib, "bandwidth_gbs": p.bandwidth()[0],
                     "fp16_tflops": p.fp16_tflops or "-", "int8_tops": p.int8_tops or "-",
                     "fp32_tflops": p.throughput("fp32")[0], "precisions": ",".join(p.precisions),
                     "tensorrt": ",".join(p.tensorrt_versions) or "-", "derived": p.derived,
                     "file": p.path or "measured at run time"})
    return rows
