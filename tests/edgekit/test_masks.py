"""Left-padded batches are exact per row (edgekit.spec's attention_mask): for V3, R1 with gates that some rows
run and others skip, a Hugging Face model and a gated one, through the exported graph in ONNX Runtime and
through the torch runtime, each row of a left-padded batch decodes exactly the tokens that request decodes
alone; also when a row joins with a left-padded past. The same batch without its mask differs (the tests
would fail if masking were wrong)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit import api
from edgekit.errors import EdgekitError
from edgekit.resolve import Resolved, resolve
from edgekit.spec import MASK
from runtimes.onnxruntime import OnnxRuntimeRunner
from runtimes.torch import TorchRunner

LENGTHS = [3, 21, 40]  # R1 tiny: block 16, so rows differ in how many routing blocks their prompt fills
STEPS = 5
R1_THRESHOLD = 0.5  # with the gates below, rows differ in which layers they run (asserted)
HF_THRESHOLD = 1.0


def _r1_gated(root: Path) -> Path:
    """r1-tiny with gates whose scores vary by input (the preset's untrained gates score ~0.88 for every token)."""
    from edgekit.checkpoint import save_checkpoint
    from edgekit.models import build

    model = build("r1-tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for gate in model.gates.values():
            gate.w.copy_(torch.randn(gate.w.shape, generator=g))
            gate.b.zero_()
    d = root / "r1-gated"
    d.mkdir()
    save_checkpoint(model, d)
    return d


def _hf(root: Path, gated: bool) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_tiny import save_model, write_tokenizer
    from safetensors.torch import save_file

    from edgekit.hfconfig import FORMAT, GATES_FILE, STATS_FILE

    d = root / ("qwen2-gated" if gated else "qwen2")
    save_model(d, "qwen2")
    write_tokenizer(d)
    if gated:  # skip gates as calibrate-skip writes them, with weights that make rows decide differently
        g = torch.Generator().manual_seed(0)
        save_file({f"layers.{i}.{n}": (torch.randn(64, generator=g) * 0.3 if n == "w" else torch.zeros(()))
                   for i in (0, 1) for n in ("w", "b")}, str(d / GATES_FILE), metadata={"format": FORMAT})
        (d / STATS_FILE).write_text(json.dumps({"format": FORMAT, "gated_layers": [0, 1],
                                                "default_threshold": HF_THRESHOLD}))
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory, onnx_v3_tiny):
    """family -> (torch target, ONNX artifact, thresholds); each exported (and validated, padded cases included)
    once per module."""
    root = tmp_path_factory.mktemp("masks")
    out = {"v3": ("v3-tiny", onnx_v3_tiny, None)}
    for fam, make, thr in (("r1", _r1_gated, R1_THRESHOLD), ("hf", lambda r: _hf(r, False), None),
                           ("hf-gated", lambda r: _hf(r, True), HF_THRESHOLD)):
        src = make(root)
        art = root / f"{fam}-onnx"
        api.export(src, "onnx", art)
        out[fam] = (src, art, thr)
    return out


def _runner(models, family: str, runtime: str):
    src, art, thr = models[family]
    if runtime == "torch":
        return TorchRunner(resolve(src)), thr
    return OnnxRuntimeRunner(resolve(art), iobinding=runtime == "onnx-iobinding"), thr  # the cache in OrtValues


def _prompts(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 200, n) for n in LENGTHS]


def _left_pad(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    return ids, mask


def _decode(runner, rows, thr, masked: bool = True):
    """Greedy decode of a left-padded batch through the runner's session: tokens [B, STEPS], first logits [B, V],
    executed per step [STEPS, L] (gated)."""
    ids, mask = _left_pad(rows)
    sess = runner.session(len(rows), thr)
    tokens, executed, first = [], [], None
    tok, m = ids, (mask if masked else None)
    for _ in range(STEPS):
        logits, ex = sess.step(tok, m)
        first = logits if first is None else first
        tok, m = logits.argmax(-1)[:, None], None
        tokens.append(tok[:, 0])
        executed.append(ex)
    return np.stack(tokens, 1), first, executed


@pytest.mark.parametrize("runtime", ["onnx", "onnx-iobinding", "torch"])
@pytest.mark.parametrize("family", ["v3", "r1", "hf", "hf-gated"])
def test_left_padded_batch_decodes_every_row_as_alone(models, family, runtime):
    runner, thr = _runner(models, family, runtime)
    prompts = _prompts()
    with runner:
        alone = [_decode(runner, [p], thr) for p in prompts]
        tokens, first, executed = _decode(runner, prompts, thr)
        for b, (want, want_logits, _) in enumerate(alone):
            assert tokens[b].tolist() == want[0].tolist(), f"row {b}"
            np.testing.assert_allclose(first[b], want_logits[0], atol=2e-4 * max(1.0, np.abs(want_logits).max()))
        if thr is not None:  # per-row gates: the If runs when any row needs the layer, rows keep their own result
            per_row = np.stack([np.stack(a[2]) for a in alone])  # [B, STEPS, L]
            assert (per_row.any(0) != per_row.all(0)).any(), "the rows should differ in which layers they run"
            assert np.array_equal(np.stack(executed), per_row.any(0))
        # the same batch without its mask: the padded rows see the padding and differ
        _, unmasked, _ = _decode(runner, prompts, thr, masked=False)
        scale = max(1.0, np.abs(first).max())
        assert np.abs(unmasked[2] - first[2]).max() < 1e-3 * scale  # the longest row has no padding
        assert min(np.abs(unmasked[b] - first[b]).max() for b in (0, 1)) > 1e-2 * scale


def _prefill(runner, prompt, thr) -> dict[str, np.ndarray]:
    spec = runner.spec
    feeds = spec.dummy(1, len(prompt), 0, thresholds=thr)
    feeds["input_ids"] = prompt[None]
    out = runner.infer(feeds)
    return {p: out[q] for p, q in zip(spec.past_names(), spec.present_names())}, int(out["logits"][0, -1].argmax())


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
@pytest.mark.parametrize("family", ["v3", "r1", "hf", "hf-gated"])
def test_a_row_joins_with_a_left_padded_past(models, family, runtime):
    """Continuous batching through runner.infer with numpy caches: two requests prefilled alone, their caches
    left-padded with zeros to a common length, then decoded together, each exactly as alone."""
    runner, thr = _runner(models, family, runtime)
    spec = runner.spec
    prompts = _prompts(1)[1:]  # 21 and 40 tokens
    with runner:
        alone = []
        for p in prompts:
            cache, tok = _prefill(runner, p, thr)
            seq = [tok]
            for _ in range(STEPS - 1):
                feeds = {**spec.dummy(1, 1, 0, thresholds=thr), **cache, "input_ids": np.array([[seq[-1]]])}
                out = runner.infer({n: v for n, v in feeds.items() if n != MASK})  # no mask: all real
                cache = {q: out[r] for q, r in zip(spec.past_names(), spec.present_names())}
                seq.append(int(out["logits"][0, -1].argmax()))
            alone.append(seq)
        caches, toks = zip(*(_prefill(runner, p, thr) for p in prompts))
        width = max(len(p) for p in prompts)
        past = {n: np.concatenate([np.pad(c[n], ((0, 0), (0, 0), (width - c[n].shape[2], 0), (0, 0)))
                                   for c in caches]) for n in spec.past_names()}
        mask = np.stack([np.r_[np.zeros(width - len(p)), np.ones(len(p))] for p in prompts]).astype(np.int64)
        tok = np.array(toks)[:, None]
        got = [tok[:, 0]]
        for _ in range(STEPS - 1):
            mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], 1)
            feeds = {**spec.dummy(2, 1, 0, thresholds=thr), **past, "input_ids": tok, MASK: mask}
            out = runner.infer(feeds)
            past = {q: out[r] for q, r in zip(spec.past_names(), spec.present_names())}
            tok = out["logits"][:, -1].argmax(-1)[:, None]
            got.append(tok[:, 0])
        assert np.stack(got, 1).tolist() == alone


def test_r1_kernels_agree_on_a_padded_batch():
    """blocks / gather / dense (the oracle) on per-row positions: the same logits, and each row's equal alone."""
    from edgekit.models import build

    model = build("r1-tiny")
    rows = _prompts(2)
    ids, mask = (torch.from_numpy(a) for a in _left_pad(rows))
    out = {}
    with torch.no_grad():
        for impl in ("blocks", "gather", "dense"):
            model.attention_impl = impl
            out[impl] = model(ids, attention_mask=mask)[0]
        for b, r in enumerate(rows):
            alone = model(torch.from_numpy(r)[None])[0][0]
            torch.testing.assert_close(out["dense"][b, -len(r):], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["blocks"], out["dense"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out["gather"], out["dense"], atol=1e-4, rtol=1e-4)


def test_v3_segment_memory_stays_exact_with_padding():
    """A short memory (12): decoding runs past it; the kept window holds each row's last real tokens (and padding,
    masked), and the mask is cut like the cache: every row decodes as alone."""
    import dataclasses

    from edgekit.config import preset
    from edgekit.models import build

    model = build(dataclasses.replace(preset("v3-tiny"), memory_len=12))
    rows = [r[:n] for r, n in zip(_prompts(3), (3, 10, 20))]

    def decode(batch_rows):
        ids, mask = (torch.from_numpy(a) for a in _left_pad(batch_rows))
        past, out = None, []
        with torch.no_grad():
            for _ in range(8):
                logits, past, _ = model(ids, past, attention_mask=mask)
                ids = logits[:, -1].argmax(-1)[:, None]
                out.append(ids[:, 0])
                kept = past[0][0].shape[2]
                mask = torch.cat([mask[:, mask.shape[1] - kept:], torch.ones(len(batch_rows), 1, dtype=torch.long)], 1)
        return torch.stack(out, 1)

    batched = decode(rows)
    for b, r in enumerate(rows):
        assert batched[b].tolist() == decode([r])[0].tolist()


def _without_mask_input(art: Path, dest: Path) -> Path:
    """An artifact as exported before attention masks: the graph computes an all-ones mask itself."""
    import onnx
    from onnx import TensorProto, helper

    shutil.copytree(art, dest)
    model = onnx.load(str(dest / "model.onnx"), load_external_data=False)
    g = model.graph
    keep = [i for i in g.input if i.name != MASK]
    del g.input[:]
    g.input.extend(keep)
    one = helper.make_tensor("one_i64", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
             helper.make_node("Shape", ["past.0.key"], ["past_len"], start=2, end=3),
             helper.make_node("Shape", ["input_ids"], ["batch"], start=0, end=1),
             helper.make_node("Shape", ["input_ids"], ["seq"], start=1, end=2),
             helper.make_node("Add", ["past_len", "seq"], ["total"]),
             helper.make_node("Concat", ["batch", "total"], ["mask_shape"], axis=0),
             helper.make_node("ConstantOfShape", ["mask_shape"], [MASK], value=one)]
    g.node.insert(0, nodes[-1])
    for n in reversed(nodes[:-1]):
        g.node.insert(0, n)
    onnx.save_model(model, str(dest / "model.onnx"))
    return dest


def test_an_artifact_without_the_mask_input_runs_unpadded_and_refuses_padding(onnx_v3_tiny, tmp_path):
    new = resolve(onnx_v3_tiny)
    old = Resolved("onnx", "v3-tiny", new.cfg, _without_mask_input(onnx_v3_tiny, tmp_path / "old"), new.manifest)
    prompts = _prompts()
    with OnnxRuntimeRunner(old) as r_old, OnnxRuntimeRunner(new) as r_new:
        assert not r_old.has_mask and r_new.has_mask
        tok_old, logits_old, _ = _decode(r_old, prompts[1:2], None)
        tok_new, logits_new, _ = _decode(r_new, prompts[1:2], None)
        assert tok_old.tolist() == tok_new.tolist()
        np.testing.assert_allclose(logits_old, logits_new, atol=1e-5)
        with pytest.raises(EdgekitError, match="export it again"):
            _decode(r_old, prompts, None)


def test_a_bad_mask_is_a_one_line_error():
    with TorchRunner(resolve("v3-tiny")) as r:
        feeds = r.spec.dummy(2, 3, 4)
        for bad, why in ((np.ones((2, 6), np.int64), "past \\+ seq"), (np.array([[1] * 7, [1, 0] + [1] * 5]), "left"),
                         (np.full((2, 7), 2), "0/1")):
            with pytest.raises(EdgekitError, match=why):
                r.infer({**feeds, MASK: bad})
