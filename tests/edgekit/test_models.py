"""The V3 and R1 families: cache equivalence, gates, sparsity, parameter counts, checkpoints, CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from edgekit.checkpoint import load_checkpoint, save_checkpoint
from edgekit.errors import EdgekitError
from edgekit.models import build, param_counts, preset
from edgekit.models.r1 import attended_positions
from edgekit.models.v3 import dense_allowed


def incremental(model, ids, thresholds=None, chunk=5):
    """Prefill `chunk` tokens, then decode one token at a time with the cache."""
    past, logits = None, []
    out, past, _ = model(ids[:, :chunk], past, thresholds)
    logits.append(out)
    for t in range(chunk, ids.shape[1]):
        out, past, _ = model(ids[:, t:t + 1], past, thresholds)
        logits.append(out)
    return torch.cat(logits, 1), past


@pytest.mark.parametrize("name", ["v3-tiny", "r1-tiny"])
def test_cached_decoding_equals_full_forward(name):
    model = build(name)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _, _ = model(ids)
        inc, _ = incremental(model, ids)
    assert (full - inc).abs().max().item() <= 1e-5


def test_v3_segment_memory_truncates_cache_and_still_matches():
    cfg = dataclasses.replace(preset("v3-tiny"), memory_len=8)
    model = build(cfg)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full, _, _ = model(ids)
        inc, past = incremental(model, ids, chunk=3)
    assert past[0][0].shape[2] == 8  # the cache keeps memory_len positions
    assert (full - inc).abs().max().item() <= 1e-5
    # and the memory is real: with a longer memory the logits differ
    with torch.no_grad():
        longer, _, _ = build(dataclasses.replace(cfg, memory_len=64))(ids)
    assert (longer - full).abs().max().item() > 1e-3


@pytest.mark.parametrize("pattern", ["all", "none", "alternate"])
def test_r1_cached_decoding_with_skipped_layers(pattern):
    model = build("r1-tiny")
    n = model.cfg.n_layers
    thr = {"all": torch.zeros(n), "none": torch.full((n,), 2.0),
           "alternate": torch.tensor([2.0 * (i % 2) for i in range(n)])}[pattern]
    ids = torch.randint(0, 256, (1, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _, executed = model(ids, None, thr)
        inc, _ = incremental(model, ids, thr)
    assert (full - inc).abs().max().item() <= 1e-5
    gated = set(model.cfg.gated_layers)
    expect = [i not in gated or thr[i].item() < 1 for i in range(n)]
    assert executed.tolist() == expect


def test_r1_open_gates_equal_a_model_without_gates():
    model = build("r1-tiny")
    ungated = build(dataclasses.replace(model.cfg, gated_layers=[]))
    ungated.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("gates.")})
    ids = torch.randint(0, 256, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        gated_out, _, executed = model(ids, None, torch.full((model.cfg.n_layers,), -1.0))
        ref, _, _ = ungated(ids)
    assert executed.all()
    assert torch.equal(gated_out, ref)


def test_r1_closed_gates_skip_every_gated_layer_and_report_it():
    from edgekit import api

    model = build("r1-tiny")
    n, gated = model.cfg.n_layers, model.cfg.gated_layers
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        closed, _, executed = model(ids, None, torch.full((n,), 2.0))
        opened, _, _ = model(ids, None, torch.zeros(n))
    assert executed.tolist() == [i not in gated for i in range(n)]
    assert (closed - opened).abs().max().item() > 1e-4  # skipping changes the result
    r = api.generate("r1-tiny", "hi", max_new_tokens=5, threshold=2.0)
    assert r["layer_slots"] == 5 * len(gated) and r["skipped"] == 5 * len(gated)  # counted over gated layers
    r = api.generate("r1-tiny", "hi", max_new_tokens=5, threshold=0.0)
    assert r["skipped"] == 0


def test_r1_gate_scores_decide_against_threshold():
    model = build("r1-tiny")
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        model.train()
        model(ids)
        scores = [s.mean().item() for s in model.gate_scores]
        model.eval()
        mid = sorted(scores)[0] + 1e-6  # between the lowest score and the others
        _, _, executed = model(ids, None, torch.full((model.cfg.n_layers,), mid))
    gated = model.cfg.gated_layers
    assert [executed[g].item() for g in gated] == [s > mid for s in scores]


def test_r1_attended_positions_grow_n_log_n_and_v3_n_squared():
    cfg = preset("r1-tiny")
    counts = {n: attended_positions(cfg, n) for n in (256, 1024, 4096)}
    per_nlogn = [counts[n] / (n * math.log2(n)) for n in counts]
    assert max(per_nlogn) / min(per_nlogn) < 1.6  # ~constant: O(n log n)
    # growth exponent between sizes: ~1.2 for n log(n / block), 2 for dense
    for a, b in ((256, 1024), (1024, 4096)):
        assert math.log(counts[b] / counts[a]) / math.log(b / a) < 1.35
    # V3 (memory covering the sequence) reads every earlier position: n(n+1)/2
    for n in (256, 1024):
        d = torch.arange(n)[:, None] - torch.arange(n)[None, :]
        assert int(dense_allowed(d, 0).sum()) == n * (n + 1) // 2
    assert counts[4096] < 0.1 * 4096 * 4097 / 2


def test_r1_routing_picks_log2_blocks():
    cfg = preset("r1-tiny")
    from edgekit.models.r1 import routed_allowed

    n, bs = 16 * 9, cfg.block_size
    q, k = torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8)
    allowed = routed_allowed(q, k, torch.arange(n), bs)[0, 0]
    last = n - 1  # block 8: 8 earlier blocks, k = floor(log2(9)) = 3
    assert int(allowed[last].sum()) == 16 + 3 * 16
    assert not allowed[5, 6:].any()  # never the future


@pytest.mark.parametrize("name,target,key", [("v3-13b", 13.0e9, "total"), ("r1-8.5b", 8.5e9, "unique")])
def test_full_size_parameter_counts_on_meta(name, target, key):
    model = build(name, device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    assert abs(param_counts(model)[key] / target - 1) <= 0.03


def test_r1_shares_blocks():
    model = build("r1-tiny")
    counts = param_counts(model)
    assert len(model.blocks) == model.cfg.unique_blocks < model.cfg.n_layers
    assert counts["total"] > counts["unique"]


def test_checkpoint_round_trip_is_identical(tmp_path):
    model = build("r1-tiny", seed=7)
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], loaded(ids)[0])


def test_corrupt_checkpoints_fail_cleanly(tmp_path):
    save_checkpoint(build("v3-tiny"), tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgekitError, match="corrupt or truncated"):
        load_checkpoint(tmp_path)
    weights.unlink()
    with pytest.raises(EdgekitError, match="no model.safetensors"):
        load_checkpoint(tmp_path)
    weights.write_bytes(data)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"d_ff": 100}))
    with pytest.raises(EdgekitError, match="has shape .* config.json implies"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(EdgekitError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_sampling_is_seeded_and_greedy_is_deterministic():
    from edgekit import api

    a = api.generate("v3-tiny", "abc", max_new_tokens=6, temperature=1.0, top_k=20, seed=3)
    b = api.generate("v3-tiny", "abc", max_new_tokens=6, temperature=1.0, top_k=20, seed=3)
    c = api.generate("v3-tiny", "abc", max_new_tokens=6, temperature=1.0, top_k=20, seed=4)
    assert a["tokens"] == b["tokens"] and a["tokens"] != c["tokens"]
    g = api.generate("v3-tiny", "abc", max_new_tokens=6)
    model = build("v3-tiny")
    ids = torch.tensor([[256, *b"abc"]])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, model(ids)[0][:, -1:].argmax(-1)], 1)
    assert g["tokens"] == ids[0, 4:].tolist()


def test_cli_models_info_generate(cli):
    code, out, _ = cli("models", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and {"v3-tiny", "r1-tiny", "v3-mini", "r1-mini", "v3-13b", "r1-8.5b"} <= set(rows)
    assert rows["r1-8.5b"]["params_total"] > rows["r1-8.5b"]["params_unique"]
    code, out, _ = cli("info", "r1-tiny", "--json")
    assert code == 0 and json.loads(out)["config"]["family"] == "r1"
    code, out, _ = cli("generate", "r1-tiny", "--prompt", "hello", "--max-new-tokens", "3", "--threshold", "2")
    assert code == 0 and "skipped 6 of 6 gated-layer executions" in out  # 2 gated layers x 3 calls, all skipped


def test_cli_unknown_model_names_nearest_match(cli):
    code, out, err = cli("info", "r1-tiyn")
    assert code == 1
    assert err.count("\n") == 1 and "unknown model 'r1-tiyn'" in err and "did you mean 'r1-tiny'" in err
    assert "Traceback" not in err
    code, _, err = cli("generate", "v3-tiny", "--prompt", "x", "--threshold", "0.3")
    assert code == 1 and "applies to gated models" in err
