"""R1: block-sparse routed attention, cross-layer parameter sharing and selective activation.

Attention: each query sees its own block (causally) plus the top-k earlier key blocks, ranked by
q . mean(K of block) per head, with k = floor(log2(number of blocks up to the query)), so the
attended positions grow O(n log n). Routing is per query (not per query block) so that cached
decoding equals a full forward. Two exact kernels read only the selected blocks, in chunks of queries, so
memory is O(chunk x (k + 1) x block) and arithmetic O(n log n) (`routed_attention`):
- "blocks" (eager prefill, MoBA-style): the (query, head) pairs are grouped per key block into tiles, each tile one
  small GEMM against its block's keys and values (the keys are read per tile, not copied per query);
- "gather" (the exported graph, and eager decode): each query gathers its own + k routed blocks' K/V.
`routed_allowed` + a dense softmax is the masked-dense oracle both are tested against
(`R1.attention_impl = "dense"`). K/V may have fewer heads than Q (n_kv_heads, grouped-query attention).
Generation keeps a RoutedCache (K/V written in place + the mean K of every completed block), so a decode step
routes over n / block summaries and reads (k + 1) blocks of K/V, never the whole cache.

Left padding (attention_mask, edgekit.spec): routing depends on absolute positions, so each row's blocks are
defined on its REAL positions. A row with o_b pads has its keys gathered into aligned coordinates inside the layer
(real position j at index j, zeros after: right padding, never eligible: only complete blocks before a query are
routed, and the own block causally), and the kernels take per-row query positions [B, 1, S]; the cache itself
stays in slot order. A padding query reads aligned position 0 (finite, ignored). The eager RoutedCache has no
padding: a padded call falls back to the plain (k, v) cache.

Sharing: layer l runs block l % unique_blocks. Gates are per layer (cheap: one C-vector each).
Selective activation: a gated layer computes its K/V and appends them to the cache outside the
condition (the cache stays valid whatever is skipped); the condition score > threshold decides only
attention + MLP. Under export that is torch.cond (ONNX If); in eager PyTorch a plain `if`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgekit.config import ModelConfig, route_k
from edgekit.models.layers import Attention, Block, CausalLM, Past, padding, relative_indices

ATTENTION = "blocks"  # default kernel of new R1 models: "blocks" (per key block, eager prefill), "gather" (per
# query: the exported kernel, and eager decode) or "dense" (the masked-dense oracle); all three give the same results
QUERY_CHUNK = 256  # eager: queries per chunk (activation memory O(chunk x H x (k + 1) x block))
TILE = 32  # the blocks kernel: most (query, head) pairs per tile of one key block (one small GEMM per tile)
GATHER_BELOW = 8  # eager: fewer new tokens (decode) use the gather kernel (the blocks kernel's setup costs more)


def routed_allowed(q: torch.Tensor, k: torch.Tensor, qpos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mask [B, H, S, K]: own block up to the query, plus the top-k routed earlier key blocks.

    The masked-dense oracle (k [B, H, K, D], one K head per query head; qpos [S], or per row [B, 1, S]).
    Ties in the routing score go to the lower block index (stable sort), the rule the gather kernel follows too."""
    b, h, n_keys, d = k.shape
    n_kb = (n_keys + block_size - 1) // block_size
    k_pad = torch.nn.functional.pad(k, (0, 0, 0, n_kb * block_size - n_keys))
    k_mean = k_pad.reshape(b, h, n_kb, block_size, d).mean(3)  # [B, H, NB, D]
    route = q @ k_mean.transpose(-1, -2)  # [B, H, S, NB]
    qblk = torch.div(qpos, block_size, rounding_mode="floor")  # [S] / [B, 1, S]
    kb = torch.arange(n_kb, device=q.device)
    eligible = kb < qblk[..., None]  # complete earlier blocks [(B, 1,) S, NB]
    route = route.masked_fill(~eligible, float("-inf"))
    rank = route.argsort(dim=-1, descending=True, stable=True).argsort(-1)  # 0 = best block
    k_per_query = torch.log2((qblk + 1).float()).floor().clamp(min=1).long()  # route_k(qblk + 1)
    selected = (rank < k_per_query[..., None]) & eligible  # [B, H, S, NB]
    kpos = torch.arange(n_keys, device=q.device)
    kblk = torch.div(kpos, block_size, rounding_mode="floor")
    local = (kblk == qblk[..., None]) & (kpos <= qpos[..., None])  # [(B, 1,) S, K]
    return selected[..., kblk] | local


def block_means(k_blocks: torch.Tensor) -> torch.Tensor:
    """Routing keys [B, Hkv, NB, D] from the zero-padded key blocks [B, Hkv, NB, block, D]: mean K of each block
    (the last one, when incomplete, is never eligible: routing only reads complete earlier blocks)."""
    return k_blocks.mean(3)


def max_route_k(cfg: ModelConfig) -> int:
    """The most routed blocks any query of a max_seq_len context selects (the exported graph's slot count, capped
    at the number of key blocks of the call: a 144-token cache of 64-token blocks gathers 3 + 1 slots, not 7 + 1)."""
    return route_k(-(-cfg.max_seq_len // cfg.block_size))


@dataclass
class KeyBlocks:
    """The keys a routed kernel reads, as blocks. k/v [R, block, D]: row (b * Hkv + hk) * stride + j is block j of
    K/V head hk of batch row b (positions past n_keys are zeros); means [B, Hkv, >= n_blocks, D] the routing keys
    (mean K of each block; only complete blocks are ever read); n_blocks = ceil(n_keys / block)."""

    k: torch.Tensor
    v: torch.Tensor
    means: torch.Tensor
    n_keys: int
    n_blocks: int
    stride: int


def key_blocks(k_all: torch.Tensor, v_all: torch.Tensor, bs: int, src: torch.Tensor | None = None) -> KeyBlocks:
    """KeyBlocks of a plain cache k_all/v_all [B, Hkv, K, D]: zero-padded to whole blocks, block means computed.

    Left padding: src [B, ceil(K / bs) * bs] is the cache slot of every aligned position (aligned_slots); the
    blocks are then gathered as whole K/V rows (one row copy per position, no zero fill): the positions past a
    row's real keys hold copies of real keys, finite and never read (only complete blocks before a query are
    routed, the own block causally), so the result equals the zero-padded align_keys + pad form exactly."""
    b, hkv, n_keys, d = k_all.shape
    n_kb = (n_keys + bs - 1) // bs
    if src is not None:
        heads = torch.arange(b * hkv, device=src.device).view(b, hkv, 1) * n_keys
        rows = (heads + src[:, None, :]).reshape(-1)  # [B * Hkv * n_kb * bs] rows of the [B * Hkv * K, D] cache
        kb = k_all.reshape(-1, d).index_select(0, rows).view(b, hkv, n_kb, bs, d)
        vb = v_all.reshape(-1, d).index_select(0, rows).view(b * hkv * n_kb, bs, d)
        return KeyBlocks(kb.view(b * hkv * n_kb, bs, d), vb, block_means(kb), n_keys, n_kb, n_kb)
    pad = n_kb * bs - n_keys
    kb = F.pad(k_all, (0, 0, 0, pad)).reshape(b, hkv, n_kb, bs, d)  # every key block
    vb = F.pad(v_all, (0, 0, 0, pad)).reshape(b * hkv * n_kb, bs, d)
    return KeyBlocks(kb.reshape(b * hkv * n_kb, bs, d), vb, block_means(kb), n_keys, n_kb, n_kb)


def aligned_slots(keep: torch.Tensor, n_keys: int, bs: int) -> torch.Tensor:
    """keep [B, K] (real positions) -> [B, ceil(K / bs) * bs]: the cache slot that aligned position j of each row
    reads (real position j sits at slot j + number of pads; past the row's real keys: clamped to the last slot)."""
    n = (n_keys + bs - 1) // bs * bs  # not -(-n // bs): the exported graph's integer Div truncates toward zero
    return (torch.arange(n, device=keep.device) + (~keep).sum(1, keepdim=True)).clamp(max=n_keys - 1)


class RoutedCache:
    """R1's KV cache for step-by-step generation (the torch session's): per layer K/V buffers written in place (no
    torch.cat copy of the whole cache per token; capacity grows by a quarter when full) and the block summary, the
    mean K of every completed block, computed once when its block completes. A decode step then routes over
    n / block summaries and reads only its (k + 1) blocks of K/V: O(n / block + k x block), not O(n).

    The summary is the same reduction over the same keys as the full forward's block means (block_means), so cached
    decoding equals a full forward. Pass it as `past` to R1.forward, which fills it and returns it as the presents;
    `as_past()` gives the plain (k, v) list. The exported graph keeps plain past/present K/V (its present is a new
    tensor anyway, so recomputing the means there costs the same order as the copy)."""

    def __init__(self, cfg: ModelConfig, batch: int, device=None, dtype=None):
        self.cfg, self.batch, self.device, self.dtype = cfg, batch, device, dtype or torch.float32
        self.length = self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.means: list[torch.Tensor] = []

    def reserve(self, n: int) -> None:
        """Room for n positions (zeros past the written ones: padding keys are masked, padding values must be finite)"""
        if n <= self.capacity:
            return
        cfg, bs = self.cfg, self.cfg.block_size
        cap = -(-(n + max(4 * bs, n // 4)) // bs) * bs
        shape = (self.batch, cfg.kv_heads, cap, cfg.head_dim)
        mshape = (self.batch, cfg.kv_heads, cap // bs, cfg.head_dim)
        for name, sh in (("k", shape), ("v", shape), ("means", mshape)):
            new = []
            for old in getattr(self, name) or [None] * cfg.n_layers:
                t = torch.zeros(sh, device=self.device, dtype=self.dtype)
                if old is not None:
                    t[:, :, :old.shape[2]] = old
                new.append(t)
            setattr(self, name, new)
        self.capacity = cap

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> KeyBlocks:
        """Store the new K/V [B, Hkv, S, D] after the `length` cached positions; summarise the blocks they complete."""
        p, s, bs = self.length, k.shape[2], self.cfg.block_size
        kbuf, vbuf = self.k[layer], self.v[layer]
        kbuf[:, :, p:p + s] = k
        vbuf[:, :, p:p + s] = v
        j0, j1 = p // bs, (p + s) // bs  # blocks j0 .. j1 - 1 are complete now
        b, hkv, cap, d = kbuf.shape
        if j1 > j0:
            self.means[layer][:, :, j0:j1] = block_means(kbuf[:, :, j0 * bs:j1 * bs].reshape(b, hkv, j1 - j0, bs, d))
        n = p + s
        return KeyBlocks(kbuf.view(b * hkv * (cap // bs), bs, d), vbuf.view(b * hkv * (cap // bs), bs, d),
                         self.means[layer], n, -(-n // bs), cap // bs)

    def keys(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def as_past(self) -> Past:
        return [self.keys(i, self.length) for i in range(self.cfg.n_layers)]


def _route(qc: torch.Tensor, kvb: KeyBlocks, qblk: torch.Tensor, km: int, expand, exporting: bool):
    """Routed slots then the own block, [B, H, C, km + 1] block indices, and which slots are used (each query keeps
    its best route_k(own block + 1) complete earlier blocks by q . block mean; ties to the lower block index)."""
    b, h, c, _ = qc.shape
    blocks = qblk.expand(b, h, -1)[..., None]  # own block [B, H, C, 1]
    valid = torch.ones_like(blocks, dtype=torch.bool)
    if km == 0:
        return blocks, valid
    k_mean = expand(kvb.means[:, :, :kvb.n_blocks])  # [B, H, NB, D]
    route = qc @ k_mean.transpose(-1, -2)  # [B, H, C, NB]
    eligible = torch.arange(kvb.n_blocks, device=qc.device) < qblk[..., None]  # [(B, 1,) C, NB]
    route = route.masked_fill(~eligible, float("-inf"))
    route = F.pad(route, (0, km), value=float("-inf"))  # at least km columns
    if exporting:  # ONNX TopK breaks ties to the lower index, as the stable sort does
        best, order = route.topk(km, dim=-1)
    else:  # torch.topk documents no tie order
        best, order = route.sort(dim=-1, descending=True, stable=True)
        best, order = best[..., :km], order[..., :km]  # [B, H, C, km]
    k_per_query = torch.log2((qblk + 1).float()).floor().clamp(min=1).long()
    chosen = (torch.arange(km, device=qc.device) < k_per_query[..., None]) & (best > float("-inf"))
    order = torch.where(chosen, order, blocks)  # unused slots point at the own block, masked
    return torch.cat([order, blocks], -1), torch.cat([chosen, valid], -1)


def _gather_chunk(attn: Attention, cfg: ModelConfig, kvb: KeyBlocks, qc, pos, gc, blocks, valid) -> torch.Tensor:
    """Per query: gather its own + routed blocks' K/V, [B, H, C, J, block, D], and attend. -> [B, H, C, D]."""
    b, h, c, d = qc.shape
    bs, hkv = cfg.block_size, attn.n_kv_heads
    heads = torch.arange(h, device=qc.device)
    head_row = (torch.arange(b, device=qc.device)[:, None] * hkv + heads[None, :] // (h // hkv)) * kvb.stride
    n_slots = blocks.shape[-1]
    rows = (head_row[:, :, None, None] + blocks).reshape(-1)
    kg = kvb.k.index_select(0, rows).view(b, h, c, n_slots, bs, d)  # [B, H, C, J, bs, D]: whole rows, memcpy
    vg = kvb.v.index_select(0, rows).view(b, h, c, n_slots, bs, d)
    kpos = blocks[..., None] * bs + torch.arange(bs, device=qc.device)  # [B, H, C, J, bs]
    dist = pos[..., None, None] - kpos  # pos [C] or per row [B, 1, C]
    allowed = valid[..., None] & (dist >= 0)  # routed blocks lie before the query; the own block causally
    local_idx, global_idx = relative_indices(dist, cfg)
    local_tab = F.pad(attn.relpos.local, (0, 1)).reshape(-1, 1)  # entry local_window = 0: beyond the window
    glob_tab = attn.relpos.glob.reshape(-1, 1)
    row = heads[:, None, None, None]
    gc = gc[..., None, None]
    # table lookups as an embedding (ONNX Gather, one index per key; indexing would export as a slower GatherND)
    bias = gc * F.embedding(row * (cfg.local_window + 1) + local_idx, local_tab).squeeze(-1) + (1 - gc) * F.embedding(
        row * cfg.n_global_buckets + global_idx, glob_tab).squeeze(-1)
    scores = (kg.reshape(b, h, c, n_slots * bs, d) @ qc.unsqueeze(-1)).squeeze(-1) * (1.0 / math.sqrt(d))
    scores = scores + bias.reshape(b, h, c, n_slots * bs)
    scores = scores.masked_fill(~allowed.reshape(b, h, c, n_slots * bs), float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return (p.unsqueeze(-2) @ vg.reshape(b, h, c, n_slots * bs, d)).squeeze(-2)  # [B, H, C, D]


def _distance_tables(attn: Attention, cfg: ModelConfig, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the local and global bias of every distance n_keys - 1 .. -(block - 1), as windows [H, n_keys,
    block]: window w holds distances n_keys - 1 - w - t, t = 0 .. block - 1, so the key block that starts
    `base` positions before a query reads window n_keys - 1 - base (a view: unfold, no copy)."""
    bs = cfg.block_size
    dist = torch.arange(n_keys - 1, -bs, -1, device=attn.relpos.local.device)  # n_keys - 1 .. -(block - 1)
    local_idx, global_idx = relative_indices(dist, cfg)  # negative distances: clamped, masked later
    local = F.pad(attn.relpos.local, (0, 1))[:, local_idx]  # [H, n_keys + bs - 1]
    glob = attn.relpos.glob[:, global_idx]
    return local.unfold(1, bs, 1), glob.unfold(1, bs, 1)


def _blocks_chunk(attn: Attention, cfg: ModelConfig, kvb: KeyBlocks, qc, pos, gc, blocks, valid,
                  tables) -> torch.Tensor:
    """Per key block (MoBA-style): the (query, head) pairs that read a key block are grouped by block into tiles
    of at most TILE pairs; each tile is one [TILE, D] x [D, block] GEMM against its block's keys (read once per
    tile, not copied per query), the softmax runs over each query's own + routed blocks, and P x V is again one
    GEMM per tile, summed back per query. -> [B, H, C, D]. Same keys, biases and mask as _gather_chunk."""
    b, h, c, d = qc.shape
    bs, hkv, n_slots = cfg.block_size, attn.n_kv_heads, blocks.shape[-1]
    dev = qc.device
    pair = valid.reshape(-1).nonzero().squeeze(1)  # used (b, h, query, slot) entries
    bhc = torch.div(pair, n_slots, rounding_mode="floor")  # (b, h, query) row
    hi = torch.div(bhc, c, rounding_mode="floor") % h
    bi = torch.div(bhc, c * h, rounding_mode="floor")
    blk = blocks.reshape(-1)[pair]
    row = (bi * hkv + torch.div(hi, h // hkv, rounding_mode="floor")) * kvb.stride + blk  # K/V block row
    row, order = row.sort(stable=True)
    pair, bhc, hi, blk = pair[order], bhc[order], hi[order], blk[order]
    rows, counts = torch.unique_consecutive(row, return_counts=True)
    n_pairs, n_seg = pair.numel(), rows.numel()
    tile = min(TILE, max(1, -(-n_pairs // n_seg)))
    tiles_per = torch.div(counts + tile - 1, tile, rounding_mode="floor")
    seg = torch.repeat_interleave(torch.arange(n_seg, device=dev), counts)
    rank = torch.arange(n_pairs, device=dev) - (counts.cumsum(0) - counts)[seg]
    t_idx = (tiles_per.cumsum(0) - tiles_per)[seg] + torch.div(rank, tile, rounding_mode="floor")
    lane = rank % tile
    tile_row = torch.repeat_interleave(rows, tiles_per)
    n_tiles = tile_row.numel()
    qt = qc.new_zeros(n_tiles, tile, d)
    qt[t_idx, lane] = qc.reshape(-1, d)[bhc]
    scores = (qt @ kvb.k.index_select(0, tile_row).transpose(1, 2))[t_idx, lane] * (1.0 / math.sqrt(d))  # [P, bs]
    base = pos.expand(b, h, c).reshape(-1)[bhc] - blk * bs  # distance to the block's first key
    w = kvb.n_keys - 1 - base
    local, glob = tables
    gp = gc.reshape(-1)[bhc][:, None]
    scores = scores + (gp * local[hi, w] + (1 - gp) * glob[hi, w])
    scores = scores.masked_fill(torch.arange(bs, device=dev)[None, :] > base[:, None], float("-inf"))  # causal
    full = scores.new_full((b * h * c * n_slots, bs), float("-inf"))
    full[pair] = scores
    prob = torch.softmax(full.view(b * h * c, n_slots * bs), dim=-1).view(-1, bs)
    pt = qc.new_zeros(n_tiles, tile, bs)
    pt[t_idx, lane] = prob[pair]
    ot = (pt @ kvb.v.index_select(0, tile_row))[t_idx, lane]  # [P, D]
    return qc.new_zeros(b * h * c, d).index_add_(0, bhc, ot).view(b, h, c, d)


def routed_attention(attn: Attention, cfg: ModelConfig, x: torch.Tensor, q: torch.Tensor, k_all, v_all,
                     qpos: torch.Tensor, chunk: int | None = None, kmax: int | None = None,
                     kernel: str = "gather", kvb: KeyBlocks | None = None,
                     src: torch.Tensor | None = None) -> torch.Tensor:
    """Routed attention, equal to the masked-dense oracle (routed_allowed + Attention.forward).

    x [B,S,C] normed input, q [B,H,S,D], k_all/v_all [B,Hkv,K,D] (or kvb, their KeyBlocks, e.g. a RoutedCache's),
    qpos [S] absolute positions (< K), or per row [B, 1, S] (left padding: keys in aligned coordinates, gathered from
    the slot-ordered k_all/v_all by src [B, ceil(K / block) * block], aligned_slots).
    Each query ranks the complete earlier key blocks by q . mean(K of block),
    keeps the best k = route_k(own block index + 1) of them (ties: lower block index), and attends to exactly those
    blocks plus its own block (causally). Queries run in chunks of `chunk`, so memory is O(chunk x (k + 1) x block),
    never O(S x K). The relative-position bias is looked up for the read keys by their true distances.

    kernel "gather": each query gathers its (kmax + 1) blocks, [B, H, C, kmax + 1, block, D] (the exported kernel:
    one chunk, min(max_route_k, key blocks) routed slots); "blocks": the pairs are grouped per key block
    (_blocks_chunk; eager only).
    kmax: a fixed number of routed slots (masked beyond each query's k); None = the exact maximum of the chunk
    (eager) or min(max_route_k, key blocks) (export).
    """
    b, h, s, d = q.shape
    bs = cfg.block_size
    kvb = kvb if kvb is not None else key_blocks(k_all, v_all, bs, src)
    g = torch.sigmoid(attn.relpos.gate(x)).transpose(1, 2)  # [B, H, S]
    exporting = _exporting()
    blocks_kernel = kernel == "blocks" and not exporting
    tables = _distance_tables(attn, cfg, kvb.n_keys) if blocks_kernel else None
    chunk = s if exporting or not chunk else chunk
    outs = []
    for c0 in [0] if exporting else range(0, s, chunk):  # export: one chunk (no shape-dependent loop)
        qc, pos, gc = (q, qpos, g) if exporting else (q[:, :, c0:c0 + chunk], qpos[..., c0:c0 + chunk],
                                                      g[:, :, c0:c0 + chunk])  # [B,H,C,D], [(B,1,)C], [B,H,C]
        qblk = torch.div(pos, bs, rounding_mode="floor")
        if kmax is not None:
            km = kmax
        elif exporting:  # the most any context routes to, but never more slots than there are key blocks
            km = torch.sym_min(max_route_k(cfg), kvb.n_blocks)
        else:  # the exact maximum over the chunk; a query in block qb has qb earlier complete blocks
            top = int(qblk.max())
            km = min(route_k(top + 1), top)
        blocks, valid = _route(qc, kvb, qblk, km, attn.expand_kv, exporting)
        if blocks_kernel:
            outs.append(_blocks_chunk(attn, cfg, kvb, qc, pos, gc, blocks, valid, tables))
        else:
            outs.append(_gather_chunk(attn, cfg, kvb, qc, pos, gc, blocks, valid))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 2)
    return attn.o(out.transpose(1, 2).reshape(b, s, -1))


class Gate(nn.Module):
    """Per-token score sigmoid(rmsnorm(h) . w + b) [B, S]. At inference one decision per row and call: the
    mean score over the row's real new tokens against the layer's threshold (decode: one token); the layer
    runs (one `If`) when any row's score exceeds it, and rows below it keep their hidden state."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(cfg.d_model))
        self.b = nn.Parameter(torch.full((), 2.0))  # untrained gates open: score ~0.88
        self.eps = cfg.norm_eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.column(h).squeeze(-1)

    def column(self, h: torch.Tensor) -> torch.Tensor:
        """The scores as a column [B, S, 1], what row_weights [B, 1, S] @ reads (a per-row mean in one MatMul)."""
        x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return torch.sigmoid(x @ self.w[:, None] + self.b)

    @staticmethod
    def row_weights(qmask: torch.Tensor | None, b: int, s: int, like: torch.Tensor) -> torch.Tensor:
        """[B, 1, S]: each row's real new tokens weighted 1 / their count, padding 0 (qmask [B, S]; None: no
        padding). weights @ column(h) is each row's mean score [B, 1, 1], computed once per call for every gated
        layer: the exported gate then costs one MatMul per layer for the mean instead of Mul + ReduceSum + Div,
        and its [B, 1, 1] decision blends rows without an Unsqueeze (bench/README.md, issue 14)."""
        w = torch.ones(b, s, dtype=like.dtype, device=like.device) if qmask is None else qmask.to(like.dtype)
        return (w / w.sum(1, keepdim=True).clamp(min=1))[:, None, :]


def _exporting() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


class R1(CausalLM):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.unique_blocks))
        self.gates = nn.ModuleDict({str(i): Gate(cfg) for i in cfg.gated_layers})
        self.attention_impl = ATTENTION  # "blocks", "gather" or "dense" (the oracle); same results
        self.query_chunk = QUERY_CHUNK
        # exported routing slots: min(max_route_k, key blocks) by default; True: always max_route_k, a constant
        # TopK k (TensorRT 8.5 / JetPack 5.1 takes k only as an initializer; exporters/tensorrt.py sets it)
        self.static_route_slots = False

    def new_cache(self, batch: int = 1, device=None, dtype=None) -> RoutedCache:
        """An empty RoutedCache (in-place K/V buffers + block summaries) to pass as `past` step after step."""
        w = self.embed.weight
        return RoutedCache(self.cfg, batch, device or w.device, dtype or w.dtype)

    def forward(self, input_ids: torch.Tensor, past: Past | None = None,
                thresholds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
        cfg = self.cfg
        b, s = input_ids.shape
        dev = input_ids.device
        past = past if past is not None else self.empty_past(b, dev)
        cache = past if isinstance(past, RoutedCache) else None
        # exported graphs always take the per-row path (no data-dependent shape of the graph); eager only when padded
        padded = attention_mask is not None and (_exporting() or not bool(attention_mask.all()))
        if cache is not None and padded:  # the RoutedCache has no padding: continue on the plain (k, v) cache
            past, cache = cache.as_past() if cache.length else self.empty_past(b, dev), None
        thresholds = thresholds if thresholds is not None else self.default_thresholds().to(dev)
        p = cache.length if cache is not None else past[0][0].shape[2]
        if cache is not None:
            cache.reserve(p + s)
        qmask = src = valid = None
        if padded:  # per row: real positions, and where each aligned key comes from
            keep, pos = padding(attention_mask, b, p + s, dev)
            qpos = pos[:, None, p:]  # [B, 1, S]; a padding query sits at 0
            qmask = keep[:, p:]
            if self.attention_impl == "dense":  # the oracle aligns with align_keys (zeros past the real keys)
                src = torch.arange(p + s, device=dev) + (~keep).sum(1, keepdim=True)  # [B, K]: aligned j <- j + o_b
                valid = src < p + s
                src = src.clamp(max=p + s - 1)
            else:  # the kernels gather whole rows into aligned blocks
                src = aligned_slots(keep, p + s, cfg.block_size)  # [B, whole blocks]
        else:
            qpos = torch.arange(s, device=dev) + p  # absolute positions (R1's cache is never truncated)
        impl = self.attention_impl
        dense = impl == "dense"
        if dense:
            dist = qpos[..., None] - torch.arange(p + s, device=dev)  # [S, K] / [B, 1, S, K]
            local_idx, global_idx = relative_indices(dist if dist.dim() == 2 else dist[:, 0], cfg)
        else:  # unused by the routed kernels (they look up the read keys' distances themselves)
            local_idx = global_idx = qpos
        kernel = "gather" if impl == "gather" or _exporting() or s < GATHER_BELOW else "blocks"  # no guard on seq

        h = self.embed(input_ids)
        weights = Gate.row_weights(qmask, b, s, h) if len(self.gates) else None  # [B, 1, S]: every gated layer
        presents, executed = [], []
        self.gate_scores: list[torch.Tensor] = []  # training: per-layer [B, S] scores for a compute penalty
        for layer in range(cfg.n_layers):
            block = self.blocks[cfg.block_of(layer)]
            x = block.attn_norm(h)
            k, v = block.attn.kv(x)
            if cache is not None:
                kvb = cache.write(layer, k, v)
                k_all, v_all = cache.keys(layer, p + s)
            else:
                pk, pv = past[layer]
                k_all, v_all = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
                presents.append((k_all, v_all))
                kvb = None

            def run(h, x, k_all, v_all, qpos, local_idx, global_idx, *align, block=block, kvb=kvb):
                src, valid = (*align, None, None)[:2]  # left padding: aligned_slots (+ the oracle's valid keys)
                q = block.attn.query(x)
                if dense:
                    if src is not None:  # each row's keys in aligned coordinates (inside the If)
                        k_all, v_all = align_keys(k_all, src, valid), align_keys(v_all, src, valid)
                    allowed = routed_allowed(q, block.attn.expand_kv(k_all), qpos, cfg.block_size)
                    return block.residual(h, x, q, k_all, v_all, allowed, local_idx, global_idx)
                h = h + routed_attention(block.attn, cfg, x, q, k_all, v_all, qpos, self.query_chunk,
                                         kmax=max_route_k(cfg) if self.static_route_slots else None,
                                         kernel=kernel, kvb=kvb, src=src)
                return h + block.mlp(block.mlp_norm(h))

            def run_rows(h, *rest, run=run):  # the rows whose own score is below the threshold keep h
                *operands, rows = rest
                return torch.where(rows, run(h, *operands), h)  # rows [B, 1, 1]

            gate = self.gates[str(layer)] if str(layer) in self.gates else None
            operands = (h, x, k_all, v_all, qpos, local_idx, global_idx, *(t for t in (src, valid) if t is not None))
            if gate is None:
                h = run(*operands)
                executed.append(torch.ones((), dtype=torch.bool, device=dev))
                continue
            if self.training:  # per-token hard gate with a straight-through gradient to the score
                score = gate(h)  # [B, S]
                hard = (score > thresholds[layer]).to(h.dtype)
                mix = (hard + score - score.detach()).unsqueeze(-1)
                h = h + mix * (run(*operands) - h)
                self.gate_scores.append(score)
                executed.append(hard.mean() > 0.5)
                continue
            row_score = weights @ gate.column(h)  # [B, 1, 1]: each row's mean over its own real new tokens
            rows = row_score > thresholds[layer]
            pred = row_score.max() > thresholds[layer]  # = rows.any(): the layer runs (one If) when any row does
            if _exporting():
                h = torch.cond(pred, run_rows, lambda h, *_: h.clone(), (*operands, rows))
            elif bool(pred):
                h = run(*operands) if bool(rows.all()) else run_rows(*operands, rows)
            executed.append(pred)
        if cache is not None:
            cache.length = p + s
            presents = cache
        return self.head(h), presents, torch.stack(executed)


def align_keys(t: torch.Tensor, src: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, K, D] in slot order -> aligned (row b's real position j at index j, zeros after): src/valid [B, K]."""
    b, hkv, n, d = t.shape
    got = t.gather(2, src[:, None, :, None].expand(b, hkv, n, d))
    return got.masked_fill(~valid[:, None, :, None], 0.0)


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
