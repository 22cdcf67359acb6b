"""The TensorRT build recipe: the precision policy and the optimization profiles that fit the device.

derive_profiles() sizes the decode and prefill profiles (batch, seq, past min/opt/max) from the device
profile's usable memory, the weights and the requested context with an estimated memory model (recorded in the
recipe); make_recipe() writes them with the builder flags, workspace, timing cache, target SM, the TensorRT
versions whose op check passed, and the equivalent trtexec command. The recipe is read back where the engine is
built (runtimes/tensorrt_build.py owns its file name and format version).
"""

from __future__ import annotations

import shlex

from edgekit.errors import EdgekitError, unknown_name
from runtimes.tensorrt import ENGINE_FILE
from runtimes.tensorrt_build import RECIPE_VERSION, TIMING_CACHE_FILE

MODEL_FILE = "model.onnx"

# Precision policy: builder flags, how weights are stored, and the gate of the CPU (ONNX Runtime) validation
# against fp32 PyTorch (mean logit cosine over the seeded cases). int4's gate is a fidelity floor measured on
# random-weight presets (r1-tiny ~0.96: round-to-nearest int4 of untrained 64-wide layers); the graph itself is
# held to GRAPH_COSINE against PyTorch running the very weights the graph stores. int8: see refuse_int8().
PRECISIONS = {
    "fp16": {"flags": ["FP16"], "trtexec": ["--fp16"], "weights": "fp16", "min_cosine": 0.999},
    "int4": {"flags": ["FP16", "INT4"], "trtexec": ["--fp16", "--int4"], "weights": "int4 weight-only, block 128",
             "min_cosine": 0.95},
    "fp32": {"flags": [], "trtexec": [], "weights": "fp32", "min_cosine": 0.99999},
}

# Memory model for the optimization profiles (an estimate, recorded in the recipe). Not device numbers:
# the device's memory comes from its profile; these say how much of it a shape costs.
ATTN_BYTES_PER_SCORE = 16  # fp32 scores, position bias, mask and softmax output of one (query, key) pair per head
MAX_DECODE_BATCH = 64  # policy cap: more sequences than this belong to a serving stack, not an edge engine
MAX_PREFILL_BATCH = 8
OPT_PREFILL_SEQ = 128  # the shape TensorRT tunes prefill kernels for (clipped to the profile)
WORKSPACE_FRACTION = 8  # workspace limit = 1/8 of what the weights leave, within [64 MiB, 4 GiB]
MIB, GIB = 1 << 20, 1 << 30


def refuse_int8() -> EdgekitError:
    return EdgekitError(
        "--int8 is ONNX Runtime's dynamic int8 (DynamicQuantizeLinear / MatMulInteger), which TensorRT cannot parse",
        "for a TensorRT target use fp16 (the default) or --precision int4 (weight-only, block 128, explicit Q/DQ; "
        "TensorRT 10+ on sm_80+); dynamic int8 is for --format onnx on CPUs")


def check_precision(precision: str, profile) -> dict:
    """The precision policy for a TensorRT target, or a one-line refusal naming what works."""
    from profiles import why_unsupported

    if precision == "int8":
        raise refuse_int8()
    if precision not in PRECISIONS:
        raise unknown_name("TensorRT precision", precision, PRECISIONS)
    if precision != "fp32":
        reason = why_unsupported(profile, precision)
        if reason:
            raise EdgekitError(f"--format tensorrt at {precision} on {profile.name}: {reason}",
                               "use fp16" if precision != "fp16" else "use --format onnx for this device")
    return PRECISIONS[precision]


# ---------------------------------------------------------------------------------------------
# Optimization profiles from the device's memory and the requested context
# ---------------------------------------------------------------------------------------------
def memory_need(cfg, batch: int, seq: int, past: int, io_bytes: int = 4) -> int:
    """Estimated device bytes one call needs beyond the weights: the past KV inputs and present outputs (fp32
    I/O) plus the largest activations (attention scores per head, logits, MLP)."""
    from edgekit.spec import DecoderSpec

    spec = DecoderSpec(cfg)
    heads, keys = cfg.n_heads, past + seq
    kv = spec.kv_bytes(batch, past, io_bytes) + spec.kv_bytes(batch, keys, io_bytes)  # past in, present out
    per_token = (cfg.vocab_size + 3 * cfg.d_ff + 8 * cfg.d_model) * 4
    act = batch * (heads * seq * keys * ATTN_BYTES_PER_SCORE + seq * per_token)
    return kv + act


def _largest(lo: int, hi: int, fits) -> int:
    """Largest n in [lo, hi] with fits(n) (fits monotone decreasing); lo - 1 when none."""
    if hi < lo or not fits(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def derive_profiles(cfg, usable_bytes: int, weight_bytes: int, context: int, device: str = "the device") -> dict:
    """Decode and prefill optimization profiles (min/opt/max of batch, seq, past) that fit `usable_bytes`.

    decode: seq 1; past up to the cache limit (context - 1, or V3's memory_len); batch as large as the KV cache
            of that many full-length sequences allows (capped at MAX_DECODE_BATCH).
    prefill: past 0 for a whole prompt, or up to context - seq for chunked prefill (keys never exceed the
             context); seq up to the context, or the largest chunk that fits; batch up to MAX_PREFILL_BATCH.
    """
    weights_left = usable_bytes - weight_bytes
    workspace = int(min(max(weights_left // WORKSPACE_FRACTION, 64 * MIB), 4 * GIB))
    budget = weights_left - workspace
    if budget <= 0:
        raise EdgekitError(f"{cfg.name} does not fit on {device}: {weight_bytes / GIB:.2f} GiB of weights + "
                           f"{workspace / GIB:.2f} GiB workspace > {usable_bytes / GIB:.2f} GiB usable",
                           "use --int4, a smaller model, or a device with more memory")
    cache_cap = cfg.memory_len if cfg.family == "v3" and cfg.memory_len else context - 1
    past_max = max(0, min(cache_cap, context - 1))
    b_dec = _largest(1, MAX_DECODE_BATCH, lambda b: memory_need(cfg, b, 1, past_max) <= budget)
    if b_dec < 1:
        one = memory_need(cfg, 1, 1, past_max)
        raise EdgekitError(f"context {context} does not fit on {device}: one sequence's cache and activations need "
                           f"{one / GIB:.2f} GiB, {budget / GIB:.2f} GiB are left after weights and workspace",
                           "lower --context")
    s_max = _largest(1, context, lambda s: memory_need(cfg, 1, s, context - s) <= budget)
    if s_max < 1:
        raise EdgekitError(f"context {context} does not fit on {device} even one token at a time", "lower --context")
    prefill_past_max = context - s_max
    b_pre = _largest(1, min(b_dec, MAX_PREFILL_BATCH),
                     lambda b: memory_need(cfg, b, s_max, prefill_past_max) <= budget)
    # trtexec builds one profile: it must hold the longest past *and* the longest chunk at once, so its seq and
    # batch are whatever still fits with past at its maximum; tuned for decode (seq 1), the steady state.
    s_one = _largest(1, s_max, lambda s: memory_need(cfg, 1, s, past_max) <= budget)
    b_one = max(1, _largest(1, b_pre, lambda b: memory_need(cfg, b, s_one, past_max) <= budget))
    dims = {
        "decode": {"batch": [1, 1, b_dec], "seq": [1, 1, 1], "past": [0, past_max // 2, past_max]},
        "prefill": {"batch": [1, 1, b_pre], "seq": [1, min(OPT_PREFILL_SEQ, s_max), s_max],
                    "past": [0, 0, prefill_past_max]},
        "single": {"batch": [1, 1, b_one], "seq": [1, 1, max(1, s_one)], "past": [0, past_max // 2, past_max]},
    }
    worst = max(memory_need(cfg, b_dec, 1, past_max), memory_need(cfg, b_pre, s_max, prefill_past_max))
    estimate = {"usable_bytes": int(usable_bytes), "weight_bytes": int(weight_bytes), "workspace_bytes": workspace,
                "budget_bytes": int(budget), "largest_profile_bytes": int(worst),
                "model": "KV past+present at fp32 I/O + attention scores x 16 B + logits/MLP activations; an estimate"}
    return {"dims": dims, "workspace_bytes": workspace, "estimate": estimate}


def profile_shapes(spec, dims: dict) -> dict[str, dict[str, list[int]]]:
    """Per dynamic input: min/opt/max shapes from batch/seq/past dims (DecoderSpec names)."""
    cfg = spec.cfg
    shapes = {}
    for k, sel in enumerate(("min", "opt", "max")):
        b, s, p = dims["batch"][k], dims["seq"][k], dims["past"][k]
        shapes.setdefault("input_ids", {})[sel] = [b, s]
        shapes.setdefault("attention_mask", {})[sel] = [b, p + s]
        for n in spec.past_names():
            shapes.setdefault(n, {})[sel] = [b, cfg.n_heads, p, cfg.head_dim]
    return shapes


def trtexec_command(recipe: dict) -> str:
    """The equivalent trtexec command, for a device without edgekit. trtexec is given one optimization profile
    (recipe["trtexec_profile"]: the longest past with the longest chunk that still fits, tuned for decode)."""
    shapes = recipe["trtexec_profile"]["shapes"]

    def spec(sel):
        return ",".join(f"{n}:{'x'.join(str(d) for d in s[sel])}" for n, s in shapes.items())

    args = ["trtexec", f"--onnx={recipe['onnx']}", *recipe["trtexec_flags"],
            f"--minShapes={spec('min')}", f"--optShapes={spec('opt')}", f"--maxShapes={spec('max')}",
            f"--memPoolSize=workspace:{max(1, recipe['workspace_bytes'] // MIB)}",
            f"--timingCacheFile={recipe['timing_cache']}", f"--saveEngine={recipe['engine']}"]
    return " ".join(shlex.quote(a) for a in args)


def make_recipe(cfg, profile, precision: str, context: int, weight_bytes: int, opset: int,
                tensorrt_ok: list[str], tensorrt_refused: dict[str, str]) -> dict:
    from edgekit.spec import DecoderSpec

    spec = DecoderSpec(cfg)
    derived = derive_profiles(cfg, int(profile.usable_gib * GIB), weight_bytes, context, profile.name)
    dims = derived["dims"]
    policy = PRECISIONS[precision]
    recipe = {
        "edgekit_recipe": RECIPE_VERSION,
        "model": cfg.name, "family": cfg.family, "onnx": MODEL_FILE, "onnx_opset": opset,
        "precision": precision, "weights": policy["weights"],
        "builder_flags": policy["flags"], "trtexec_flags": policy["trtexec"],
        "device": profile.name, "sm": profile.sm,
        "tensorrt": {"versions": tensorrt_ok, "refused": tensorrt_refused},
        "context": context,
        "workspace_bytes": derived["workspace_bytes"],
        "timing_cache": TIMING_CACHE_FILE, "engine": ENGINE_FILE,
        "io": {"inputs": spec.input_names, "outputs": spec.output_names, "float_io": "float32"},
        "profiles": [{"name": name, "dims": dims[name], "shapes": profile_shapes(spec, dims[name])}
                     for name in ("decode", "prefill")],
        "trtexec_profile": {"dims": dims["single"], "shapes": profile_shapes(spec, dims["single"])},
        "memory_estimate": derived["estimate"],
    }
    recipe["trtexec"] = trtexec_command(recipe)
    recipe["trtexec_note"] = ("trtexec gets one profile (trtexec_profile: past up to the cache limit with chunks of "
                              "up to its seq max); edgekit build-engine builds the decode and prefill profiles")
    return recipe


def not_built(recipe: dict, why: str) -> dict:
    return {"status": "not built", "why": why,
            "how": "on the target device: edgekit build-engine ARTIFACT (or the recipe's trtexec command)",
            "trtexec": recipe["trtexec"]}
