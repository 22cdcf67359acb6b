"""The parameters of a V3 / R1 model from its config alone, without torch: name -> (shape, is a x @ W
weight), exactly the names and shapes of edgekit.models' `named_parameters()` (tested against the model
built on the meta device). A device that profiles an ONNX bundle counts its weight traffic from this."""

from __future__ import annotations

from edgekit.config import ModelConfig

Param = tuple[tuple[int, ...], bool]  # (shape, is a Linear weight)


def block(cfg: ModelConfig) -> dict[str, Param]:
    """One transformer block (edgekit.models.layers.Block), names relative to the block."""
    c, kv, h, ff = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.n_heads, cfg.d_ff
    return {"attn_norm.weight": ((c,), False),
            "attn.q.weight": ((c, c), True), "attn.k.weight": ((c, kv), True),
            "attn.v.weight": ((c, kv), True), "attn.o.weight": ((c, c), True),
            "attn.relpos.local": ((h, cfg.local_window), False), "attn.relpos.glob": ((h, cfg.n_global_buckets), False),
            "attn.relpos.gate.weight": ((c, h), True), "attn.relpos.gate.bias": ((h,), False),
            "mlp_norm.weight": ((c,), False),
            "mlp.gate.weight": ((c, ff), True), "mlp.up.weight": ((c, ff), True), "mlp.down.weight": ((ff, c), True)}


def n_blocks(cfg: ModelConfig) -> int:
    """Stored blocks: V3 one per layer, R1 `unique_blocks` (layer l runs block cfg.block_of(l))."""
    return cfg.n_layers if cfg.family == "v3" else cfg.unique_blocks


def gate_params(cfg: ModelConfig) -> dict[str, Param]:
    """R1's per-layer skip gate (w [d_model], b scalar); V3 has none."""
    return {"w": ((cfg.d_model,), False), "b": ((), False)}


def parameters(cfg: ModelConfig) -> dict[str, Param]:
    """Every parameter of the model by its `named_parameters()` name."""
    c = cfg.d_model
    out: dict[str, Param] = {"embed.weight": ((cfg.vocab_size, c), False), "norm.weight": ((c,), False)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = ((c, cfg.vocab_size), True)
    one = block(cfg)
    for i in range(n_blocks(cfg)):
        out.update({f"blocks.{i}.{k}": v for k, v in one.items()})
    if cfg.family == "r1":
        for layer in cfg.gated_layers:
            out.update({f"gates.{layer}.{k}": v for k, v in gate_params(cfg).items()})
    return out


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n

