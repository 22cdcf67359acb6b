"""One config dataclass for both families, and the presets."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError, unknown_name
from edgekit.tokenizer import VOCAB_SIZE

FULL_SIZE_BYTES = 4 << 30  # fp32 weights above this: a full-size model (streamed export, weights drawn on the GPU)

CONFIG = "config.json"


@dataclass
class ModelConfig:
    family: str  # "v3" or "r1"
    name: str = "custom"
    vocab_size: int = VOCAB_SIZE
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # grouped-query attention: K/V heads (0 = n_heads); query heads share them in groups
    d_ff: int = 172
    max_seq_len: int = 1024  # context length the model is meant for
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    # two-level dynamic relative position encoding (both families)
    local_window: int = 32  # learned per-head bias for each distance d < local_window
    n_global_buckets: int = 16  # learned per-head bias over log-spaced distance buckets
    max_distance: int = 4096  # distances beyond this share the last global bucket
    # V3: Transformer-XL segment memory = KV cache truncated to memory_len (0 = no truncation)
    memory_len: int = 0
    # R1: block-sparse routed attention, parameter sharing, selective activation
    block_size: int = 16
    n_unique_blocks: int = 0  # 0 = no sharing (one block per layer)
    gated_layers: list[int] = field(default_factory=list)  # layers with a skip gate
    default_threshold: float = 0.5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def unique_blocks(self) -> int:
        return self.n_unique_blocks or self.n_layers

    def block_of(self, layer: int) -> int:
        """R1 reuses blocks cyclically: layer l runs block l % unique_blocks."""
        return layer % self.unique_blocks

    # fields checked by type and range (minimum) before anything else: one line naming the field
    POSITIVE = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len", "n_global_buckets",
                "max_distance", "block_size")
    NON_NEGATIVE = ("n_kv_heads", "local_window", "memory_len", "n_unique_blocks")

    def _check_fields(self) -> None:
        def bad(name: str, want: str) -> EdgekitError:
            return EdgekitError(f"config.json: {name} must be {want}, got {getattr(self, name)!r}",
                                "fix config.json, or save the checkpoint again with edgekit")

        for name in ("family", "name"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")
        for name in (*self.POSITIVE, *self.NON_NEGATIVE):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise bad(name, "an integer")
            if v < (1 if name in self.POSITIVE else 0):
                raise bad(name, "at least 1" if name in self.POSITIVE else "0 or more")
        if not isinstance(self.tie_embeddings, bool):
            raise bad("tie_embeddings", "true or false")
        for name in ("norm_eps", "default_threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise bad(name, "a finite number")
        if self.norm_eps <= 0:
            raise bad("norm_eps", "positive")
        if not isinstance(self.gated_layers, list) or not all(
                isinstance(g, int) and not isinstance(g, bool) for g in self.gated_layers):
            raise bad("gated_layers", "a list of layer numbers")

    def validate(self) -> ModelConfig:
        if self.family not in ("v3", "r1"):
            raise EdgekitError(f"config: unknown family '{self.family}'", "use 'v3' or 'r1'")
        self._check_fields()
        if self.d_model % self.n_heads:
            raise EdgekitError(f"config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}",
                               "choose n_heads that divides d_model")
        if self.n_heads % self.kv_heads:
            raise EdgekitError(f"config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}",
                               "choose n_kv_heads that divides n_heads (0 = n_heads)")
        if self.family == "v3" and (self.gated_layers or self.n_unique_blocks):
            raise EdgekitError("config: V3 has no gates and no parameter sharing",
                               "drop gated_layers and n_unique_blocks, or use family 'r1'")
        bad = [g for g in self.gated_layers if not 0 <= g < self.n_layers]
        if bad:
            raise EdgekitError(f"config: gated layer(s) {bad} outside 0..{self.n_layers - 1}",
                               "list layers between 0 and n_layers - 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise EdgekitError(f"config.json must be a JSON object of model fields, not {json.dumps(d)[:40]}",
                               "is this an edgekit checkpoint?")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise EdgekitError(f"config.json: unknown field(s) {unknown}", "is this an edgekit checkpoint?")
        missing = sorted(n for n in ("family",) if n not in d)
        if missing:
            raise EdgekitError(f"config.json: missing field(s) {missing}", "is this an edgekit checkpoint?")
        return cls(**d).validate()


def _r1_gates(n_layers: int) -> list[int]:
    """Every layer but the first and the last carries a gate."""
    return list(range(1, n_layers - 1))


def route_k(n_blocks: int) -> int:
    """Key blocks a query routes to besides its own: k = floor(log2(number of blocks)), at least 1."""
    return max(1, int(math.log2(max(n_blocks, 1))))


PRESETS: dict[str, ModelConfig] = {
    "v3-tiny": ModelConfig("v3", "v3-tiny", d_model=64, n_layers=4, n_heads=4, d_ff=172,
                           max_seq_len=1024, local_window=16, n_global_buckets=8, memory_len=512),
    "r1-tiny": ModelConfig("r1", "r1-tiny", d_model=64, n_layers=4, n_heads=4, d_ff=172,
                           max_seq_len=1024, local_window=16, n_global_buckets=8, block_size=16,
                           n_unique_blocks=2, gated_layers=_r1_gates(4)),
    "v3-mini": ModelConfig("v3", "v3-mini", d_model=768, n_layers=12, n_heads=12, d_ff=2048,
                           max_seq_len=8192, local_window=64, n_global_buckets=16, memory_len=1024),
    "r1-mini": ModelConfig("r1", "r1-mini", d_model=768, n_layers=16, n_heads=12, n_kv_heads=4, d_ff=2048,
                           max_seq_len=8192, local_window=64, n_global_buckets=16, block_size=64,
                           n_unique_blocks=8, gated_layers=_r1_gates(16)),
    # Full size: LLaMA-13B-shaped V3 (13.0 B); R1 with 40 unique 4096-wide blocks used twice (8.4 B unique),
    # grouped-query attention (4 K/V heads of 128 for 32 query heads: the KV cache is 1/8 of full width; the
    # parameters the narrower K/V projections free go to the MLP, d_ff 13440).
    "v3-13b": ModelConfig("v3", "v3-13b", vocab_size=32000, d_model=5120, n_layers=40, n_heads=40,
                          d_ff=13824, max_seq_len=8192, local_window=128, n_global_buckets=32,
                          max_distance=8192, memory_len=4096),
    "r1-8.5b": ModelConfig("r1", "r1-8.5b", vocab_size=32000, d_model=4096, n_layers=80, n_heads=32,
                           n_kv_heads=4, d_ff=13440, max_seq_len=8192, local_window=128, n_global_buckets=32,
                           max_distance=8192, block_size=128, n_unique_blocks=40,
                           gated_layers=_r1_gates(80)),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise unknown_name("model", name, PRESETS)
    return dataclasses.replace(PRESETS[name], gated_layers=list(PRESETS[name].gated_layers))


def read_config(directory: Path) -> ModelConfig:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise EdgekitError(f"{directory}: no {CONFIG}", "a checkpoint is a directory with config.json and "
                           "model.safetensors")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{path} is not valid JSON: {e}", "fix config.json, or save the checkpoint again") \
            from None
