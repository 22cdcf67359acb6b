"""Version strings of the device stack (TensorRT, JetPack, GPU SM): one parser and one compatibility rule.

Layer 1 (no torch, no project imports): `edgekit build-engine`, `edgekit install`, the TensorRT runner, the
exporter's operator tables and the device profiles all ask these functions, so they cannot disagree.
"""

from __future__ import annotations

import re

_LEADING = re.compile(r"\d+(?:\.\d+)*")


def version_tuple(v) -> tuple[int, ...]:
    """The leading numeric release of a version string: '10.3' -> (10, 3); '10.3.0.26' -> (10, 3, 0, 26);
    '8.x' and '10' -> (8,) and (10,) (a whole major); '10.3.0+cuda12.6', '36.4.0-b12', '1.2rc1' -> the
    numbers before the first non-numeric part; no leading number -> ()."""
    m = _LEADING.match(str(v).strip().removeprefix("v"))
    return tuple(int(p) for p in m.group().split(".")) if m else ()


def compatible(installed, targets) -> bool:
    """Whether the `installed` TensorRT (or JetPack) can build this machine's engine from a recipe made for one
    of `targets` (a version string or a list of them). The one rule of `edgekit build-engine` and `edgekit
    install`; the SM is checked separately.

    Rule: same release line, patch and build ignored --
      a target with a major only ('10', '10.x') accepts any installed version of that major;
      any other target accepts an installed version with the same major.minor ('8.6.2' accepts 8.6.1, 8.6.2.3).

    Why major.minor: the recipe's operator check is made per TensorRT minor release (exporters/trt_ops.toml:
    the ONNX parser's operator support changes with minor releases, not patches), and the engine itself is
    built here, by the installed TensorRT, so a patch difference cannot make the built engine wrong. A
    JetPack minor release fixes its TensorRT minor (5.1.x: 8.5, 6.0: 8.6, 6.1/6.2: 10.3), so the same rule
    holds for JetPack. (Loading an engine that is already built is stricter: see engine_loadable().)
    """
    have = version_tuple(installed)
    if not have:
        return False
    for target in [targets] if isinstance(targets, str | int | float) else targets:
        want = version_tuple(target)[:2]
        if want and have[:len(want)] == want:
            return True
    return False


def engine_loadable(installed, built) -> bool:
    """Whether the `installed` TensorRT can deserialize an engine that TensorRT `built` serialized. Stricter
    than compatible(): TensorRT refuses a plan file from any other TensorRT release, patch and build
    included ('expecting library version 10.3.0.26 got 10.3.0.30'), unless the engine was built
    version-compatible, which edgekit does not do. So every component `built` names must match."""
    want, have = version_tuple(built), version_tuple(installed)
    return bool(want) and have[:len(want)] == want

