"""Hugging Face model directories without torch: config.json (`model_type`), the skip-gate files of a
`edgekit calibrate-skip` directory, parameter counts from safetensors headers, the tokenizer and chat
template, and the side files an artifact keeps. The torch model lives in edgekit.models.hf."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from edgekit.errors import EdgekitError

SUPPORTED = ("qwen2", "llama", "deepseek_v3")
# files an artifact keeps from the source directory (tokenizer, chat template, generation defaults)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "skip_gates.json")  # the last: gated layers + default threshold of a calibrate-skip model


def require(module: str):
    """Import a library Hugging Face models need (transformers, tokenizers), or say which extra installs it."""
    from edgekit.errors import require as require_extra

    return require_extra(module, "hf")


def raw_config(directory: Path) -> dict | None:
    """config.json's content when it is a Hugging Face config (has `model_type`), else None."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgekitError(f"cannot read {path}: {e}") from None
    return d if isinstance(d, dict) and "model_type" in d else None


def is_hf_dir(directory: Path) -> bool:
    return raw_config(directory) is not None


@dataclass(frozen=True)
class HFConfig:
    """What edgekit's DecoderSpec / exporter / runtimes need, read from a Hugging Face config.json
    (no transformers import). n_heads/head_dim describe the *cache*: KV heads, and for MLA the one
    latent 'head' (key = compressed kv [kv_lora_rank], value = shared rotary key [qk_rope_head_dim])."""

    model_type: str
    name: str
    n_layers: int
    n_heads: int  # heads in the KV cache tensors
    head_dim: int  # key dim of the cache
    value_dim: int  # value dim of the cache
    vocab_size: int
    d_model: int
    max_seq_len: int
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    memory_len: int = 0
    block_size: int = 16  # only shapes the validation cases
    gated_layers: tuple = ()
    default_threshold: float = 0.5

    @property
    def family(self) -> str:
        return f"hf-{self.model_type}"

    def to_dict(self) -> dict:
        return {**asdict(self), "family": self.family}

    @classmethod
    def from_raw(cls, d: dict, name: str) -> HFConfig:
        mt = d["model_type"]
        if mt not in SUPPORTED:
            raise EdgekitError(f"unsupported Hugging Face model_type '{mt}'", f"supported: {', '.join(SUPPORTED)}")
        try:
            n_attn = int(d["num_attention_heads"])
            if mt == "deepseek_v3":
                heads, kdim, vdim = 1, int(d["kv_lora_rank"]), int(d["qk_rope_head_dim"])
            else:
                heads = int(d.get("num_key_value_heads") or n_attn)
                kdim = vdim = int(d.get("head_dim") or d["hidden_size"] // n_attn)
            eos = d.get("eos_token_id")
            sizes = {"num_attention_heads": n_attn, "heads": heads, "head_dim": kdim, "value_dim": vdim,
                     "num_hidden_layers": int(d["num_hidden_layers"]), "vocab_size": int(d["vocab_size"]),
                     "hidden_size": int(d["hidden_size"]),
                     "max_position_embeddings": int(d.get("max_position_embeddings") or 4096)}
            small = [k for k, v in sizes.items() if v < 1]
            if small:
                raise EdgekitError(f"config.json of {name}: {small[0]} must be at least 1, got {sizes[small[0]]}",
                                   "is this a complete Hugging Face config?")
            return cls(model_type=mt, name=name, n_layers=int(d["num_hidden_layers"]), n_heads=heads, head_dim=kdim,
                       value_dim=vdim, vocab_size=int(d["vocab_size"]), d_model=int(d["hidden_size"]),
                       max_seq_len=int(d.get("max_position_embeddings") or 4096),
                       eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
                       bos_token_id=d.get("bos_token_id"))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            raise EdgekitError(f"config.json of {name}: missing or bad field {e}",
                               "is this a complete Hugging Face config?") from None


def read_hf_config(directory: Path, name: str | None = None) -> HFConfig:
    d = raw_config(directory)
    if d is None:
        raise EdgekitError(f"{directory}: config.json has no model_type", "not a Hugging Face model directory")
    cfg = HFConfig.from_raw(d, name or Path(directory).resolve().name)
    return gated_config(cfg, directory)


GATES_FILE = "skip_gates.safetensors"
STATS_FILE = "skip_gates.json"
FORMAT = "edgekit-skip-gates/1"


def has_gates(directory: Path) -> bool:
    return (Path(directory) / STATS_FILE).is_file()


def read_stats(directory: Path) -> dict:
    path = Path(directory) / STATS_FILE
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT:
            raise ValueError(f"format {d.get('format')!r}, expected {FORMAT!r}")
        [int(i) for i in d["gated_layers"]]
        float(d["default_threshold"])
        return d
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise EdgekitError(f"cannot read {path}: {e}", "rerun 'edgekit calibrate-skip'") from None


def gated_config(cfg: HFConfig, directory: Path) -> HFConfig:
    """cfg with the gated layers and default threshold from skip_gates.json (unchanged without one)."""
    import dataclasses

    if not has_gates(directory):
        return cfg
    d = read_stats(directory)
    return dataclasses.replace(cfg, gated_layers=tuple(int(i) for i in d["gated_layers"]),
                               default_threshold=float(d["default_threshold"]))


def weight_counts(directory: Path) -> dict:
    """Parameter counts from the *.safetensors headers (no weights are read): total, and for MoE the
    routed-expert share and the parameters active per token."""
    from safetensors import safe_open

    total = experts = 0
    for f in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = 1
                for dim in st.get_slice(name).get_shape():
                    n *= dim
                total += n
                experts += n if ".mlp.experts." in name else 0
    out = {"total": total}
    raw = raw_config(directory) or {}
    if experts and raw.get("n_routed_experts"):
        out.update(routed_experts=experts,
                   active=total - experts + experts * raw.get("num_experts_per_tok", 1) // raw["n_routed_experts"])
    return out


CHAT_TEMPLATE_FILE = "chat_template.jinja"  # newer transformers save the template here, not in tokenizer_config.json


class HFTokenizer:
    """tokenizer.json through the `tokenizers` library; BOS/EOS ids from config.json; the chat template
    (chat_template.jinja, or tokenizer_config.json's `chat_template`) rendered by transformers."""

    def __init__(self, directory: Path, cfg: HFConfig):
        self.directory = Path(directory)
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise EdgekitError(f"{directory}: no tokenizer.json", "copy the model's tokenizer.json into the directory")
        tokenizers = require("tokenizers")
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own exception types
            raise EdgekitError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        self.bos_id, self.eos_id = cfg.bos_token_id, cfg.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def _tokenizer_config(self) -> dict:
        path = self.directory / "tokenizer_config.json"
        if not path.is_file():
            return {}
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise EdgekitError(f"cannot read {path}: {e}") from None
        return d if isinstance(d, dict) else {}

    def chat_template(self) -> str | None:
        """The default chat template: chat_template.jinja, else tokenizer_config.json's `chat_template`
        (a string, or a list of {name, template} of which the one named 'default' is used)."""
        jinja = self.directory / CHAT_TEMPLATE_FILE
        if jinja.is_file():
            return jinja.read_text()
        t = self._tokenizer_config().get("chat_template")
        if isinstance(t, list):
            t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
        return t if isinstance(t, str) and t.strip() else None

    def chat(self, message: str) -> tuple[str, list[int]]:
        """(rendered text, ids) of one user message through the model's chat template with the generation
        prompt appended, rendered by transformers' apply_chat_template. The template writes the special
        tokens itself (BOS included), so the text is encoded without adding any."""
        template = self.chat_template()
        if template is None:
            raise EdgekitError(f"{self.directory.name} has no chat template (no chat_template in "
                               "tokenizer_config.json)", "use --prompt TEXT to continue plain text")
        transformers = require("transformers")
        config = self._tokenizer_config()
        special = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = config.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                special[key] = v
        tok = transformers.PreTrainedTokenizerFast(tokenizer_object=self.tok, **special)
        try:
            text = tok.apply_chat_template([{"role": "user", "content": message}], chat_template=template,
                                           add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja2's TemplateError, or the template's own raise_exception()
            raise EdgekitError(f"{self.directory.name}: its chat template failed: {str(e).splitlines()[0]}",
                               "check chat_template in tokenizer_config.json") from None
        return text, self.tok.encode(text, add_special_tokens=False).ids


def write_side_files(dst: Path, src: Path) -> None:
    """config.json (the Hugging Face one, verbatim) and the tokenizer files into an artifact."""
    for name in ("config.json", *SIDE_FILES, CHAT_TEMPLATE_FILE):
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)


def gguf_cache_dir(path: Path) -> Path:
    """Where a .gguf file's Hugging Face directory lives once converted (edgekit.models.gguf): under
    $EDGEKIT_CACHE (default ~/.cache/edgekit), named by the file's stem and sha256, so an edited file is
    converted again and the same file is converted once."""
    import os

    from edgekit.artifact import sha256_file

    root = Path(os.environ.get("EDGEKIT_CACHE") or Path.home() / ".cache" / "edgekit")
    return root / "gguf" / f"{Path(path).stem}-{sha256_file(Path(path))[:16]}"
