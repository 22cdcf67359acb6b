"""The one runner lifecycle every engine shares (STYLE.md, Polygraphy):

    activate (the expensive part: load, build a session/engine) -> infer ... -> deactivate

The base class does the state and input checks; an engine fills in the *_impl methods. Feeds and
outputs are numpy arrays named as in edgekit.spec.DecoderSpec, so any two runners can be compared
on identical seeded inputs.

On top of `infer` every runner offers the same three generation entry points:

    session(batch, thresholds) -> Session   prefill (first `step`) then one decode step per call,
                                            with the runner's own KV cache
    stepper(thresholds)        -> Step      the `edgekit.generation` interface (one sequence)
    generate(prompt, n, ...)   -> Generated greedy / sampled generation

The base Session keeps the cache as numpy arrays and calls `infer` (works for every engine); an engine
may override `session_impl` to keep the cache on its device (torch does, so that a CUDA run does not
copy the whole cache to the host and back for every token).

Chunked prefill (runner option `prefill_chunk`, `--prefill-chunk N`): a step of more than N tokens is fed
through the KV cache in pieces of at most N, so a prefill's activations (hidden states, score tensors,
logits) are bounded by N tokens, not the prompt. The logits equal one call's (the cache makes each piece
see exactly the keys it would have seen; a step's mask is cut into the same pieces); a gated model decides
its gates once per call, so a chunked R1 prefill decides them per piece (a layer counts as executed when any
piece ran it). None: one call.
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.generation import Generated, Step
from edgekit.generation import generate as run_generation
from edgekit.resolve import Resolved
from edgekit.spec import MASK, DecoderSpec, check_mask, left_padding_mask


class Session:
    """A KV-cache loop over `runner.infer`: step(ids [B, S], mask [B, S] | None) -> (last-position logits [B, V],
    executed [L] | None).

    The first call is the prefill (S = prompt length), later calls decode (S = 1 usually). `length`
    is the number of positions in the cache. `mask` marks the new tokens (1 real, 0 left padding, edgekit.spec;
    None: all real); the session keeps the mask of its cache and feeds attention_mask = [kept, mask].
    """

    def __init__(self, runner: Runner, batch: int, thresholds=None):
        self.runner, self.batch = runner, batch
        self.cache = runner.spec.dummy(batch, 1, 0, thresholds=thresholds)
        del self.cache["input_ids"], self.cache[MASK]
        self.length = 0
        self.mask = np.ones((batch, 0), np.int64)  # the cache's positions: 1 real, 0 padding

    def extend_mask(self, ids: np.ndarray, mask) -> np.ndarray:
        """attention_mask for this step: the kept mask then the new tokens' (checked: left padding only)."""
        new = np.ones(ids.shape, np.int64) if mask is None else np.asarray(mask)
        if new.shape != ids.shape:
            raise EdgekitError(f"session step: the mask must have the shape of ids {ids.shape}, got {new.shape}")
        return check_mask(np.concatenate([self.mask, new.astype(np.int64)], 1), self.batch,
                          self.mask.shape[1] + ids.shape[1])

    def keep_mask(self, full: np.ndarray, cached: int) -> None:
        """After a step: the mask of the `cached` positions the cache holds now (V3's memory keeps the last ones)."""
        self.mask = full[:, full.shape[1] - cached:]

    def check(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != self.batch or ids.shape[1] < 1:
            raise EdgekitError(f"session step: ids must be [batch={self.batch}, seq>=1], got shape {ids.shape}")
        return ids

    def step(self, ids, mask=None) -> tuple[np.ndarray, np.ndarray | None]:
        ids = self.check(ids)
        full = self.extend_mask(ids, mask)
        out = self.runner.infer({**self.cache, "input_ids": ids, MASK: full})
        for past, present in zip(self.runner.spec.past_names(), self.runner.spec.present_names()):
            self.cache[past] = out[present]
        self.keep_mask(full, self.cache[self.runner.spec.past_names()[0]].shape[2])
        self.length += ids.shape[1]
        executed = out.get("executed")
        return out["logits"][:, -1], None if executed is None else np.asarray(executed).reshape(-1)


class ChunkedSession:
    """A session whose long steps (the prefill) go through the cache `chunk` tokens at a time."""

    def __init__(self, inner: Session, chunk: int):
        self.inner, self.chunk = inner, chunk

    def __getattr__(self, name):  # length, batch, cache ... are the inner session's
        return getattr(self.inner, name)

    def step(self, ids, mask=None) -> tuple[np.ndarray, np.ndarray | None]:
        ids = self.inner.check(ids)
        if ids.shape[1] <= self.chunk:
            return self.inner.step(ids, mask)
        ran = None
        for start in range(0, ids.shape[1], self.chunk):
            piece = None if mask is None else np.asarray(mask)[:, start:start + self.chunk]
            logits, executed = self.inner.step(ids[:, start:start + self.chunk], piece)
            if executed is not None:
                executed = np.asarray(executed).astype(bool)
                ran = executed if ran is None else ran | executed
        return logits, ran


def check_prefill_chunk(chunk) -> int | None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise EdgekitError(f"--prefill-chunk must be a whole number of at least 1, got {chunk!r}",
                           "pass --prefill-chunk 1 or more, or leave it out (the prompt in one call)")
    return chunk


class Runner:
    name = "base"

    def __init__(self, resolved: Resolved, **options):
        self.resolved = resolved
        self.cfg = resolved.cfg
        self.spec = DecoderSpec(self.cfg)
        self.prefill_chunk = check_prefill_chunk(options.pop("prefill_chunk", None))
        self.options = options
        self.is_active = False

    # lifecycle ---------------------------------------------------------------------------------
    def activate(self) -> Runner:
        if self.is_active:
            raise EdgekitError(f"{self.name} runner is already active")
        self.activate_impl()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def describe(self) -> dict:
        """What actually runs (dtype, device, provider...), for reports. Valid once active."""
        return {"runtime": self.name}

    # inference ---------------------------------------------------------------------------------
    def input_metadata(self) -> dict[str, tuple[str, tuple]]:
        """name -> (dtype, shape with symbolic axis names)."""
        axes = self.spec.dynamic_axes()
        cfg = self.cfg
        meta = {"input_ids": ("int64", ("batch", "seq")), MASK: ("int64", ("batch", "total"))}
        if self.spec.gated:
            meta["thresholds"] = ("float32", (cfg.n_layers,))
        for n in self.spec.past_names():
            meta[n] = ("float32", ("batch", cfg.n_heads, axes[n][2], cfg.head_dim))
        return meta

    def _check_active(self) -> None:
        if not self.is_active:
            raise EdgekitError(f"{self.name} runner is not active", "use it as a context manager")

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for feeds named as in the spec; a missing attention_mask means no padding (all ones)."""
        self._check_active()
        expected = set(self.spec.input_names)
        missing, extra = sorted(expected - set(feeds) - {MASK}), sorted(set(feeds) - expected)
        if missing or extra:
            raise EdgekitError(f"{self.name}: wrong inputs: missing {missing[:4]}, unexpected {extra[:4]}")
        if feeds["input_ids"].ndim != 2:
            raise EdgekitError(f"input_ids must be [batch, seq], got shape {feeds['input_ids'].shape}")
        b, s = feeds["input_ids"].shape
        total = s + np.shape(feeds[self.spec.past_names()[0]])[2]
        mask = feeds.get(MASK)
        feeds = {**feeds, MASK: left_padding_mask(b, total) if mask is None else check_mask(mask, b, total)}
        return self.infer_impl(feeds)

    # generation --------------------------------------------------------------------------------
    def session(self, batch: int = 1, thresholds=None) -> Session:
        """A fresh KV cache for `batch` sequences; R1 `thresholds` (scalar or per layer) stay fixed."""
        self._check_active()
        if batch < 1:
            raise EdgekitError(f"batch must be at least 1, got {batch}", "pass --batch 1 or more")
        if thresholds is not None and not self.spec.gated:
            thresholds = None  # V3 has no gates: nothing to pass
        sess = self.session_impl(batch, thresholds)
        return ChunkedSession(sess, self.prefill_chunk) if self.prefill_chunk else sess

    def stepper(self, thresholds=None, batch: int = 1) -> Step:
        """A generation step with its own KV cache: first call prefill, later calls decode.
        Each call's ids are fed to every row of the batch; the first row's logits come back."""
        sess = self.session(batch, thresholds)

        def step(ids: list[int]):
            logits, executed = sess.step(np.asarray([list(ids)] * batch, dtype=np.int64))
            return logits[0], executed

        return step

    def generate(self, prompt: list[int], max_new_tokens: int, thresholds=None, temperature: float = 0.0,
                 top_k: int = 0, seed: int = 0, stop: int | None = None) -> Generated:
        return run_generation(self.stepper(thresholds), prompt, max_new_tokens, temperature, top_k, seed, stop)

    # to fill in ---------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def session_impl(self, batch: int, thresholds) -> Session:
        return Session(self, batch, thresholds)

    def deactivate_impl(self) -> None:
        pass
