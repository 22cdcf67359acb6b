"""Hugging Face model directories (config.json with `model_type`, *.safetensors, tokenizer.json):
qwen2 and llama (the DeepSeek-R1-Distill architectures) and deepseek_v3 (MLA + MoE).

`HFCausalLM` gives a transformers model edgekit's model interface (models.layers.CausalLM):
forward(input_ids, past [(k, v)] per layer, thresholds) -> (logits, presents, executed), the KV cache
as explicit per-layer tensors, so the torch runtime, the ONNX exporter and `validate` use it unchanged.
transformers and tokenizers are an optional extra, imported lazily. Loading never unpickles."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch
from torch import nn

from edgekit.errors import EdgekitError
from edgekit.hfconfig import GATES_FILE, HFConfig, read_hf_config, require
from edgekit.models.layers import pad_query_allowed, padding, row_scores


def load(directory: Path) -> HFCausalLM:
    """The transformers model (fp32, CPU, safetensors only) wrapped as an edgekit model."""
    directory = Path(directory)
    cfg = read_hf_config(directory)
    if not list(directory.glob("*.safetensors")):
        raise EdgekitError(f"{directory}: no *.safetensors weights", "edgekit never loads pickled .bin weights; "
                           "convert them to safetensors first")
    from safetensors import SafetensorError

    transformers = require("transformers")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                               use_safetensors=True, attn_implementation="eager")
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:  # a damaged or pickled weights file too
        raise EdgekitError(f"cannot load {directory}: {(str(e).splitlines() or [type(e).__name__])[0]}",
                           "the weights must be intact safetensors files; download or convert them again") from None
    if cfg.gated_layers:  # skip gates from 'edgekit calibrate-skip'
        return load_gated(hf.eval(), cfg, directory)
    return HFCausalLM(hf.eval(), cfg)


def dense_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """Every expert on every token, combined with the routing weights (zero for unrouted experts):
    the same result as transformers' data-dependent dispatch, but a static graph with no expert left out."""
    n, e = hidden_states.shape[0], experts.num_experts
    weights = torch.zeros(n, e, dtype=top_k_weights.dtype, device=hidden_states.device)
    weights = weights.scatter(1, top_k_index, top_k_weights).t().unsqueeze(-1)  # [experts, tokens, 1]
    gate, up = torch.matmul(hidden_states.unsqueeze(0), experts.w_gate_up).chunk(2, dim=-1)  # [E, T, I] each
    out = torch.matmul(experts.act_fn(gate) * up, experts.w_down)  # [experts, tokens, d]
    return (out * weights.to(out.dtype)).sum(0).to(hidden_states.dtype)


class _DenseExperts(nn.Module):
    """Replaces a transformers experts module (3-D gate_up_proj [E, 2I, d] / down_proj [E, d, I]) by the dense
    forward, with the weights stored [E, in, out] so the graph is a plain batched MatMul on an initializer
    (no run-time Transpose, no Einsum): ONNX Runtime's dynamic quantizer then turns them into int8."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        self.w_gate_up = nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2).contiguous())
        self.w_down = nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous())

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return dense_experts_forward(self, hidden_states, top_k_index, top_k_weights)


class HFCausalLM(nn.Module):
    """A transformers causal LM behind edgekit's model interface."""

    def __init__(self, hf: nn.Module, cfg: HFConfig):
        super().__init__()
        self.hf = hf
        self.cfg = cfg
        # transformers renamed forward's `past_key_values` to `cache` (5.x; the old name goes in 5.40)
        self.cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        if cfg.model_type == "deepseek_v3":
            for layer in hf.model.layers:
                experts = getattr(layer.mlp, "experts", None)
                if experts is not None and not isinstance(experts, _DenseExperts):
                    layer.mlp.experts = _DenseExperts(experts)

    @property
    def embed(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def empty_past(self, batch: int = 1, device=None, dtype=None):
        cfg = self.cfg
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        k = torch.zeros(batch, cfg.n_heads, 0, cfg.head_dim, dtype=dtype, device=device)
        v = torch.zeros(batch, cfg.n_heads, 0, cfg.value_dim, dtype=dtype, device=device)
        return [(k, v) for _ in range(cfg.n_layers)]

    def forward(self, input_ids: torch.Tensor, past=None, thresholds=None, attention_mask=None):
        """-> logits [B,S,V], presents (per layer (k, v) as the model caches them), executed (all True).
        attention_mask [B, P+S]: 1 real, 0 left padding (None: all ones); positions come from it."""
        from transformers import DynamicCache

        b, s = input_ids.shape
        past = past if past is not None else self.empty_past(b, input_ids.device)
        p = past[0][0].shape[2]
        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past])
        mask, pos = masks_and_positions(attention_mask, b, p, s, self.embed.weight.dtype, input_ids.device)
        out = self.hf(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                      **{self.cache_kw: cache})
        presents = [(layer.keys, layer.values) for layer in cache.layers]
        return out.logits, presents, torch.ones(self.cfg.n_layers, dtype=torch.bool, device=input_ids.device)


def masks_and_positions(attention_mask, b: int, p: int, s: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive mask [B, 1, S, P+S] (causal, padding keys masked) and position_ids [B, S] (a real token's
    position = the real tokens before it in its row) from edgekit's attention_mask [B, P+S] (None: all ones)."""
    keep, pos = padding(attention_mask, b, p + s, device)
    keys = torch.arange(p + s, device=device)
    causal = keys[None, :] <= (torch.arange(s, device=device) + p)[:, None]  # [S, P+S] in slots
    allowed = pad_query_allowed(causal, keep, p)
    mask = torch.where(allowed, torch.zeros((), dtype=dtype, device=device),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device))
    return mask, pos[:, p:]


def check_experts(model: HFCausalLM, candidate, spec, tolerance: float = 1e-3, max_inputs: int = 8) -> dict | None:
    """MoE: feed seeded [4, 32] inputs until every routed expert of every MoE layer has been selected
    (routing counts from the PyTorch router), and require the graph's logits to match PyTorch's on all
    of them. A graph that dropped or froze an expert differs on the tokens routed to it, so this fails
    the export instead of warning. None for a model without routed experts."""
    import numpy as np

    gates = [layer.mlp.gate for layer in getattr(model.hf.model, "layers", []) if hasattr(layer.mlp, "gate")]
    if not gates:
        return None
    n_exp = gates[0].num_experts
    counts = torch.zeros(len(gates), n_exp, dtype=torch.long)

    def hook(j):
        def record(_module, _args, out):
            counts[j] += torch.bincount(out[-1].reshape(-1).cpu(), minlength=n_exp)
        return record

    handles = [g.register_forward_hook(hook(j)) for j, g in enumerate(gates)]
    worst, used = 0.0, 0
    try:
        for used in range(1, max_inputs + 1):
            feeds = spec.dummy(4, 32, 0, seed=300 + used)
            with torch.no_grad():
                want = model(torch.from_numpy(feeds["input_ids"]))[0].float().numpy()
            got = candidate.infer(feeds)["logits"]
            diff = float(np.abs(got.astype(np.float64) - want).max()) / max(1.0, float(np.abs(want).max()))
            worst = max(worst, diff)
            if diff > tolerance:  # relative to the logits' scale, as edgekit.validate judges
                raise EdgekitError(f"validation failed: MoE logits differ by {diff:.3g} of their scale > "
                                   f"{tolerance:g} on inputs that reach every expert",
                                   "the exported graph dropped or froze an expert")
            if bool((counts > 0).all()):
                break
    finally:
        for h in handles:
            h.remove()
    missing = (counts == 0).nonzero().tolist()
    if missing:
        layer, expert = missing[0]
        raise EdgekitError(f"validation: {len(missing)} routed expert(s) never selected on {used} seeded inputs "
                           f"(e.g. MoE layer {layer} expert {expert}), so the graph cannot be shown to keep them",
                           "this is an edgekit limitation: report it with the model config")
    return {"moe_layers": len(gates), "experts": n_exp, "inputs": used, "min_tokens_per_expert": int(counts.min()),
            "max_abs_diff": worst, "passed": True}


# --- skip gates on a Hugging Face model (written by `edgekit calibrate-skip`, fitted in edgekit/calibrate.py) ---
# A gated layer computes its norm and K/V outside the condition (the cache stays valid whatever is
# skipped); torch.cond (ONNX If) decides the rest.

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

    def forward(self, input_ids: torch.Tensor, past=None, thresholds=None, attention_mask=None):
        m = self.hf.model
        b, s = input_ids.shape
        dev = input_ids.device
        past = past if past is not None else self.empty_past(b, dev)
        thresholds = thresholds if thresholds is not None else self.default_thresholds().to(dev)
        p = past[0][0].shape[2]
        h = m.embed_tokens(input_ids)  # [B, S, D]
        mask, pos = masks_and_positions(attention_mask, b, p, s, h.dtype, dev)
        qmask = None if attention_mask is None else attention_mask[:, p:] != 0  # [B, S] real new tokens
        cos, sin = m.rotary_emb(h, pos)
        presents, executed = [], []
        for i, layer in enumerate(m.layers):
            x = layer.input_layernorm(h)
            k, v = _cache_kv(self.cfg.model_type, layer.self_attn, x, cos, sin)
            k_all, v_all = torch.cat([past[i][0], k], 2), torch.cat([past[i][1], v], 2)
            presents.append((k_all, v_all))

            def run(h, x, k_all, v_all, cos, sin, mask, layer=layer):
                return _layer_rest(self.cfg.model_type, layer, h, x, k_all, v_all, cos, sin, mask)

            def run_rows(h, x, k_all, v_all, cos, sin, mask, rows, run=run):  # rows below the threshold keep h
                return torch.where(rows[:, None, None], run(h, x, k_all, v_all, cos, sin, mask), h)

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
            rows = row_scores(gate(x), qmask) > thresholds[i]  # [B]: each row decides on its own real tokens
            pred = rows.any()  # 0-D bool: the layer runs when any row's score exceeds the threshold
            if _exporting():
                h = torch.cond(pred, run_rows, lambda h, *_: h.clone(), (*operands, rows))
            elif bool(pred):
                h_in = h
                h = run_rows(*operands, rows)
                if self.record is not None:
                    r = (h - h_in).norm(dim=-1) / h_in.norm(dim=-1).clamp_min(1e-12)  # [B, S]
                    self.record.append((i, x.detach(), r.detach()))
            executed.append(pred)
        logits = self.hf.lm_head(m.norm(h))
        if self.per_token:
            executed = [e.expand(b, s) for e in executed]
        return logits, presents, torch.stack(executed)


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


