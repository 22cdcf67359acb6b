"""The description of an exported decoder graph, apart from the converter (STYLE.md, optimum):
input/output names, dynamic axes and seeded dummy inputs. Every exporter and runtime uses it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.config import ModelConfig
from edgekit.families import family, is_gated


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
        return ["input_ids", *(["thresholds"] if self.gated else []), *self.past_names()]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names(), *(["executed"] if self.gated else [])]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
        for n in self.past_names():
            axes[n] = {0: "batch", 2: "past"}
        for n in self.present_names():
            axes[n] = {0: "batch", 2: "present"}
        return axes

    def dummy(self, batch: int, seq: int, past: int, seed: int = 0, thresholds=None,
              text=None) -> dict[str, np.ndarray]:
        """Seeded inputs for the graph: random tokens (or, with `text`, a token sequence, seeded windows
        of it: in-distribution input for a trained model) and a random KV cache of length `past`."""
        cfg = self.cfg
        rng = np.random.default_rng(seed)
        if text is None:
            ids = rng.integers(0, min(cfg.vocab_size, 256), (batch, seq), dtype=np.int64)
        else:
            text = np.resize(np.asarray(text, np.int64), max(len(text), seq + 1))  # repeats a short text
            starts = rng.integers(0, len(text) - seq + 1, batch)
            ids = np.stack([text[s:s + seq] for s in starts]).reshape(batch, seq)
        feeds = {"input_ids": ids}
        if self.gated:
            thr = cfg.default_threshold if thresholds is None else thresholds
            feeds["thresholds"] = np.broadcast_to(np.asarray(thr, np.float32), (cfg.n_layers,)).copy()
        for n in self.past_names():
            dim = self.value_dim if n.endswith(".value") else cfg.head_dim
            feeds[n] = rng.standard_normal((batch, self.cache_heads, past, dim)).astype(np.float32)
        return feeds
