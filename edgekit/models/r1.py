"""R1: block-sparse routed attention, cross-layer parameter sharing and selective activation.

Attention: each query sees its own block (causally) plus the top-k earlier key blocks, ranked by
q . mean(K of block) per head, with k = floor(log2(number of blocks up to the query)), so the
attended positions grow O(n log n). Routing is per query (not per query block) so that cached
decoding equals a full forward. The kernel here is a masked dense one: exact and exportable, but
its arithmetic is still O(n^2); `attended_positions` counts what the sparsity pattern reads.

Sharing: layer l runs block l % unique_blocks. Gates are per layer (cheap: one C-vector each).
Selective activation: a gated layer computes its K/V and appends them to the cache outside the
condition (the cache stays valid whatever is skipped); the condition score > threshold decides only
attention + MLP. Under export that is torch.cond (ONNX If); in eager PyTorch a plain `if`.
"""

from __future__ import annotations

import torch
from torch import nn

from edgekit.config import ModelConfig
from edgekit.models.layers import Block, CausalLM, Past, relative_indices


def routed_allowed(q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mask [B, H, S, K]: own block up to the query, plus the top-k routed earlier key blocks."""
    b, h, n_keys, d = k.shape
    n_kb = (n_keys + block_size - 1) // block_size
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, n_kb * block_size - n_keys))
    k_mean = k_pad.reshape(b, h, n_kb, block_size, d).mean(3)  # [B, H, NB, D]
    route = q @ k_mean.transpose(-1, -2)  # [B, H, S, NB]
    qblk = torch.div(qpos, block_size, rounding_mode="floor")  # [S]
    kb = torch.arange(n_kb, device=q.device)
    eligible = kb[None, :] < qblk[:, None]  # complete earlier blocks [S, NB]
    route = route.masked_fill(~eligible, float("-inf"))
    rank = route.argsort(-1, descending=True).argsort(-1)  # 0 = best block
    k_per_query = torch.log2((qblk + 1).float()).floor().clamp(min=1).long()  # route_k(qblk + 1)
    selected = (rank < k_per_query[:, None]) & eligible  # [B, H, S, NB]
    kpos = torch.arange(n_keys, device=q.device)
    kblk = torch.div(kpos, block_size, rounding_mode="floor")
    local = (kblk[None, :] == qblk[:, None]) & (kpos[None, :] <= qpos[:, None])  # [S, K]
    return selected[..., kblk] | local


class Gate(nn.Module):
    """Per-token score sigmoid(rmsnorm(h) . w + b) [B, S]. At inference one decision per call:
    the mean score over batch and tokens against the layer's threshold (decode: one token)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(cfg.d_model))
        self.b = nn.Parameter(torch.full((), 2.0))  # untrained gates open: score ~0.88
        self.eps = cfg.norm_eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return torch.sigmoid(x @ self.w + self.b)


def _exporting() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


class R1(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.unique_blocks))
        self.gates = nn.ModuleDict({str(i): Gate(cfg) for i in cfg.gated_layers})

    def forward(self, input_ids: torch.Tensor, past: Past | None = None,
                thresholds: torch.Tensor | None = None):
        cfg = self.cfg
        b, s = input_ids.shape
        dev = input_ids.device
        past = past if past is not None else self.empty_past(b, dev)
        thresholds = thresholds if thresholds is not None else self.default_thresholds().to(dev)
        p = past[0][0].shape[2]
        qpos = torch.arange(s, device=dev) + p  # absolute positions (R1's cache is never truncated)
        dist = qpos[:, None] - torch.arange(p + s, device=dev)[None, :]
        local_idx, global_idx = relative_indices(dist, cfg)

        h = self.embed(input_ids)
        presents, executed = [], []
        self.gate_scores: list[torch.Tensor] = []  # training: per-layer [B, S] scores for a compute penalty
        for layer, (pk, pv) in enumerate(past):
            block = self.blocks[cfg.block_of(layer)]
            x = block.attn_norm(h)
            k, v = block.attn.kv(x)
            k_all, v_all = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            presents.append((k_all, v_all))

            def run(h, x, k_all, v_all, qpos, local_idx, global_idx, block=block):
                q = block.attn.query(x)
                allowed = routed_allowed(q, k_all, qpos, cfg.block_size)
                return block.residual(h, x, q, k_all, v_all, allowed, local_idx, global_idx)

            gate = self.gates[str(layer)] if str(layer) in self.gates else None
            if gate is None:
                h = run(h, x, k_all, v_all, qpos, local_idx, global_idx)
                executed.append(torch.ones((), dtype=torch.bool, device=dev))
                continue
            score = gate(h)  # [B, S]
            operands = (h, x, k_all, v_all, qpos, local_idx, global_idx)
            if self.training:  # per-token hard gate with a straight-through gradient to the score
                hard = (score > thresholds[layer]).to(h.dtype)
                mix = (hard + score - score.detach()).unsqueeze(-1)
                h = h + mix * (run(*operands) - h)
                self.gate_scores.append(score)
                executed.append(hard.mean() > 0.5)
                continue
            pred = score.mean() > thresholds[layer]  # 0-D bool
            if _exporting():
                h = torch.cond(pred, run, lambda h, *_: h.clone(), operands)
            elif bool(pred):
                h = run(*operands)
            executed.append(pred)
        return self.head(h), presents, torch.stack(executed)


def attended_positions(cfg: ModelConfig, n: int, seed: int = 0) -> int:
    """Count (query, key) pairs the routed mask reads for one head over n tokens (random q, k)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, n, cfg.head_dim, generator=g)
    k = torch.randn(1, 1, n, cfg.head_dim, generator=g)
    return int(routed_allowed(q, k, torch.arange(n), cfg.block_size).sum())
