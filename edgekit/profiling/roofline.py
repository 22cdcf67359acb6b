"""Weight traffic and the bandwidth roofline: bytes of weights read per decode step (from the model's
structure, the precision and the measured skip pattern) / memory bandwidth (this host's, measured by
profiles.host; a known GPU's or Jetson's from its profile), and the measured decode tokens/s as a
fraction of it."""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.hfconfig import HFConfig


def _widths(precision: str) -> tuple[int, int]:
    """(bytes per matmul weight, bytes per other parameter): linear weights take 1 byte at int8, 2 at
    fp16/bf16, 4 at fp32; norms, position tables and embeddings stay at the activation width."""
    return {"int8": 1, "fp16": 2, "bf16": 2}.get(precision, 4), 2 if precision in ("fp16", "bf16") else 4


def weight_traffic(cfg, precision: str, batch: int = 1, run_fraction: list[float] | None = None,
                   directory: str | Path | None = None) -> dict:
    """Bytes of weights stored and read per decode step.

    Per step every layer reads its block's attention norm and K/V projections (the cache is appended
    outside R1's condition) and its gate; the rest of the block (Q, O, relative position, MLP) only
    when the layer runs (`run_fraction[layer]`, measured; 1.0 without gates). A block shared by several
    layers is read once per use. Linear weights take 1 byte at int8 (+ a 4-byte scale per output for
    the torch int8 checkpoint's per-channel scales), 2 at fp16/bf16, 4 at fp32; norms, position tables
    and embeddings stay at the activation width. The embedding reads `batch` rows; the head all of it.
    A Hugging Face model (`directory`: its config.json) is counted the same way, see hf_weight_traffic.
    """
    if isinstance(cfg, HFConfig):
        if directory is None:
            raise EdgekitError(f"{cfg.name}: the weight traffic of a Hugging Face model needs its directory")
        return hf_weight_traffic(cfg, directory, precision, batch, run_fraction)
    from edgekit import structure  # the model's parameters from its config: no torch on a device

    lin, other = _widths(precision)

    def nbytes(params: dict) -> int:
        return sum(structure.numel(shape) * lin + (4 * shape[1] if precision == "int8" else 0) if linear
                   else structure.numel(shape) * other for shape, linear in params.values())

    block = structure.block(cfg)
    always = nbytes({k: v for k, v in block.items() if k in ("attn_norm.weight", "attn.k.weight", "attn.v.weight")})
    rest = nbytes(block) - always
    gate = nbytes(structure.gate_params(cfg)) if cfg.family == "r1" else 0
    gated = set(cfg.gated_layers) if cfg.family == "r1" else set()
    params = structure.parameters(cfg)
    run_fraction = run_fraction or [1.0] * cfg.n_layers
    head = nbytes({"lm_head": params["lm_head.weight"]}) if "lm_head.weight" in params \
        else structure.numel(params["embed.weight"][0]) * other
    step = batch * cfg.d_model * other + nbytes({"norm": params["norm.weight"]}) + head
    for layer in range(cfg.n_layers):
        step += always + (gate if layer in gated else 0) + run_fraction[layer] * rest
    stored = nbytes(params)
    return {"weight_bytes_stored": int(stored), "weight_bytes_per_decode_step": int(step)}


# what a Hugging Face layer computes outside its skip condition (models.hf._cache_kv): norm + cache K/V
_CACHE_MODULES = {"deepseek_v3": ("kv_a_proj_with_mqa", "kv_a_layernorm")}  # MLA's latent; others k_proj, v_proj


def hf_weight_traffic(cfg: HFConfig, directory: str | Path, precision: str, batch: int = 1,
                      run_fraction: list[float] | None = None) -> dict:
    """weight_traffic for a Hugging Face model, from its structure built on the meta device (transformers
    from config.json: nothing is allocated or read). Per layer the input norm and the cache's K/V
    projections are always read, the rest when the layer runs; a calibrate-skip gate is read every step.
    MoE routed experts (3-D weights under `.experts.`): the expected share that `batch` tokens reach,
    1 - (1 - top_k / experts) ** batch, assuming uniform routing (the real routing is not measured)."""
    try:  # the structure comes from transformers on torch's meta device: not on a device install
        import torch
        import transformers
        from torch import nn
    except ImportError as e:
        return {"weight_bytes_stored": None, "weight_bytes_per_decode_step": None,
                "weight_traffic_unavailable": f"counting a Hugging Face model's weights needs {e.name}, which is "
                                              "not installed (pip install 'edgekit[export]')"}
    from edgekit.models.hf import SkipGate

    transformers.utils.logging.set_verbosity_error()
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as e:
        raise EdgekitError(f"cannot read {directory}/config.json: {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
        gate_module = SkipGate(cfg.d_model)
    lin, other = _widths(precision)
    n_experts = getattr(config, "n_routed_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    expert_share = 1 - (1 - top_k / n_experts) ** batch if n_experts and top_k else 1.0

    def module_bytes(module) -> tuple[int, float]:
        """(bytes stored, bytes read per step) of `module`'s parameters, each counted once."""
        stored, read, seen = 0, 0.0, set()
        for mname, m in module.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                routed = p.dim() == 3 and mname.rpartition(".")[2] == "experts"
                if isinstance(m, nn.Linear) and pname == "weight":  # [out, in]: one int8 scale per output
                    b = p.numel() * lin + (4 * p.shape[0] if precision == "int8" else 0)
                else:
                    b = p.numel() * (lin if routed else other)
                stored += b
                read += b * (expert_share if routed else 1.0)
        return stored, read

    gate = module_bytes(gate_module)[0]
    run_fraction = run_fraction or [1.0] * cfg.n_layers
    body = hf.model
    stored = module_bytes(hf)[0] + gate * len(cfg.gated_layers)
    embed = hf.get_input_embeddings().weight
    step = batch * embed.shape[1] * other + module_bytes(body.norm)[1]
    head = hf.get_output_embeddings()
    step += module_bytes(head)[1] if head is not None else embed.numel() * other
    for i, layer in enumerate(body.layers):
        attn = layer.self_attn
        always = module_bytes(layer.input_layernorm)[1]
        always += sum(module_bytes(getattr(attn, n))[1] for n in _CACHE_MODULES.get(cfg.model_type,
                                                                                    ("k_proj", "v_proj")))
        rest = module_bytes(layer)[1] - always
        step += always + (gate if i in cfg.gated_layers else 0) + run_fraction[i] * rest
    return {"weight_bytes_stored": int(stored), "weight_bytes_per_decode_step": int(step)}


def bandwidth_for(info: dict, on_gpu: bool) -> tuple[float | None, str]:
    """(GB/s, where it comes from) for the memory the weights stream from."""
    try:
        import profiles
    except ImportError:
        return None, "profiles package not installed"
    if info.get("jetson") or (on_gpu and info.get("cuda")):
        name = info.get("profile")
        if not name or name == "host":
            return None, f"no profile for this device ({info.get('profile_from')}): bandwidth unknown"
        bw, measured = profiles.load(name).bandwidth()
        return bw, f"profile {name} ({'measured' if measured else 'datasheet'})"
    if on_gpu:
        return None, "GPU run without a detected CUDA device"
    from profiles.host import host_profile

    bw, _ = host_profile().bandwidth()
    return bw, "this host, measured by profiles.host (STREAM copy, cached)"


def roofline(measured_tokens_per_s: float | None, traffic: dict, info: dict, on_gpu: bool, batch: int) -> dict:
    if traffic.get("weight_bytes_per_decode_step") is None:
        return {"bandwidth_gbs": None, "bandwidth_from": traffic.get("weight_traffic_unavailable", "unknown"),
                "weight_bytes_per_decode_step": None}
    bw, where = bandwidth_for(info, on_gpu)
    out = {"bandwidth_gbs": bw, "bandwidth_from": where,
           "weight_bytes_per_decode_step": traffic["weight_bytes_per_decode_step"]}
    if "host" in where:
        out["note"] = ("the host figure follows the STREAM copy convention (2 x bytes copied / time); a read-only "
                       "weight stream can run faster, so a fraction above 1 is possible on a CPU")
    if bw:
        limit = batch * bw * 1e9 / traffic["weight_bytes_per_decode_step"]
        out.update(roofline_tokens_per_s=limit,
                   fraction_of_roofline=measured_tokens_per_s / limit if measured_tokens_per_s else None)
    return out
