"""Layers shared by V3 and R1: x@W linear, RMSNorm, SwiGLU, the two-level dynamic relative
position encoding, attention, and the family-independent CausalLM shell (embedding, head, cache).

Shapes: B batch, S new tokens, P past length, K = P + S keys, H heads, D head_dim, C d_model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.config import ModelConfig


class Linear(nn.Module):
    """y = x @ W (+ b) with W stored [in, out].

    Stored this way on purpose (DESIGN.md): nn.Linear's [out, in] weight needs a Transpose that the
    ONNX exporter cannot fold when R1 reuses a block in several `If` branches, and the int8
    quantizer then leaves the weight fp32. x @ W has no transpose to fold.
    """

    def __init__(self, d_in: int, d_out: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None
        nn.init.normal_(self.weight, std=0.02) if self.weight.device.type != "meta" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.gate, self.up, self.down = Linear(d, d_ff), Linear(d, d_ff), Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def relative_indices(dist: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Table indices for a [S, K] matrix of distances (query pos - key pos; < 0 is masked anyway).

    local: the distance itself below local_window, else local_window (a fixed zero entry).
    global: log-spaced bucket, 0 .. n_global_buckets-1, the last shared by all d >= max_distance.
    """
    d = dist.clamp(min=0)
    local = d.clamp(max=cfg.local_window)
    scale = (cfg.n_global_buckets - 1) / math.log(cfg.max_distance + 1)
    glob = (torch.log((d + 1).float()) * scale).floor().long().clamp(max=cfg.n_global_buckets - 1)
    return local, glob


def padding(attention_mask: torch.Tensor | None, b: int, total: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """From an attention_mask [B, total] (1 real, 0 left padding; None = all ones): keep bool [B, total], the
    real positions, and pos long [B, total], each real token's position = the real tokens before it in its row
    (pads: 0)."""
    if attention_mask is None:
        keep = torch.ones(b, total, dtype=torch.bool, device=device)
        return keep, torch.arange(total, device=device).expand(b, total)
    keep = attention_mask != 0
    return keep, (torch.cumsum(keep.long(), 1) - 1).clamp(min=0)


def pad_query_allowed(allowed: torch.Tensor, keep: torch.Tensor, p: int) -> torch.Tensor:
    """allowed [.., S, K] (causal) & key padding, keep [B, K]; a padding query keeps its causal keys (only
    padding, itself included) so its hidden state stays finite -> [B, 1, S, K]."""
    key_ok = keep[:, None, :] | ~keep[:, p:, None]  # [B, S, K]
    return (allowed & key_ok).unsqueeze(1)


def row_scores(score: torch.Tensor, qmask: torch.Tensor | None) -> torch.Tensor:
    """A gate's per-token score [B, S] -> per row [B]: the mean over the row's real new tokens (padding excluded),
    so a row decides as it would alone."""
    if qmask is None:
        return score.mean(1)
    w = qmask.to(score.dtype)
    return (score * w).sum(1) / w.sum(1).clamp(min=1)


class RelativePosition(nn.Module):
    """Two-level dynamic relative position bias [B, H, S, K].

    local: learned per-head bias for each distance inside the window; global: learned per-head bias
    over log-spaced distance buckets; an input-dependent per-head gate g = sigmoid(x Wg + bg) mixes
    them: bias = g * local + (1 - g) * global.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.n_heads
        self.local = nn.Parameter(torch.zeros(h, cfg.local_window))
        self.glob = nn.Parameter(torch.zeros(h, cfg.n_global_buckets))
        self.gate = Linear(cfg.d_model, h, bias=True)

    def forward(self, x: torch.Tensor, local_idx: torch.Tensor, global_idx: torch.Tensor) -> torch.Tensor:
        local_tab = F.pad(self.local, (0, 1))  # entry local_window = 0: beyond the window
        lb = local_tab[:, local_idx]  # [H, S, K], or [H, B, S, K] for per-row indices [B, S, K]
        gb = self.glob[:, global_idx]
        if local_idx.dim() == 3:
            lb, gb = lb.transpose(0, 1), gb.transpose(0, 1)  # [B, H, S, K]
        g = torch.sigmoid(self.gate(x)).transpose(1, 2).unsqueeze(-1)  # [B, H, S, 1]
        return g * lb + (1 - g) * gb


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, kv = cfg.d_model, cfg.kv_heads * cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = Linear(c, c), Linear(c, kv), Linear(c, kv), Linear(c, c)
        self.relpos = RelativePosition(cfg)

    def heads(self, y: torch.Tensor) -> torch.Tensor:  # [B, S, H*D] -> [B, H, S, D]
        b, s, _ = y.shape
        return y.view(b, s, -1, self.head_dim).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [B, Hkv, S, D] (grouped-query attention: Hkv = n_kv_heads divides H)."""
        return self.heads(self.k(x)), self.heads(self.v(x))

    def expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """[B, Hkv, K, D] -> [B, H, K, D]: query head h reads K/V head h // (H / Hkv)."""
        g = self.n_heads // self.n_kv_heads
        return t if g == 1 else t.repeat_interleave(g, dim=1)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.q(x))

    def forward(self, x, q, k_all, v_all, allowed, local_idx, global_idx) -> torch.Tensor:
        """x [B,S,C] normed input, q [B,H,S,D], k_all/v_all [B,Hkv,K,D], allowed bool [.., S, K]."""
        k_all, v_all = self.expand_kv(k_all), self.expand_kv(v_all)
        scores = (q @ k_all.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores + self.relpos(x, local_idx, global_idx)
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(scores, dim=-1) @ v_all  # [B, H, S, D]
        b, _, s, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    """Pre-norm transformer block; the attention mask comes from the family."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def residual(self, h, x, q, k_all, v_all, allowed, local_idx, global_idx) -> torch.Tensor:
        h = h + self.attn(x, q, k_all, v_all, allowed, local_idx, global_idx)
        return h + self.mlp(self.mlp_norm(h))


Past = list[tuple[torch.Tensor, torch.Tensor]]


class CausalLM(nn.Module):
    """Embedding, blocks, final norm, LM head and the per-layer KV cache; families fill in layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.d_model, cfg.vocab_size)
        if self.embed.weight.device.type != "meta":
            nn.init.normal_(self.embed.weight, std=0.02)

    def empty_past(self, batch: int = 1, device=None, dtype=None) -> Past:
        cfg = self.cfg
        shape = (batch, cfg.kv_heads, 0, cfg.head_dim)
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        return [(torch.zeros(shape, dtype=dtype, device=device),) * 2 for _ in range(cfg.n_layers)]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return h @ self.embed.weight.t() if self.lm_head is None else self.lm_head(h)

    def default_thresholds(self) -> torch.Tensor:
        return torch.full((self.cfg.n_layers,), self.cfg.default_threshold)

    def forward(self, input_ids: torch.Tensor, past: Past | None = None,
                thresholds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
        """-> logits [B,S,V], presents (per layer (k, v) [B,Hkv,K',D]), executed bool [n_layers].
        attention_mask [B, P+S] (edgekit.spec: 1 real, 0 left padding; None = all ones)."""
        raise NotImplementedError
