"""The description of an exported decoder graph, apart from the converter (STYLE.md, optimum):
input/output names, dynamic axes and seeded dummy inputs. Every exporter and runtime uses it.

Feeds: input_ids int64 [batch, seq]; attention_mask int64 [batch, past + seq] (Hugging Face convention: 1 = a real
token, 0 = padding; padding only on the left of each row, so a row's real tokens, past included, are contiguous at
the end; a real token's position = the number of real tokens before it in its row); thresholds float32 [n_layers]
(gated families); past.i.key / past.i.value [batch, heads, past, dim]. A left-padded batch gives every row the
logits that row gets alone (batch 1, no padding)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.config import ModelConfig
from edgekit.errors import EdgekitError
from edgekit.families import family, is_gated

MASK = "attention_mask"


def left_padding_mask(batch: int, total: int, pads=None) -> np.ndarray:
    """int64 [batch, total]: 0 on the first pads[b] positions of row b, 1 after (pads None: all ones)."""
    pads = np.zeros(batch, np.int64) if pads is None else np.broadcast_to(np.asarray(pads, np.int64), (batch,))
    return (np.arange(total)[None, :] >= pads[:, None]).astype(np.int64)


def check_mask(mask, batch: int, total: int) -> np.ndarray:
    """The attention_mask feed as int64 [batch, total], or a one-line EdgekitError saying what is wrong."""
    mask = np.asarray(mask)
    if mask.shape != (batch, total):
        raise EdgekitError(f"attention_mask must be [batch={batch}, past + seq={total}], got shape {mask.shape}",
                           "pass one 0/1 entry per cached and new position of each row")
    if mask.size and (((mask != 0) & (mask != 1)).any() or (mask[:, 1:] < mask[:, :-1]).any()):
        raise EdgekitError("attention_mask must be 0/1 with the padding (0) only on the left of each row",
                           "left-pad each row: its real tokens, past included, contiguous at the end")
    return mask.astype(np.int64, copy=False)


@dataclass(frozen=True)
class DecoderSpec:
    cfg: ModelConfig  # or any config with the same fields (edgekit.hfconfig.HFConfig for Hugging Face models)

    @property
    def gated(self) -> bool:
        return is_gated(self.cfg)

    @property
    def value_dim(self) -> int:
        """Last dim of the value cache: head_dim, except where the config says otherwise (MLA's latent cache)."""
        return getattr(self.cfg, "value_dim", self.cfg.head_dim)

    @property
    def cache_heads(self) -> int:
        """Heads in the KV cache tensors: the K/V heads (GQA: fewer than the query heads; an HFConfig's
        n_heads already counts the K/V heads)."""
        return getattr(self.cfg, "kv_heads", self.cfg.n_heads)

    def cache_positions(self, tokens: int) -> int:
        """Positions the cache holds after `tokens` tokens: V3's segment memory truncates it to memory_len."""
        memory = getattr(self.cfg, "memory_len", 0)
        return min(tokens, memory) if memory and family(self.cfg).segment_memory else tokens

    def kv_bytes(self, batch: int, tokens: int, bytes_per_value: int = 4) -> int:
        """The KV cache after `tokens` tokens: the one memory formula that the TensorRT recipe, profile's
        up-front check and (tested equal) the plan use."""
        cfg = self.cfg
        per_position = cfg.n_layers * self.cache_heads * (cfg.head_dim + self.value_dim)
        return batch * per_position * self.cache_positions(tokens) * bytes_per_value

    def past_names(self) -> list[str]:
        return [f"past.{i}.{kv}" for i in range(self.cfg.n_layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.cfg.n_layers) for kv in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        return ["input_ids", MASK, *(["thresholds"] if self.gated else []), *self.past_names()]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names(), *(["executed"] if self.gated else [])]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {"input_ids": {0: "batch", 1: "seq"}, MASK: {0: "batch", 1: "total"}, "logits": {0: "batch", 1: "seq"}}
        for n in self.past_names():
            axes[n] = {0: "batch", 2: "past"}
        for n in self.present_names():
            axes[n] = {0: "batch", 2: "present"}
        return axes

    def dummy(self, batch: int, seq: int, past: int, seed: int = 0, thresholds=None,
              text=None, pads=None) -> dict[str, np.ndarray]:
        """Seeded inputs for the graph: random tokens (or, with `text`, a token sequence, seeded windows
        of it: in-distribution input for a trained model) and a random KV cache of length `past`.
        pads: per row, how many of its past + seq positions are left padding (mask 0; the cache there stays
        random: a correct graph ignores it); None = all ones."""
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        if text is None:
            ids = rng.integers(0, min(cfg.vocab_size, 256), (batch, seq), dtype=np.int64)
        else:
            text = np.resize(np.asarray(text, np.int64), max(len(text), seq + 1))  # repeats a short text
            starts = rng.integers(0, len(text) - seq + 1, batch)
            ids = np.stack([text[s:s + seq] for s in starts]).reshape(batch, seq)
        feeds = {"input_ids": ids, MASK: left_padding_mask(batch, past + seq, pads)}
        if self.gated:
            thr = cfg.default_threshold if thresholds is None else thresholds
            feeds["thresholds"] = np.broadcast_to(np.asarray(thr, np.float32), (cfg.n_layers,)).copy()
        for n in self.past_names():
            dim = self.value_dim if n.endswith(".value") else cfg.head_dim
            feeds[n] = rng.standard_normal((batch, self.cache_heads, past, dim)).astype(np.float32)
        return feeds
