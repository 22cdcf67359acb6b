"""Loading PyTorch models: edgekit checkpoints (a directory with config.json + model.safetensors) and
whatever a resolved target names (load_model). Loading never unpickles."""

from __future__ import annotations

import errno
from pathlib import Path

import torch

from edgekit.config import CONFIG, read_config
from edgekit.errors import EdgekitError
from edgekit.models import CausalLM, build

WEIGHTS = "model.safetensors"


def save_checkpoint(model: CausalLM, directory: Path, int8: bool = False) -> None:
    """Write config.json and model.safetensors into an existing directory (use artifact.staging).

    int8=True stores the torch dynamic-int8 form (edgekit.quantize): int8 weights + scales."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file, save_model

    from edgekit.artifact import dumps, os_error

    directory = Path(directory)
    try:
        (directory / CONFIG).write_text(dumps(model.cfg.to_dict(), indent=1))
        if int8:
            from edgekit.quantize import METHOD, int8_state

            save_file(int8_state(model), str(directory / WEIGHTS), metadata={"quantization": METHOD})
        else:
            save_model(model, str(directory / WEIGHTS))
    except OSError as e:
        raise os_error(e, directory / WEIGHTS) from None
    except SafetensorError as e:  # safetensors reports the OS error inside its own message
        text = str(e)
        if "No space left" in text or "code: 28" in text or "StorageFull" in text:
            raise os_error(OSError(errno.ENOSPC, "No space left on device"), directory / WEIGHTS) from None
        raise EdgekitError(f"cannot write {directory / WEIGHTS}: {text.splitlines()[0] if text else e!r}") from None


def load_checkpoint(directory: Path, device: str = "cpu") -> CausalLM:
    """Build the model from config.json and fill it from model.safetensors, strictly."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg = read_config(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise EdgekitError(f"{directory}: no {WEIGHTS}", "save the checkpoint again with edgekit")
    try:
        state = load_file(str(weights), device=device)
        with safe_open(str(weights), "pt") as f:
            quantization = (f.metadata() or {}).get("quantization")
    except (SafetensorError, OSError, ValueError) as e:
        raise EdgekitError(f"{weights} is corrupt or truncated: {e}", "copy or save it again") from None
    model = build(cfg, device="meta")
    if quantization:
        from edgekit.quantize import load_int8

        return load_int8(model, state)
    expected = model.state_dict()
    # save_model drops aliases of shared tensors; fill them from the kept name
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise EdgekitError(f"{weights} does not match config.json: missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}", "the weights and the config come from different models")
    for name, t in state.items():
        if t.is_floating_point() != expected[name].is_floating_point():
            raise EdgekitError(f"{weights}: {name} has dtype {str(t.dtype).removeprefix('torch.')}, expected a "
                               f"{'floating-point' if expected[name].is_floating_point() else 'integer'} tensor",
                               "the weights file is damaged or not an edgekit checkpoint; save it again")
        if t.shape != expected[name].shape:
            raise EdgekitError(f"{weights}: {name} has shape {tuple(t.shape)}, config.json implies "
                               f"{tuple(expected[name].shape)}",
                               "the weights and the config come from different models")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(torch.float32).eval()


def load_model(res) -> CausalLM:
    """The PyTorch model behind a resolved preset, checkpoint or Hugging Face directory (fp32, CPU)."""
    if res.model is not None:
        return res.model
    if res.kind == "preset":
        return build(res.cfg)
    if res.kind == "checkpoint":
        return load_checkpoint(res.path)
    if res.kind == "hf":
        from edgekit.models.hf import load

        return load(res.path)
    raise EdgekitError(f"{res.path} is an exported {res.kind} artifact, not a PyTorch model",
                       "pass a preset name or a checkpoint directory")
