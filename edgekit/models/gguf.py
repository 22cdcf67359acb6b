"""GGUF files (llama.cpp's format) as edgekit models: a llama or qwen2 .gguf becomes a plain Hugging Face
directory (config.json, model.safetensors, tokenizer.json, chat template) once, in edgekit's cache, and
every command then treats it as that directory. No pickle anywhere.

transformers dequantizes the GGUF tensors to float (it needs the packages `gguf` and `accelerate`); the
model it returns carries a gguf quantizer that `save_pretrained` refuses, so its weights are copied into a
model built from the same config without `quantization_config`. The architecture is read from the GGUF
metadata first, so an unsupported file is refused before anything heavy is loaded.
"""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError, require
from edgekit.hfconfig import gguf_cache_dir

SUPPORTED = ("llama", "qwen2")


def architecture(path: Path) -> str:
    """general.architecture from the GGUF metadata (memory-mapped; no tensor data is read)."""
    gguf = require("gguf", "gguf")
    try:
        reader = gguf.GGUFReader(str(path), "r")
        field = reader.get_field("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as e:  # the reader raises ValueError / struct errors / its own types on a bad file
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise EdgekitError(f"{path}: not a readable GGUF file ({why})",
                           "pass a .gguf file written by llama.cpp or Hugging Face") from None
    if not arch:
        raise EdgekitError(f"{path}: the GGUF metadata has no general.architecture", "is this a complete GGUF file?")
    return str(arch)


def convert(path: Path, out: Path) -> dict:
    """Write a plain fp32 Hugging Face directory for a llama / qwen2 GGUF file at `out` (atomically)."""
    from edgekit.artifact import staging

    path, out = Path(path), Path(out)
    arch = architecture(path)
    if arch not in SUPPORTED:
        raise EdgekitError(f"{path.name}: GGUF architecture '{arch}' is not supported",
                           f"edgekit reads {' and '.join(SUPPORTED)} GGUF files")
    require("accelerate", "gguf")
    torch = require("torch")
    transformers = require("transformers")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                   dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise EdgekitError(f"cannot load {path.name} through transformers: {str(e).splitlines()[0]}") from None
    raw = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    cfg = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False, assign=True)
    plain.tie_weights()  # a tied head: one tensor in the saved file
    buffers = dict(loaded.named_buffers())  # non-persistent buffers (rotary inv_freq) are not in the state_dict
    for name, b in list(plain.named_buffers()):
        if b.is_meta and name in buffers:
            owner, _, attr = name.rpartition(".")
            module = plain.get_submodule(owner) if owner else plain
            module.register_buffer(attr, buffers[name].detach().clone(),
                                   persistent=attr not in module._non_persistent_buffers_set)
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise EdgekitError(f"{path.name}: tensors missing after conversion, e.g. {left[0]}",
                           "this is an edgekit limitation: report it with the file's architecture")
    with staging(out, force=False) as tmp:
        plain.eval().save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if not (tmp / "tokenizer.json").is_file():
            raise EdgekitError(f"{path.name}: its tokenizer could not be saved as tokenizer.json",
                               "this is an edgekit limitation: report it with the file's architecture")
    return {"gguf": str(path), "architecture": arch, "out": str(out),
            "parameters": sum(p.numel() for p in plain.parameters())}


def source(target: str | Path) -> str | Path:
    """`target` itself, or for a .gguf file the Hugging Face directory it converts to (converted once,
    cached under EDGEKIT_CACHE or ~/.cache/edgekit, keyed by the file's sha256)."""
    path = Path(target)
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return target
    out = gguf_cache_dir(path)
    if not out.is_dir():
        from edgekit.progress import progress

        with progress(f"converting {path.name} to a Hugging Face directory (once; cached in {out.parent})") as advance:
            convert(path, out)
            advance(1)
    return out
