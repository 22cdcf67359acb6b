"""What `edgekit plan`'s arithmetic needs from a model (its Shape), counted without weights: edgekit's V3/R1
configs are built on torch's meta device (edgekit.models), a Hugging Face config.json is read alone (no
transformers, no weights: a directory with only config.json plans too). Kept apart from edgekit/plan.py's
arithmetic so that each stays readable."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from edgekit.config import route_k
from edgekit.errors import EdgekitError
from edgekit.families import family


@dataclass(frozen=True)
class Shape:
    """What the arithmetic needs from a model, counted on the meta device (no memory)."""

    name: str
    family: str
    layers: int
    unique_blocks: int
    gated_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    vocab: int
    max_seq_len: int
    memory_len: int
    block_size: int
    params_unique: int
    params_executed: int
    embed: int
    head: int  # 0 when tied to the embedding
    block_linear: int  # x @ W weights in one block (q, k, v, o, position gate, MLP)
    block_kv: int  # of which the K and V projections (computed even in a skipped R1 layer)
    block_small: int  # norms, position tables, biases
    other_small: int  # final norm, R1 gates
    # Hugging Face models (hf_shape): layers differ (dense / MoE), so totals replace block x count; 0 = derive
    linear_total: int = 0  # stored x @ W weights of all layers (MoE: every expert)
    linear_active: int = 0  # x @ W weights one token reads in all layers (MoE: top-k + shared experts + router)
    small_total: int = 0  # norms and biases of all layers
    n_kv_heads: int = 0  # GQA
    kv_width: int = 0  # cache elements per token per layer (K + V); 0 = 2 x d_model
    attn_width: int = 0  # QK^T + PV width per query position over all heads; 0 = 2 x d_model
    kv_basis: str = ""  # what the cache holds, in words
    kv_alt_width: int = 0  # MLA: the decompressed per-head K/V, shown next to the estimate
    kv_alt_basis: str = ""
    moe: tuple = ()  # MoE: (routed experts, experts per token, shared experts, MoE layers, parameters per expert)

    @property
    def stored_linear(self) -> int:
        return self.linear_total or self.unique_blocks * self.block_linear

    @property
    def stored_small(self) -> int:
        return self.small_total or self.unique_blocks * self.block_small

    def read_linear(self, batch: int = 1) -> float:
        """x @ W weights one decode step of `batch` sequences reads over all layers (gates open). MoE: each
        sequence routes to top-k experts, so a batch reads the expected number of distinct experts,
        E x (1 - (1 - k/E)^batch), instead of k."""
        if not self.moe:
            return self.linear_active or self.layers * self.block_linear
        n, k, _, moe_layers, per_expert = self.moe
        touched = n * (1 - (1 - k / n) ** batch)
        return self.linear_active + moe_layers * per_expert * (touched - k)

    @property
    def read_small(self) -> int:
        return self.small_total or self.layers * self.block_small

    @property
    def kv_per_token(self) -> int:
        """Cache elements per token per layer."""
        return self.kv_width or 2 * self.d_model

    @property
    def attn_per_key(self) -> int:
        """Multiply-adds per query position per key per layer (QK^T and PV)."""
        return self.attn_width or 2 * self.d_model

    def kv_positions(self, context: int) -> int:
        """Positions the cache holds at `context` tokens: V3 stops at memory_len."""
        return min(context, self.memory_len) if self.segment_memory and self.memory_len > 0 else context

    @property
    def routed(self) -> bool:
        """R1's block-sparse routed attention (the family registry says which family has it)."""
        return family(self.family).routed

    @property
    def segment_memory(self) -> bool:
        """V3's Transformer-XL segment memory: the cache stops at memory_len."""
        return family(self.family).segment_memory

    def keys_read(self, keys: int) -> int:
        """Keys one query attends to when `keys` positions lie up to it: all of them, or for routed attention its
        own block plus the k = route_k(blocks) best complete earlier blocks, (k + 1) x block at most."""
        if not self.routed:
            return keys
        qb = (keys - 1) // self.block_size  # the query's block; qb complete blocks before it
        return min(keys, (min(route_k(qb + 1), qb) + 1) * self.block_size)


@cache
def _shape_of(cfg_json: str) -> Shape:
    import json

    from edgekit.models import ModelConfig, build, param_counts
    from edgekit.models.layers import Linear

    cfg = ModelConfig.from_dict(json.loads(cfg_json))
    model = build(cfg, device="meta")
    counts = param_counts(model)
    block = model.blocks[0]
    block_params = sum(p.numel() for p in block.parameters())
    block_linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, Linear))
    embed = model.embed.weight.numel()
    head = 0 if model.lm_head is None else model.lm_head.weight.numel()
    other = counts["unique"] - embed - head - len(model.blocks) * block_params
    return Shape(cfg.name, cfg.family, cfg.n_layers, len(model.blocks), len(cfg.gated_layers), cfg.d_model,
                 cfg.n_heads, cfg.d_ff, cfg.vocab_size, cfg.max_seq_len, cfg.memory_len, cfg.block_size,
                 counts["unique"], counts["total"], embed, head, block_linear,
                 block.attn.k.weight.numel() + block.attn.v.weight.numel(), block_params - block_linear, other,
                 n_kv_heads=cfg.kv_heads, kv_width=2 * cfg.kv_heads * cfg.head_dim)  # GQA: K/V heads only


def _int(d: dict, key: str, default=None) -> int:
    v = d.get(key, default)
    if v is None:
        raise KeyError(key)
    return int(v)


@cache
def _hf_shape_of(cfg_json: str, name: str) -> Shape:
    import json

    d = json.loads(cfg_json)
    mt = d["model_type"]
    h, n_layers, vocab = _int(d, "hidden_size"), _int(d, "num_hidden_layers"), _int(d, "vocab_size")
    heads = _int(d, "num_attention_heads")
    kv_heads = int(d.get("num_key_value_heads") or heads)
    ff = _int(d, "intermediate_size")
    mlp = 3 * h * ff  # gate, up, down (SwiGLU)
    moe, kv_alt, kv_alt_basis = (), 0, ""
    if mt == "deepseek_v3":
        rank, rope = _int(d, "kv_lora_rank"), _int(d, "qk_rope_head_dim")
        nope, v_dim = _int(d, "qk_nope_head_dim"), _int(d, "v_head_dim")
        q_rank = d.get("q_lora_rank")
        q = h * q_rank + q_rank * heads * (nope + rope) if q_rank else h * heads * (nope + rope)
        attn = q + h * (rank + rope) + rank * heads * (nope + v_dim) + heads * v_dim * h  # q, kv_a, kv_b, o
        attn_small = 2 * h + rank + (q_rank or 0)  # two layer norms, kv_a / q_a norms
        if d.get("attention_bias"):
            attn_small += (q_rank or heads * (nope + rope)) + rank + rope + h
        n_exp, k = _int(d, "n_routed_experts"), _int(d, "num_experts_per_tok")
        shared = int(d.get("n_shared_experts") or 0)
        expert = 3 * h * _int(d, "moe_intermediate_size")
        dense_layers = min(int(d.get("first_k_dense_replace") or 0), n_layers)
        moe_layers = n_layers - dense_layers
        router = n_exp * h
        linear_total = n_layers * attn + dense_layers * mlp + moe_layers * ((n_exp + shared) * expert + router)
        linear_active = n_layers * attn + dense_layers * mlp + moe_layers * ((k + shared) * expert + router)
        small_total = n_layers * attn_small + moe_layers * n_exp  # + the router's score-correction bias
        moe = (n_exp, k, shared, moe_layers, expert)
        d_ff = max(ff, (k + shared) * _int(d, "moe_intermediate_size"))
        kv_width, attn_width, head_dim = rank + rope, heads * (rank + rope + rank), rank + rope
        kv_basis = (f"MLA compressed latent: kv_lora_rank {rank} + qk_rope_head_dim {rope} = {rank + rope} values per "
                    "token per layer")
        kv_alt = heads * (nope + rope + v_dim)
        kv_alt_basis = (f"decompressed per-head K/V: {heads} heads x (K {nope + rope} + V {v_dim}) = {kv_alt} values "
                        f"per token per layer, {kv_alt / (rank + rope):.0f}x the latent")
    else:  # qwen2, llama: GQA
        head_dim = int(d.get("head_dim") or h // heads)
        attn = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h
        bias = mt == "qwen2" or bool(d.get("attention_bias"))  # Qwen2 always has q/k/v biases
        attn_small = 2 * h + (heads * head_dim + 2 * kv_heads * head_dim if bias else 0)
        attn_small += h if mt == "llama" and d.get("attention_bias") else 0  # o_proj bias
        attn_small += 2 * ff + h if d.get("mlp_bias") else 0
        linear_total = linear_active = n_layers * (attn + mlp)
        small_total = n_layers * attn_small
        d_ff = ff
        kv_width, attn_width = 2 * kv_heads * head_dim, 2 * heads * head_dim
        kv_basis = (f"{kv_heads} KV heads x head_dim {head_dim} x (K + V) = {kv_width} values per token per layer"
                    + (f" (GQA: {heads} query heads share them)" if kv_heads < heads else ""))
    embed = vocab * h
    head = 0 if d.get("tie_word_embeddings", False) else vocab * h
    total = linear_total + small_total + embed + head + h
    active = linear_active + small_total + embed + head + h
    return Shape(name, f"hf-{mt}", n_layers, n_layers, 0, h, heads, d_ff, vocab,
                 int(d.get("max_position_embeddings") or 4096), 0, 0, total, active, embed, head, 0, 0, 0, h,
                 linear_total=linear_total, linear_active=linear_active, small_total=small_total,
                 n_kv_heads=kv_heads if mt != "deepseek_v3" else 1, kv_width=kv_width, attn_width=attn_width,
                 kv_basis=kv_basis, kv_alt_width=kv_alt, kv_alt_basis=kv_alt_basis, moe=moe)


def hf_shape(raw: dict, name: str) -> Shape:
    """Shape of a Hugging Face config.json (qwen2, llama, deepseek_v3), counted from the config alone:
    no weights are needed, so a directory with only config.json plans too."""
    import json

    from edgekit.hfconfig import SUPPORTED

    if raw.get("model_type") not in SUPPORTED:
        raise EdgekitError(f"cannot plan Hugging Face model_type '{raw.get('model_type')}'",
                           f"supported: {', '.join(SUPPORTED)}")
    try:
        return _hf_shape_of(json.dumps(raw, sort_keys=True), name)
    except (KeyError, TypeError, ValueError) as e:
        raise EdgekitError(f"config.json of {name}: missing or bad field {e}",
                           "is this a complete Hugging Face config?") from None


def shape(target) -> Shape:
    """Shape of a preset name, checkpoint, Hugging Face or artifact directory, or a ModelConfig."""
    import json

    from edgekit.models import ModelConfig

    if not isinstance(target, ModelConfig):
        from edgekit.resolve import resolve

        res = resolve(target)
        if res.cfg.family.startswith("hf-"):
            from edgekit.hfconfig import raw_config

            return hf_shape(raw_config(res.path), res.name)
        target = res.cfg
    return _shape_of(json.dumps(target.to_dict(), sort_keys=True))
