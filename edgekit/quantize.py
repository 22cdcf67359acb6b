"""PyTorch int8 dynamic quantization of the x@W Linear layers, as a safetensors checkpoint.

Stored as int8 weights [in, out] + per-output-channel fp32 scales (no pickled packed params); on
load each Linear becomes torch.ao's dynamic int8 Linear (fbgemm on x86, qnnpack on ARM), which
quantizes activations per call. Shared R1 blocks are quantized once and stay shared.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from edgekit.models import CausalLM
from edgekit.models.layers import Linear

METHOD = "torch-dynamic-int8"


def int8_state(model: CausalLM) -> dict[str, torch.Tensor]:
    """State dict with every Linear weight replaced by `<name>.weight_int8` and `<name>.weight_scale`."""
    state = {}
    linears = {n for n, m in model.named_modules() if isinstance(m, Linear)}
    for name, t in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in linears and leaf == "weight":
            scale = (t.abs().amax(0) / 127).clamp(min=1e-12)  # [out]
            state[f"{owner}.weight_int8"] = torch.round(t / scale).clamp(-127, 127).to(torch.int8).contiguous()
            state[f"{owner}.weight_scale"] = scale.float().contiguous()
        else:
            state[name] = t.contiguous()
    return state


class Int8Linear(nn.Module):
    """y = x @ W with W int8 per output channel; activations quantized dynamically per call."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        d_in, d_out = q.shape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q.t().contiguous(), scale.double(),
                                                          torch.zeros(d_out, dtype=torch.long), 0)
        self.inner = DynamicLinear(d_in, d_out, bias_=bias is not None)
        self.inner.set_weight_bias(qw, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float())


def load_int8(model: CausalLM, state: dict[str, torch.Tensor]) -> CausalLM:
    """Fill a meta-device model from an int8 state: Linears become Int8Linear, the rest is assigned."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear):
            bias = state.pop(f"{name}.bias", None)
            q, scale = state.pop(f"{name}.weight_int8"), state.pop(f"{name}.weight_scale")
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, Int8Linear(q, scale, bias))
    for name, t in state.items():  # the rest (embedding, norms, tables, gates) stays fp32
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, nn.Parameter(t, requires_grad=False))
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        from edgekit.errors import EdgekitError

        raise EdgekitError(f"int8 checkpoint is missing {leftover[:3]}", "quantize the model again")
    model.quantized = True
    return model.eval()
