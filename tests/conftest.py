"""Shared fixtures. ONNX exports are slow (each R1 `If` costs ~20 s of torch.export time on a
2-core machine), so each tiny artifact is exported once per test session and shared."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("EDGEKIT_QUIET", "1")


def _export(tmp_path_factory, name: str, int8: bool = False):
    from edgekit import api

    out = tmp_path_factory.mktemp("artifacts") / f"{name}{'-int8' if int8 else ''}"
    api.export(name, "onnx", out, int8=int8)
    return out


@pytest.fixture(scope="session")
def onnx_r1_tiny(tmp_path_factory):
    return _export(tmp_path_factory, "r1-tiny")


@pytest.fixture(scope="session")
def onnx_v3_tiny(tmp_path_factory):
    return _export(tmp_path_factory, "v3-tiny")


@pytest.fixture(scope="session")
def onnx_r1_tiny_int8(tmp_path_factory):
    return _export(tmp_path_factory, "r1-tiny", int8=True)


@pytest.fixture(scope="session")
def onnx_v3_tiny_int8(tmp_path_factory):
    return _export(tmp_path_factory, "v3-tiny", int8=True)


@pytest.fixture
def cli():
    """Invoke the edgekit CLI in-process: returns (exit_code, stdout, stderr)."""
    import contextlib
    import io

    from edgekit import cli as cli_module

    def run(*args: str):
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            import sys

            argv, sys.argv = sys.argv, ["edgekit", *map(str, args)]
            try:
                cli_module.main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            finally:
                sys.argv = argv
        return code, out.getvalue(), err.getvalue()

    return run
