"""Hugging Face model directories (config.json with `model_type`, *.safetensors, tokenizer.json):
qwen2 and llama (the DeepSeek-R1-Distill architectures) and deepseek_v3 (MLA + MoE).

`HFCausalLM` gives a transformers model edgekit's model interface (models.layers.CausalLM):
forward(input_ids, past [(k, v)] per layer, thresholds) -> (logits, presents, executed), the KV cache
as explicit per-layer tensors, so the torch runtime, the ONNX exporter and `validate` use it unchanged.
transformers and tokenizers are an optional extra, imported lazily. Loading never unpickles."""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from edgekit.errors import EdgekitError

SUPPORTED = ("qwen2", "llama", "deepseek_v3")
INSTALL = "pip install 'edgekit[hf]'"
# files an artifact keeps from the source directory (tokenizer, chat template, generation defaults)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
              "skip_gates.json")  # the last: gated layers + default threshold of a calibrate-skip model


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EdgekitError(f"Hugging Face models need the '{module}' library, which is not installed",
                           INSTALL) from None


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
            return cls(model_type=mt, name=name, n_layers=int(d["num_hidden_layers"]), n_heads=heads, head_dim=kdim,
                       value_dim=vdim, vocab_size=int(d["vocab_size"]), d_model=int(d["hidden_size"]),
                       max_seq_len=int(d.get("max_position_embeddings") or 4096),
                       eos_token_id=eos[0] if isinstance(eos, list) and eos else eos,
                       bos_token_id=d.get("bos_token_id"))
        except (KeyError, TypeError, ValueError) as e:
            raise EdgekitError(f"config.json of {name}: missing or bad field {e}",
                               "is this a complete Hugging Face config?") from None


def read_hf_config(directory: Path, name: str | None = None) -> HFConfig:
    d = raw_config(directory)
    if d is None:
        raise EdgekitError(f"{directory}: config.json has no model_type", "not a Hugging Face model directory")
    cfg = HFConfig.from_raw(d, name or Path(directory).resolve().name)
    from edgekit.calibrate import gated_config  # a directory written by 'edgekit calibrate-skip'

    return gated_config(cfg, directory)


def load(directory: Path) -> HFCausalLM:
    """The transformers model (fp32, CPU, safetensors only) wrapped as an edgekit model."""
    directory = Path(directory)
    cfg = read_hf_config(directory)
    if not list(directory.glob("*.safetensors")):
        raise EdgekitError(f"{directory}: no *.safetensors weights", "edgekit never loads pickled .bin weights; "
                           "convert them to safetensors first")
    transformers = _require("transformers")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                               use_safetensors=True, attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise EdgekitError(f"cannot load {directory}: {str(e).splitlines()[0]}") from None
    if cfg.gated_layers:  # skip gates from 'edgekit calibrate-skip'
        from edgekit.calibrate import load_gated

        return load_gated(hf.eval(), cfg, directory)
    return HFCausalLM(hf.eval(), cfg)


def dense_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """Every expert on every token, combined with the routing weights (zero for unrouted experts):
    the same result as transformers' data-dependent dispatch, but a static graph with no expert left out."""
    n, e = hidden_states.shape[0], experts.num_experts
    weights = torch.zeros(n, e, dtype=top_k_weights.dtype, device=hidden_states.device)
    weights = weights.scatter(1, top_k_index, top_k_weights).t().unsqueeze(-1)  # [experts, tokens, 1]
    gate, up = torch.matmul(hidden_states.unsqueeze(0), experts.w_gate_up).chunk(2, dim=-1)  # [E, T, I] each
    out = torch.matmul(experts.act_fn(gate) * up, experts.w_down)  # [experts, tokens, d]
    return (out * weights.to(out.dtype)).sum(0).to(hidden_states.dtype)


class _DenseExperts(nn.Module):
    """Replaces a transformers experts module (3-D gate_up_proj [E, 2I, d] / down_proj [E, d, I]) by the dense
    forward, with the weights stored [E, in, out] so the graph is a plain batched MatMul on an initializer
    (no run-time Transpose, no Einsum): ONNX Runtime's dynamic quantizer then turns them into int8."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        self.w_gate_up = nn.Parameter(experts.gate_up_proj.detach().transpose(1, 2).contiguous())
        self.w_down = nn.Parameter(experts.down_proj.detach().transpose(1, 2).contiguous())

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return dense_experts_forward(self, hidden_states, top_k_index, top_k_weights)


class HFCausalLM(nn.Module):
    """A transformers causal LM behind edgekit's model interface."""

    def __init__(self, hf: nn.Module, cfg: HFConfig):
        super().__init__()
        self.hf = hf
        self.cfg = cfg
        # transformers renamed forward's `past_key_values` to `cache` (5.x; the old name goes in 5.40)
        self.cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
        if cfg.model_type == "deepseek_v3":
            for layer in hf.model.layers:
                experts = getattr(layer.mlp, "experts", None)
                if experts is not None and not isinstance(experts, _DenseExperts):
                    layer.mlp.experts = _DenseExperts(experts)

    @property
    def embed(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def empty_past(self, batch: int = 1, device=None, dtype=None):
        cfg = self.cfg
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        k = torch.zeros(batch, cfg.n_heads, 0, cfg.head_dim, dtype=dtype, device=device)
        v = torch.zeros(batch, cfg.n_heads, 0, cfg.value_dim, dtype=dtype, device=device)
        return [(k, v) for _ in range(cfg.n_layers)]

    def forward(self, input_ids: torch.Tensor, past=None, thresholds=None):
        """-> logits [B,S,V], presents (per layer (k, v) as the model caches them), executed (all True)."""
        from transformers import DynamicCache

        b, s = input_ids.shape
        past = past if past is not None else self.empty_past(b, input_ids.device)
        p = past[0][0].shape[2]
        cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past])
        pos = torch.arange(s, device=input_ids.device) + p  # [S]
        keys = torch.arange(p + s, device=input_ids.device)  # [P+S]
        dtype = self.embed.weight.dtype
        mask = torch.where(keys[None, :] <= pos[:, None], torch.zeros((), dtype=dtype),
                           torch.full((), torch.finfo(dtype).min, dtype=dtype))
        out = self.hf(input_ids=input_ids, attention_mask=mask[None, None].expand(b, 1, s, p + s),
                      position_ids=pos[None].expand(b, s), use_cache=True, **{self.cache_kw: cache})
        presents = [(layer.keys, layer.values) for layer in cache.layers]
        return out.logits, presents, torch.ones(self.cfg.n_layers, dtype=torch.bool, device=input_ids.device)


def check_experts(model: HFCausalLM, candidate, spec, tolerance: float = 1e-4, max_inputs: int = 8) -> dict | None:
    """MoE: feed seeded [4, 32] inputs until every routed expert of every MoE layer has been selected
    (routing counts from the PyTorch router), and require the graph's logits to match PyTorch's on all
    of them. A graph that dropped or froze an expert differs on the tokens routed to it, so this fails
    the export instead of warning. None for a model without routed experts."""
    import numpy as np

    gates = [layer.mlp.gate for layer in getattr(model.hf.model, "layers", []) if hasattr(layer.mlp, "gate")]
    if not gates:
        return None
    n_exp = gates[0].num_experts
    counts = torch.zeros(len(gates), n_exp, dtype=torch.long)

    def hook(j):
        def record(_module, _args, out):
            counts[j] += torch.bincount(out[-1].reshape(-1).cpu(), minlength=n_exp)
        return record

    handles = [g.register_forward_hook(hook(j)) for j, g in enumerate(gates)]
    worst, used = 0.0, 0
    try:
        for used in range(1, max_inputs + 1):
            feeds = spec.dummy(4, 32, 0, seed=300 + used)
            with torch.no_grad():
                want = model(torch.from_numpy(feeds["input_ids"]))[0].float().numpy()
            got = candidate.infer(feeds)["logits"]
            diff = float(np.abs(got.astype(np.float64) - want).max())
            worst = max(worst, diff)
            if diff > tolerance:
                raise EdgekitError(f"validation failed: MoE logits differ by {diff:.3g} > {tolerance:g} on inputs "
                                   "that reach every expert", "the exported graph dropped or froze an expert")
            if bool((counts > 0).all()):
                break
    finally:
        for h in handles:
            h.remove()
    missing = (counts == 0).nonzero().tolist()
    if missing:
        layer, expert = missing[0]
        raise EdgekitError(f"validation: {len(missing)} routed expert(s) never selected on {used} seeded inputs "
                           f"(e.g. MoE layer {layer} expert {expert}), so the graph cannot be shown to keep them",
                           "this is an edgekit limitation: report it with the model config")
    return {"moe_layers": len(gates), "experts": n_exp, "inputs": used, "min_tokens_per_expert": int(counts.min()),
            "max_abs_diff": worst, "passed": True}


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
        tokenizers = _require("tokenizers")
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
        transformers = _require("transformers")
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
