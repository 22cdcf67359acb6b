"""The model families as data (layer 1, no torch): one place that says what a family is, instead of
string checks on `cfg.family` across the code base. The torch classes are mapped in edgekit.models
(FAMILIES) and edgekit.models.hf; the plan's shape comes from edgekit.plan.shape by `source`."""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.errors import EdgekitError


@dataclass(frozen=True)
class Family:
    name: str  # cfg.family
    label: str  # for people
    source: str  # "edgekit" (built from edgekit's config) | "huggingface" (a transformers model directory)
    routed: bool = False  # R1's block-sparse routed attention
    segment_memory: bool = False  # V3: the cache is truncated to memory_len
    tokenizer: str = "byte"  # "byte" (edgekit's) | "tokenizer.json"


FAMILIES = {f.name: f for f in (
    Family("v3", "V3", "edgekit", segment_memory=True),
    Family("r1", "R1", "edgekit", routed=True),
    Family("hf-qwen2", "Qwen2 (Hugging Face)", "huggingface", tokenizer="tokenizer.json"),
    Family("hf-llama", "Llama (Hugging Face)", "huggingface", tokenizer="tokenizer.json"),
    Family("hf-deepseek_v3", "DeepSeek-V3 (Hugging Face)", "huggingface", tokenizer="tokenizer.json"),
)}


def family(name_or_cfg) -> Family:
    name = name_or_cfg if isinstance(name_or_cfg, str) else name_or_cfg.family
    if name not in FAMILIES:
        raise EdgekitError(f"unknown model family '{name}'", f"known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def is_hf(cfg) -> bool:
    return family(cfg).source == "huggingface"


def is_gated(cfg) -> bool:
    """Gated = has skip gates (R1's learned ones, or a calibrate-skip Hugging Face model's): the graph
    takes a `thresholds` input and returns `executed`. The one definition."""
    return bool(getattr(cfg, "gated_layers", ()))
