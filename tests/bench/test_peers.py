"""bench/peers.py's torch.ao peer on the tiny presets (no export, no timing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "bench" / "peers.py")
peers = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = peers
spec.loader.exec_module(peers)


@pytest.mark.parametrize("name", ["v3-tiny", "r1-tiny"])
def test_nn_linear_swap_is_exact_and_quantize_dynamic_needs_it(name):
    from edgekit.models import build
    from edgekit.resolve import Resolved, resolve
    from runtimes.torch import TorchRunner

    model = build(name)
    swapped, n = peers.to_nn_linear(model)
    assert n == sum(isinstance(m, torch.nn.Linear) for m in swapped.modules()) > 0
    ids = torch.randint(0, 256, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(swapped(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-5)
    if name.startswith("r1"):  # shared blocks stay shared: no more unique weights than before
        assert sum(p.numel() for p in swapped.parameters()) == sum(p.numel() for p in model.parameters())

    q, info = peers.quantize_dynamic_peer(model)
    assert info["quantized_modules_on_edgekit_model_as_is"] == 0  # edgekit's x @ W Linear is not nn.Linear
    assert info["quantized_modules_after_swap"] == len(model.blocks) * 8 + 1  # 7 per block + relpos gate + head
    res = resolve(name)
    feeds = peers.probe_feeds(__import__("edgekit.spec").spec.DecoderSpec(res.cfg))
    with TorchRunner(Resolved(res.kind, name, res.cfg, model=model)) as a, \
            TorchRunner(Resolved(res.kind, name, res.cfg, model=q)) as b:
        cos = peers.logits_cosine(b.infer(feeds)["logits"], a.infer(feeds)["logits"])
        assert cos > 0.98
        step = b.stepper()
        logits, _ = step([1, 2, 3])
        assert np.isfinite(logits).all()
