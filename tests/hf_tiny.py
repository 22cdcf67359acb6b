"""Tiny random Hugging Face model directories built in code (no downloads), shared by the tests of
edgekit.models.hf and edgekit.calibrate (on sys.path through pyproject's pytest `pythonpath`)."""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ["<s>", "</s>", "<unk>",
         *"the a edge kit model runs on every device fast small big int8 onnx graph user assistant".split()]
# a chat template in the style of the R1 distills' (BOS, role markers, the generation prompt at the end)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1)
# DeepSeek-V3 architecture: MLA (compressed latent KV cache) + MoE (16 routed experts, top-2, one shared)
DSV3 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            first_k_dense_replace=0, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16,
            num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256, bos_token_id=0,
            eos_token_id=1)
SEEDS = {"qwen2": 0, "llama": 1, "deepseek_v3": 2}


def write_tokenizer(directory: Path, words: list[str] = WORDS, special: bool = True, chat: bool = False) -> None:
    """A word-level tokenizer.json (and, with chat, a tokenizer_config.json holding CHAT_TEMPLATE)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if special:
        tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))
    if chat:
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "chat_template": CHAT_TEMPLATE}))


def save_model(directory: Path, arch: str, min_dim: int = 2, max_dim: int = 2):
    """A seeded random model of `arch` saved as safetensors; weights with min_dim <= dim <= max_dim are
    redrawn with std 0.2 (the init's 0.02 gives near-tied logits). Returns the transformers model."""
    import torch
    import transformers

    torch.manual_seed(SEEDS[arch])
    cfg = {"qwen2": lambda: transformers.Qwen2Config(**COMMON), "llama": lambda: transformers.LlamaConfig(**COMMON),
           "deepseek_v3": lambda: transformers.DeepseekV3Config(**DSV3)}[arch]()
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if min_dim <= p.dim() <= max_dim:
                p.normal_(0, 0.2)
    model.save_pretrained(directory, safe_serialization=True)
    return model
