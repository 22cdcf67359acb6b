"""The model families: V3 and R1, their presets, building and loading."""

from __future__ import annotations

import torch

from edgekit.config import PRESETS, ModelConfig, preset
from edgekit.models.layers import CausalLM
from edgekit.models.r1 import R1
from edgekit.models.v3 import V3

FAMILIES: dict[str, type[CausalLM]] = {"v3": V3, "r1": R1}

__all__ = ["PRESETS", "FAMILIES", "ModelConfig", "CausalLM", "build", "preset", "param_counts"]


def build(cfg: ModelConfig | str, device: str | torch.device = "cpu", seed: int = 0) -> CausalLM:
    """A model with seeded random weights (`device="meta"` allocates nothing)."""
    cfg = preset(cfg) if isinstance(cfg, str) else cfg
    torch.manual_seed(seed)
    with torch.device(device):
        model = FAMILIES[cfg.family](cfg)
    return model.eval()


def fp32_bytes(cfg: ModelConfig | str) -> int:
    """Bytes of the model's unique parameters in fp32 (built on the meta device: nothing allocated)."""
    return 4 * param_counts(build(cfg, device="meta"))["unique"]


def param_counts(model: CausalLM) -> dict[str, int]:
    """unique = every stored parameter once; total = as executed (a shared block counts per use)."""
    cfg = model.cfg
    unique = sum(p.numel() for p in model.parameters())
    per_block = sum(p.numel() for p in model.blocks[0].parameters())
    total = unique + per_block * (cfg.n_layers - len(model.blocks))
    return {"total": total, "unique": unique}

