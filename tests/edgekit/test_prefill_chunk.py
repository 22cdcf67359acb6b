"""--prefill-chunk N on generate, profile and run: the prompt goes through the KV cache at most N tokens per
call (runtimes.base.ChunkedSession) and the result is the one-call result. The logits' exactness per family and
runtime is tested in tests/runtimes/test_runtimes.py; here the option reaches the runner from each command."""

from __future__ import annotations

import json

import pytest

from runtimes.base import ChunkedSession

PROMPT = "the edge of the network, where the models run"  # 46 tokens (bytes)


@pytest.fixture
def calls(monkeypatch):
    """The length of every call the chunked sessions make into their inner session."""
    seen: list[int] = []
    step = ChunkedSession.step

    def spy(self, ids, mask=None):
        inner = self.inner.step
        self.inner.step = lambda part, *rest: seen.append(part.shape[1]) or inner(part, *rest)
        try:
            return step(self, ids, mask)
        finally:
            self.inner.step = inner

    monkeypatch.setattr(ChunkedSession, "step", spy)
    return seen


@pytest.mark.parametrize("model", ["v3-tiny", "r1-tiny"])
def test_generate_prefill_chunk_gives_the_same_tokens(cli, calls, model):
    args = ("generate", model, "--prompt", PROMPT, "--max-new-tokens", "4", "--json")
    code, out, err = cli(*args)
    assert code == 0, err
    assert calls == []  # default: no chunking
    code, chunked, err = cli(*args, "--prefill-chunk", "10")
    assert code == 0, err
    n = json.loads(chunked)
    assert n["tokens"] == json.loads(out)["tokens"] and n["skipped"] == json.loads(out)["skipped"]
    assert calls[:5] == [10, 10, 10, 10, 6] and set(calls[5:]) == {1}


def test_profile_prefill_chunk(cli, calls):
    code, out, err = cli("profile", "v3-tiny", "--prompt-len", "20", "--new-tokens", "2", "--runs", "1",
                         "--warmup", "0", "--no-energy", "--prefill-chunk", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["settings"]["prefill_chunk"] == 8
    assert calls[:3] == [8, 8, 4]


def test_run_bundle_prefill_chunk(cli, calls, tmp_path):
    from tiny_bundle import v3_tiny_bundle

    b = v3_tiny_bundle(tmp_path, "b.tar.gz")
    args = ("run", b, "--prompt", PROMPT, "--max-new-tokens", "3", "--allow-unsigned", "--json")
    code, out, err = cli(*args)
    assert code == 0, err
    code, chunked, err = cli(*args, "--prefill-chunk", "16")
    assert code == 0, err
    assert json.loads(chunked)["tokens"] == json.loads(out)["tokens"]
    assert calls[:3] == [16, 16, 14]


@pytest.mark.parametrize("command", [("generate", "v3-tiny", "--prompt", "x"), ("profile", "v3-tiny"),
                                     ("run", "nowhere", "--prompt", "x")])
def test_prefill_chunk_below_1_is_a_one_line_error(cli, command):
    code, _, err = cli(*command, "--prefill-chunk", "0")
    assert code == 1 and err.count("\n") == 1 and "--prefill-chunk must be at least 1" in err
