"""R1's routed attention kernels ("blocks": per key block, eager; "gather": per query, the exported one) against the
masked-dense oracle (routed_allowed + dense softmax), and the RoutedCache (in-place K/V + block summaries)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import edgekit.models.r1 as r1
from edgekit.checkpoint import load_checkpoint
from edgekit.config import route_k
from edgekit.models import build, preset
from edgekit.models.r1 import RoutedCache, attended_keys, attended_positions, routed_allowed, routed_attention
from edgekit.resolve import REFERENCE

KERNELS = ("gather", "blocks")


def both(model, ids, past=None, thresholds=None, chunk=64, kernel="gather"):
    """(dense oracle, routed kernel) outputs of the same model."""
    with torch.no_grad():
        model.attention_impl = "dense"
        dense = model(ids, past, thresholds)
        model.attention_impl, model.query_chunk = kernel, chunk
        routed = model(ids, past, thresholds)
    return dense, routed


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kv_heads", [0, 2, 1])
@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_routed_kernels_equal_dense_oracle_on_random_inputs(kv_heads, chunk, kernel):
    cfg = dataclasses.replace(preset("r1-tiny"), n_kv_heads=kv_heads)
    model = build(cfg, seed=3)
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(5))
    (d, dp, de), (g, gp, ge) = both(model, ids, thresholds=torch.zeros(cfg.n_layers), chunk=chunk, kernel=kernel)
    assert (d - g).abs().max().item() <= 1e-5
    assert torch.equal(de, ge) and all((a - b).abs().max() <= 1e-5 for x, y in zip(dp, gp) for a, b in zip(x, y))


@pytest.mark.parametrize("kernel", KERNELS)
def test_routed_kernels_equal_dense_oracle_with_a_cache_and_skips(kernel):
    model = build("r1-tiny", seed=4)
    n = model.cfg.n_layers
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, past, _ = model(ids[:, :133])  # a cache ending mid-block
    for thr in (torch.zeros(n), torch.tensor([2.0 * (i % 2) for i in range(n)])):
        (d, _, de), (g, _, ge) = both(model, ids[:, 133:], past, thr, chunk=5, kernel=kernel)
        assert torch.equal(de, ge) and (d - g).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_routed_kernels_equal_dense_oracle_on_left_padded_rows(kernel):
    """Padded rows: the kernels gather each row's keys as whole cache rows into aligned blocks (aligned_slots; the
    positions past a row's real keys hold copies of real keys), the oracle aligns with zeros (align_keys): equal."""
    model = build(dataclasses.replace(preset("r1-tiny"), n_kv_heads=2), seed=8)
    n = model.cfg.n_layers
    ids = torch.randint(0, 256, (3, 70), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(3, 70, dtype=torch.long)
    mask[1, :13], mask[2, :37] = 0, 0  # 0 / 13 / 37 pads: rows end in different blocks (block 16)
    with torch.no_grad():
        _, past, _ = model(ids[:, :61], attention_mask=mask[:, :61])  # a padded cache ending mid-block
        outs = {}
        for impl in ("dense", kernel):
            model.attention_impl, model.query_chunk = impl, 5
            outs[impl] = model(ids[:, 61:], past, torch.zeros(n), attention_mask=mask)
    (d, dp, de), (g, gp, ge) = outs["dense"], outs[kernel]
    assert torch.equal(de, ge) and (d - g).abs().max().item() <= 1e-5
    assert all((a - b).abs().max() <= 1e-5 for x, y in zip(dp, gp) for a, b in zip(x, y))  # still in slot order


@pytest.mark.parametrize("kernel", KERNELS)
def test_routed_kernels_equal_dense_oracle_on_the_trained_reference(kernel):
    model = load_checkpoint(REFERENCE["r1-ref"])
    ids = torch.randint(0, 256, (2, model.cfg.max_seq_len), generator=torch.Generator().manual_seed(7))
    (d, _, de), (g, _, ge) = both(model, ids, chunk=16, kernel=kernel)
    assert torch.equal(de, ge)
    # fp32: the logits are O(15), so both kernels carry ~1e-6 relative rounding (the oracle is 2e-5 from fp64 itself)
    assert (d - g).abs().max().item() <= 1e-5 * max(1.0, d.abs().max().item())
    model.double()  # in fp64 the kernels agree to rounding: the same keys, weights and biases
    (d, _, _), (g, _, _) = both(model, ids, chunk=16, kernel=kernel)
    assert (d - g).abs().max().item() <= 1e-10


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("routed_cache", [False, True])
def test_cached_decoding_equals_full_forward_across_block_boundaries(kernel, routed_cache, monkeypatch):
    monkeypatch.setattr(r1, "GATHER_BELOW", 0 if kernel == "blocks" else 8)  # decode steps through `kernel` too
    cfg = dataclasses.replace(preset("r1-tiny"), n_kv_heads=2)
    model = build(cfg, seed=8)
    model.attention_impl = kernel
    ids = torch.randint(0, 256, (1, 70), generator=torch.Generator().manual_seed(9))
    thr = torch.zeros(cfg.n_layers)
    with torch.no_grad():
        full, _, _ = model(ids, None, thr)
        out, past, _ = model(ids[:, :15], model.new_cache(1) if routed_cache else None, thr)
        steps = [out]
        for t in range(15, 70):
            out, past, _ = model(ids[:, t:t + 1], past, thr)
            steps.append(out)
    past = past.as_past() if routed_cache else past
    assert past[0][0].shape[1] == 2 and past[0][0].shape[2] == 70  # the cache holds the K/V heads only
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


def test_routed_cache_writes_in_place_and_summarises_each_block_once(monkeypatch):
    """A decode step neither copies the cache nor re-reads it for routing: it writes its K/V into the buffer and
    averages only the block it completes; the summaries are block_means of the cached keys, bit for bit."""
    cfg = preset("r1-tiny")  # block 16
    model = build(cfg, seed=13)
    ids = torch.randint(0, 256, (1, 120), generator=torch.Generator().manual_seed(14))
    summarised = []
    real = r1.block_means
    monkeypatch.setattr(r1, "block_means", lambda kb: summarised.append(kb.shape[2]) or real(kb))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids[:, :40], cache)  # prefill: blocks 0 and 1 complete (one summary call per layer)
        assert cache.length == 40 and summarised == [2] * cfg.n_layers
        buffers = [t.data_ptr() for t in cache.k + cache.v]
        summarised.clear()
        for t in range(40, 100):
            model(ids[:, t:t + 1], cache)
    # blocks 2..5 complete at positions 47, 63, 79, 95: one block per layer each time, nothing else averaged
    assert summarised == [1] * (4 * cfg.n_layers)
    assert [t.data_ptr() for t in cache.k + cache.v] == buffers  # no reallocation, no torch.cat
    for layer in range(cfg.n_layers):
        k, _ = cache.keys(layer, 96)
        assert torch.equal(cache.means[layer][:, :, :6], real(k.reshape(1, cfg.kv_heads, 6, 16, cfg.head_dim)))
    with torch.no_grad():  # growing past the capacity keeps the contents
        before = [t[:, :, :100].clone() for t in cache.k]
        model(ids[:, 100:120].repeat(1, 10)[:, :cache.capacity], cache)
    assert all(torch.equal(b, t[:, :, :100]) for b, t in zip(before, cache.k))


def test_torch_session_keeps_r1_in_a_routed_cache():
    from runtimes import open_runner

    with open_runner("r1-tiny", "torch") as runner:
        sess = runner.session(1, thresholds=0.0)
        sess.step([[1, 2, 3]])
        sess.step([[4]])
        assert isinstance(sess.past, RoutedCache) and sess.past.length == 4 == sess.length


def test_gather_kernel_with_fixed_max_k_equals_exact_k():
    """The exported graph uses a fixed number of routed slots (max_route_k), masked beyond each query's k."""
    cfg = preset("r1-tiny")
    model = build(cfg, seed=10)
    attn = model.blocks[0].attn
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 100, cfg.d_model, generator=g)
    q = attn.query(x)
    k, v = attn.kv(x)
    pos = torch.arange(100)
    with torch.no_grad():
        exact = routed_attention(attn, cfg, x, q, k, v, pos, chunk=9)
        fixed = routed_attention(attn, cfg, x, q, k, v, pos, chunk=100, kmax=6)
    assert (exact - fixed).abs().max().item() <= 1e-6


def test_routing_ties_go_to_the_lower_block_in_both_kernels():
    cfg = dataclasses.replace(preset("r1-tiny"), n_layers=2, gated_layers=[], n_unique_blocks=0)
    model = build(cfg, seed=12)
    # a repeated 16-token block: identical keys in layer 0, so every routed choice is a tie
    ids = torch.randint(0, 256, (1, 16)).repeat(1, 9)
    with torch.no_grad():
        x = model.blocks[0].attn_norm(model.embed(ids))
        k = model.blocks[0].attn.kv(x)[0]
        q = model.blocks[0].attn.query(x)
    allowed = routed_allowed(q, k, torch.arange(144), 16)[0, 0]
    last = 143  # block 8: k = 3 of 8 tied blocks -> blocks 0, 1, 2
    assert allowed[last, :48].all() and not allowed[last, 48:128].any()
    for kernel in KERNELS:
        (d, _, _), (routed, _, _) = both(model, ids, kernel=kernel)
        assert (d - routed).abs().max().item() <= 1e-5


def test_attended_keys_match_the_oracle_mask_and_grow_n_log_n():
    cfg = preset("r1-tiny")
    for n in (16, 100, 257):
        assert attended_keys(cfg, n) == attended_positions(cfg, n)
    assert route_k(9) == 3
    big = preset("r1-mini")
    a, b = attended_keys(big, 1024), attended_keys(big, 4096)
    assert b / a < 7  # ~4 x log(64) / log(16): n log n, far below the dense 16x
