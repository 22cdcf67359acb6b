"""V3: dense causal decoder with the two-level dynamic relative position encoding and
Transformer-XL segment memory (the KV cache keeps the last memory_len positions, and every query
attends to at most memory_len earlier positions, so cached decoding equals a full forward).

Left padding (attention_mask) is a key-padding mask and nothing more: the bias depends only on distances, and a
row's real tokens are contiguous, so slot distances between them are their true distances; the memory keeps the
last memory_len slots, which hold the row's last memory_len real tokens (and padding, masked) exactly as alone."""

from __future__ import annotations

import torch
from torch import nn

from edgekit.config import ModelConfig
from edgekit.models.layers import Block, CausalLM, Past, pad_query_allowed, padding, relative_indices


def dense_allowed(dist: torch.Tensor, memory_len: int) -> torch.Tensor:
    """Causal mask [S, K] from distances, limited to memory_len earlier positions when > 0."""
    allowed = dist >= 0
    return allowed & (dist <= memory_len) if memory_len > 0 else allowed


class V3(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))

    def forward(self, input_ids: torch.Tensor, past: Past | None = None,
                thresholds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
        cfg = self.cfg
        b, s = input_ids.shape
        past = past if past is not None else self.empty_past(b, input_ids.device)
        p = past[0][0].shape[2]
        qpos = torch.arange(s, device=input_ids.device) + p  # positions inside the kept window
        dist = qpos[:, None] - torch.arange(p + s, device=input_ids.device)[None, :]  # [S, K]
        allowed = dense_allowed(dist, cfg.memory_len)
        if attention_mask is not None:  # [B, 1, S, K]: padding keys masked
            allowed = pad_query_allowed(allowed, padding(attention_mask, b, p + s, input_ids.device)[0], p)
        local_idx, global_idx = relative_indices(dist, cfg)

        h = self.embed(input_ids)  # [B, S, C]
        presents = []
        for block, (pk, pv) in zip(self.blocks, past):
            x = block.attn_norm(h)
            k, v = block.attn.kv(x)
            k_all, v_all = torch.cat([pk, k], 2), torch.cat([pv, v], 2)  # [B, H, K, D]
            h = block.residual(h, x, block.attn.query(x), k_all, v_all, allowed, local_idx, global_idx)
            presents.append(self.keep_memory(k_all, v_all))
        executed = torch.ones(cfg.n_layers, dtype=torch.bool, device=input_ids.device)
        return self.head(h), presents, executed

    def keep_memory(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segment memory: the cache keeps the last memory_len positions."""
        m = self.cfg.memory_len
        if m <= 0:
            return k, v
        start = torch.sym_max(k.shape[2] - m, 0)
        return k[:, :, start:], v[:, :, start:]
