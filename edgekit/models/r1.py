"""R1: block-sparse routed attention, cross-layer parameter sharing and selective activation.

Attention: each query sees its own block (causally) plus the top-k earlier key blocks, ranked by
q . mean(K of block) per head, with k = floor(log2(number of blocks up to the query)), so the
attended positions grow O(n log n). Routing is per query (not per query block) so that cached
decoding equals a full forward. The kernel (`routed_attention`) gathers only the selected blocks' K/V,
in chunks of queries, so prefill memory is O(chunk x (k + 1) x block) and arithmetic O(n log n);
`routed_allowed` + a dense softmax is the masked-dense oracle it is tested against
(`R1.attention_impl = "dense"`). K/V may have fewer heads than Q (n_kv_heads, grouped-query attention).

Sharing: layer l runs block l % unique_blocks. Gates are per layer (cheap: one C-vector each).
Selective activation: a gated layer computes its K/V and appends them to the cache outside the
condition (the cache stays valid whatever is skipped); the condition score > threshold decides only
attention + MLP. Under export that is torch.cond (ONNX If); in eager PyTorch a plain `if`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.config import ModelConfig, route_k
from edgekit.models.layers import Attention, Block, CausalLM, Past, relative_indices

ATTENTION = "gather"  # default kernel for new R1 models: "gather" (sparse) or "dense" (the masked-dense oracle)
QUERY_CHUNK = 64  # eager prefill: queries per chunk of the gather kernel (bounds its activation memory)


def routed_allowed(q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mask [B, H, S, K]: own block up to the query, plus the top-k routed earlier key blocks.

    The masked-dense oracle (k [B, H, K, D], one K head per query head). Ties in the routing score go to
    the lower block index (stable sort), the rule the gather kernel follows too."""
    b, h, n_keys, d = k.shape
    n_kb = (n_keys + block_size - 1) // block_size
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, n_kb * block_size - n_keys))
    k_mean = k_pad.reshape(b, h, n_kb, block_size, d).mean(3)  # [B, H, NB, D]
    route = q @ k_mean.transpose(-1, -2)  # [B, H, S, NB]
    qblk = torch.div(qpos, block_size, rounding_mode="floor")  # [S]
    kb = torch.arange(n_kb, device=q.device)
    eligible = kb[None, :] < qblk[:, None]  # complete earlier blocks [S, NB]
    route = route.masked_fill(~eligible, float("-inf"))
    rank = route.argsort(dim=-1, descending=True, stable=True).argsort(-1)  # 0 = best block
    k_per_query = torch.log2((qblk + 1).float()).floor().clamp(min=1).long()  # route_k(qblk + 1)
    selected = (rank < k_per_query[:, None]) & eligible  # [B, H, S, NB]
    kpos = torch.arange(n_keys, device=q.device)
    kblk = torch.div(kpos, block_size, rounding_mode="floor")
    local = (kblk[None, :] == qblk[:, None]) & (kpos[None, :] <= qpos[:, None])  # [S, K]
    return selected[..., kblk] | local


def block_means(k_blocks: torch.Tensor) -> torch.Tensor:
    """Routing keys [B, Hkv, NB, D] from the zero-padded key blocks [B, Hkv, NB, block, D]: mean K of each block
    (the last one, when incomplete, is never eligible: routing only reads complete earlier blocks)."""
    return k_blocks.mean(3)


def max_route_k(cfg: ModelConfig) -> int:
    """The most routed blocks any query of a max_seq_len context selects (the exported graph's fixed k)."""
    return route_k(-(-cfg.max_seq_len // cfg.block_size))


def routed_attention(attn: Attention, cfg: ModelConfig, x: torch.Tensor, q: torch.Tensor, k_all: torch.Tensor,
                     v_all: torch.Tensor, qpos: torch.Tensor, chunk: int | None = None,
                     kmax: int | None = None) -> torch.Tensor:
    """Gather-based routed attention, equal to the masked-dense oracle (routed_allowed + Attention.forward).

    x [B,S,C] normed input, q [B,H,S,D], k_all/v_all [B,Hkv,K,D], qpos [S] absolute positions (< K).
    Each query ranks the complete earlier key blocks by q . mean(K of block), keeps the best
    k = route_k(own block index + 1) of them (ties: lower block index), and attends to exactly those blocks
    plus its own block (causally): the (kmax + 1) blocks are gathered, [B, H, C, kmax + 1, block, D] for a
    chunk of C queries, so memory is O(C x (k + 1) x block), never O(S x K). The relative-position bias is
    looked up for the gathered keys by their true distances. kmax: a fixed number of routed slots (masked
    beyond each query's k); None = the exact maximum of the chunk (eager) or max_route_k (export).
    """
    b, h, s, d = q.shape
    hkv, n_keys, bs = k_all.shape[1], k_all.shape[2], cfg.block_size
    n_kb = (n_keys + bs - 1) // bs
    pad = n_kb * bs - n_keys
    kb = F.pad(k_all, (0, 0, 0, pad)).reshape(b, hkv, n_kb, bs, d)  # every key block
    k_mean = attn.expand_kv(block_means(kb))  # [B, H, NB, D]
    kb = kb.reshape(b * hkv * n_kb, bs, d)  # flat, for the gather
    vb = F.pad(v_all, (0, 0, 0, pad)).reshape(b * hkv * n_kb, bs, d)
    g = torch.sigmoid(attn.relpos.gate(x)).transpose(1, 2)  # [B, H, S]
    local_tab = F.pad(attn.relpos.local, (0, 1)).reshape(-1)  # entry local_window = 0: beyond the window
    glob_tab = attn.relpos.glob.reshape(-1)
    heads = torch.arange(h, device=q.device)
    head_row = (torch.arange(b, device=q.device)[:, None] * hkv + heads[None, :] // (h // hkv)) * n_kb  # [B, H]
    scale = 1.0 / math.sqrt(d)
    exporting = _exporting()
    chunk = s if exporting or not chunk else chunk
    outs = []
    for c0 in [0] if exporting else range(0, s, chunk):  # export: one chunk (no shape-dependent loop)
        qc, pos, gc = (q, qpos, g) if exporting else (q[:, :, c0:c0 + chunk], qpos[c0:c0 + chunk],
                                                      g[:, :, c0:c0 + chunk])  # [B,H,C,D], [C], [B,H,C]
        qblk = torch.div(pos, bs, rounding_mode="floor")
        if kmax is not None:
            km = kmax
        elif exporting:
            km = max_route_k(cfg)
        else:  # the exact maximum over the chunk; a query in block qb has qb earlier complete blocks
            km = min(route_k(int(qblk[-1]) + 1), int(qblk[-1]))
        blocks = qblk.expand(b, h, -1)[..., None]  # own block [B, H, C, 1]
        valid = torch.ones_like(blocks, dtype=torch.bool)
        if km > 0:
            route = qc @ k_mean.transpose(-1, -2)  # [B, H, C, NF]
            eligible = torch.arange(n_kb, device=q.device)[None, :] < qblk[:, None]
            route = route.masked_fill(~eligible, float("-inf"))
            route = F.pad(route, (0, km), value=float("-inf"))  # at least km columns
            if exporting:  # ONNX TopK breaks ties to the lower index, as the stable sort does
                best, order = route.topk(km, dim=-1)
            else:  # torch.topk documents no tie order
                best, order = route.sort(dim=-1, descending=True, stable=True)
                best, order = best[..., :km], order[..., :km]  # [B, H, C, km]
            k_per_query = torch.log2((qblk + 1).float()).floor().clamp(min=1).long()
            chosen = (torch.arange(km, device=q.device) < k_per_query[:, None]) & (best > float("-inf"))
            order = torch.where(chosen, order, blocks)  # unused slots point at the own block, masked below
            blocks, valid = torch.cat([order, blocks], -1), torch.cat([chosen, valid], -1)
        n_slots = blocks.shape[-1]
        kg = kb[head_row[:, :, None, None] + blocks]  # [B, H, C, J, bs, D]
        vg = vb[head_row[:, :, None, None] + blocks]
        kpos = blocks[..., None] * bs + torch.arange(bs, device=q.device)  # [B, H, C, J, bs]
        dist = pos[:, None, None] - kpos
        allowed = valid[..., None] & (dist >= 0)  # routed blocks lie before the query; the own block causally
        local_idx, global_idx = relative_indices(dist, cfg)
        row = heads[:, None, None, None]
        gc = gc[..., None, None]
        bias = gc * local_tab[row * (cfg.local_window + 1) + local_idx] + (1 - gc) * glob_tab[
            row * cfg.n_global_buckets + global_idx]
        c = qc.shape[2]
        scores = (kg.reshape(b, h, c, n_slots * bs, d) @ qc.unsqueeze(-1)).squeeze(-1) * scale
        scores = scores + bias.reshape(b, h, c, n_slots * bs)
        scores = scores.masked_fill(~allowed.reshape(b, h, c, n_slots * bs), float("-inf"))
        p = torch.softmax(scores, dim=-1)
        outs.append((p.unsqueeze(-2) @ vg.reshape(b, h, c, n_slots * bs, d)).squeeze(-2))  # [B, H, C, D]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return attn.o(out.transpose(1, 2).reshape(b, s, -1))


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
        self.attention_impl = ATTENTION  # "gather" or "dense" (the oracle); same results
        self.query_chunk = QUERY_CHUNK

    def forward(self, input_ids: torch.Tensor, past: Past | None = None,
                thresholds: torch.Tensor | None = None):
        cfg = self.cfg
        b, s = input_ids.shape
        dev = input_ids.device
        past = past if past is not None else self.empty_past(b, dev)
        thresholds = thresholds if thresholds is not None else self.default_thresholds().to(dev)
        p = past[0][0].shape[2]
        qpos = torch.arange(s, device=dev) + p  # absolute positions (R1's cache is never truncated)
        dense = self.attention_impl == "dense"
        if dense:
            dist = qpos[:, None] - torch.arange(p + s, device=dev)[None, :]
            local_idx, global_idx = relative_indices(dist, cfg)
        else:  # unused by the gather kernel (it looks up the gathered keys' distances itself)
            local_idx = global_idx = qpos

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
                if dense:
                    allowed = routed_allowed(q, block.attn.expand_kv(k_all), qpos, cfg.block_size)
                    return block.residual(h, x, q, k_all, v_all, allowed, local_idx, global_idx)
                h = h + routed_attention(block.attn, cfg, x, q, k_all, v_all, qpos, self.query_chunk)
                return h + block.mlp(block.mlp_norm(h))

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


def attended_keys(cfg: ModelConfig, n: int) -> int:
    """(query, key) pairs the gather kernel reads for one head over n tokens: the own block up to the query
    plus route_k(own block + 1) complete earlier blocks (computed, no tensors)."""
    bs, total = cfg.block_size, 0
    for qb in range(-(-n // bs)):
        rows = min(bs, n - qb * bs)
        total += rows * (rows + 1) // 2 + (rows * min(route_k(qb + 1), qb) * bs)
    return total
