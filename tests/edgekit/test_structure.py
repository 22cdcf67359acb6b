"""edgekit.structure: a model's parameters from its config, without torch, equal to the torch model's."""

from __future__ import annotations

import pytest

from edgekit.config import PRESETS
from edgekit.errors import EdgekitError, missing_library, require


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameters_match_the_model_built_on_meta(name):
    from edgekit import structure
    from edgekit.models import build, param_counts
    from edgekit.models.layers import Linear

    cfg = PRESETS[name]
    model = build(cfg, device="meta")
    linear = {f"{m}.weight" if m else "weight" for m, mod in model.named_modules() if isinstance(mod, Linear)}
    expected = {n: (tuple(p.shape), n in linear) for n, p in model.named_parameters()}
    assert structure.parameters(cfg) == expected
    assert sum(structure.numel(s) for s, _ in structure.parameters(cfg).values()) == param_counts(model)["unique"]


def test_weight_traffic_needs_no_torch():
    """The profile's weight traffic for V3/R1 comes from edgekit.structure: a device (no torch) counts it too."""
    import subprocess
    import sys

    code = ("import sys\nfrom edgekit.config import preset\nfrom edgekit.profiling.roofline import weight_traffic\n"
            "t = weight_traffic(preset('r1-tiny'), 'int8', 2, [0.5] * 4)\n"
            "assert t['weight_bytes_per_decode_step'] < t['weight_bytes_stored'] * 2, t\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_missing_library_names_its_extra():
    with pytest.raises(EdgekitError, match=r"^torch_not_here is not installed; .*\(pip install 'edgekit\[export\]'\)$"):
        require("torch_not_here.nn", "export")
    e = missing_library(ModuleNotFoundError("No module named 'torch'", name="torch"))
    assert str(e).endswith("(pip install 'edgekit[export]')") and "\n" not in str(e)
    assert str(missing_library(ModuleNotFoundError("x", name="matplotlib.figure"))).endswith("'edgekit[plot]')")
    assert missing_library(ModuleNotFoundError("x", name="numpy")) is None  # a base dependency: a real bug
