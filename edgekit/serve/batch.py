"""A running batch for continuous batching: per-row KV caches as numpy arrays, rows joining and leaving
between decode steps, over `runner.infer(feeds)` (any engine: ONNX Runtime, torch, TensorRT).

The batch keeps one cache tensor per past name, [rows, heads, P, dim], and an attention mask [rows, P]
(1: a real position, 0: left padding). A decode step feeds every row's last token with the mask extended
by one column. Joining rows are prefilled together (their prompts left-padded to the longest), then
their caches are left-padded to the running batch's P (or the running batch's to theirs) and stacked
on; rows that finish are sliced out; columns that are padding in every remaining row are trimmed away.

An artifact exported before attention masks (its runner's `has_mask` False) cannot hide padding from
the model: the batch then only stacks rows whose cache lengths are equal (`can_pad` False), which the
scheduler respects. R1's `executed` output is one flag per layer per call (the layer ran for some row):
it is given to every row of the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MASK = "attention_mask"


@dataclass
class StepOut:
    logits: np.ndarray  # [rows, vocab] at each row's last position
    executed: np.ndarray | None  # [rows, layers] bool (R1), or None


class Batch:
    def __init__(self, runner, thresholds=None):
        self.runner = runner
        self.spec = runner.spec
        self.can_pad = MASK in self.spec.input_names and getattr(runner, "has_mask", True)
        self.thresholds = None
        if self.spec.gated:
            thr = runner.cfg.default_threshold if thresholds is None else thresholds
            self.thresholds = np.broadcast_to(np.asarray(thr, np.float32), (runner.cfg.n_layers,)).copy()
        self.rows: list = []  # opaque row objects owned by the caller, in cache order
        self.cache: dict[str, np.ndarray] = {}
        self.mask = np.zeros((0, 0), np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def past_len(self) -> int:
        return self.mask.shape[1]

    def _feeds(self, ids: np.ndarray, cache: dict, mask: np.ndarray) -> dict:
        feeds = {"input_ids": ids, **cache}
        if self.thresholds is not None:
            feeds["thresholds"] = self.thresholds
        if MASK in self.spec.input_names:
            feeds[MASK] = mask
        return feeds

    def _run(self, feeds: dict, rows: int) -> tuple[dict, StepOut]:
        out = self.runner.infer(feeds)
        cache = {p: np.asarray(out[q]) for p, q in zip(self.spec.past_names(), self.spec.present_names())}
        executed = out.get("executed")
        if executed is not None:
            executed = np.asarray(executed).astype(bool)
            # one decision per call (graphs without per-row gates) applies to every row
            executed = executed.reshape(rows, -1) if executed.ndim == 2 else np.broadcast_to(
                executed.reshape(1, -1), (rows, executed.size))
        return cache, StepOut(np.asarray(out["logits"])[:, -1], executed)

    def _empty_cache(self, rows: int, length: int) -> dict[str, np.ndarray]:
        return {n: np.zeros((rows, self.spec.cache_heads, length,
                             self.spec.value_dim if n.endswith(".value") else self.runner.cfg.head_dim), np.float32)
                for n in self.spec.past_names()}

    def prefill(self, rows: list, prompts: list[list[int]]) -> StepOut:
        """Run the joining rows' prompts (left-padded to the longest) and stack their caches onto the batch."""
        longest = max(len(p) for p in prompts)
        if not self.can_pad and any(len(p) != longest for p in prompts):
            raise ValueError("this graph has no attention_mask: joining prompts must have equal lengths")
        ids = np.zeros((len(prompts), longest), np.int64)
        mask = np.zeros((len(prompts), longest), np.int64)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p):] = p
            mask[i, longest - len(p):] = 1
        cache, out = self._run(self._feeds(ids, self._empty_cache(len(prompts), 0), mask), len(prompts))
        mask = self._fit_mask(mask, cache)
        self._stack(rows, cache, mask)
        return out

    def _fit_mask(self, mask: np.ndarray, cache: dict) -> np.ndarray:
        """A cache truncated by the graph (V3's segment memory) keeps the mask's last columns."""
        length = next(iter(cache.values())).shape[2]
        return mask[:, mask.shape[1] - length:]

    def _stack(self, rows: list, cache: dict, mask: np.ndarray) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        if not self.can_pad and mask.shape[1] != self.past_len:
            raise ValueError("this graph has no attention_mask: joining rows must have the batch's cache length")
        target = max(self.past_len, mask.shape[1])
        old_c, old_m = _left_pad(self.cache, self.mask, target)
        new_c, new_m = _left_pad(cache, mask, target)
        self.cache = {n: np.concatenate([old_c[n], new_c[n]]) for n in self.cache}
        self.mask = np.concatenate([old_m, new_m])
        self.rows += list(rows)

    def decode(self, last_tokens: list[int]) -> StepOut:
        """One token per row through the cache."""
        ids = np.asarray(last_tokens, np.int64).reshape(len(self.rows), 1)
        mask = np.concatenate([self.mask, np.ones((len(self.rows), 1), np.int64)], axis=1)
        self.cache, out = self._run(self._feeds(ids, self.cache, mask), len(self.rows))
        self.mask = self._fit_mask(mask, self.cache)
        return out

    def remove(self, leaving: set) -> None:
        """Slice out the rows in `leaving` (by identity) and trim the padding no remaining row needs."""
        keep = [i for i, r in enumerate(self.rows) if id(r) not in leaving]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = {}, np.zeros((0, 0), np.int64)
            return
        idx = np.asarray(keep)
        self.cache = {n: v[idx] for n, v in self.cache.items()}
        self.mask = self.mask[idx]
        real = self.mask.any(axis=0)
        start = int(np.argmax(real)) if real.any() else self.mask.shape[1]
        if start:
            self.cache = {n: v[:, :, start:] for n, v in self.cache.items()}
            self.mask = self.mask[:, start:]


def _left_pad(cache: dict, mask: np.ndarray, target: int) -> tuple[dict, np.ndarray]:
    pad = target - mask.shape[1]
    if pad <= 0:
        return cache, mask
    cache = {n: np.pad(v, ((0, 0), (0, 0), (pad, 0), (0, 0))) for n, v in cache.items()}
    return cache, np.pad(mask, ((0, 0), (pad, 0)))
