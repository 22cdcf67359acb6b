"""edgekit.quiet: third-party warnings, logging and C-level output go to the log file; edgekit's own lines not."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHILD = r"""
import logging, os, sys, warnings
from edgekit import quiet
quiet.set_verbose(len(sys.argv) > 2)
with quiet.captured(sys.argv[1], "test") as log:
    warnings.warn("a python warning", FutureWarning)
    logging.warning("root logger line")
    logging.getLogger("lib").error("a library logger line")
    os.write(2, b"C++ wrote to fd 2\n")
    os.write(1, b"C++ wrote to fd 1\n")
    print("edgekit's own line", file=sys.stderr)
    log.close()
    warnings.warn("after close", UserWarning)
print("stdout after", flush=True)
logging.warning("root after")
"""


def run(tmp_path, *extra):
    log = tmp_path / "logs" / "export.log"
    p = subprocess.run([sys.executable, "-c", CHILD, str(log), *extra], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p, log.read_text()


def test_third_party_output_goes_to_the_log(tmp_path):
    p, log = run(tmp_path)
    for line in ("a python warning", "root logger line", "a library logger line", "C++ wrote to fd 2",
                 "C++ wrote to fd 1"):
        assert line in log and line not in p.stderr + p.stdout, line
    assert "edgekit's own line" in p.stderr and "edgekit's own line" not in log
    assert "after close" in p.stderr and "after close" not in log  # close() ends the capture
    assert "stdout after" in p.stdout and "root after" in p.stderr  # descriptors and logging restored


def test_verbose_shows_them_live(tmp_path):
    p, log = run(tmp_path, "--verbose")
    assert "a python warning" in p.stderr and "C++ wrote to fd 2" in p.stderr and "C++ wrote to fd 1" in p.stdout
    assert "--verbose" in log


@pytest.mark.slow
def test_int8_export_prints_only_its_stages_and_summary(tmp_path):
    """Through the CLI, as a user runs it (a pipe, not a terminal): stderr holds one line per stage with its
    elapsed time and nothing from torch, onnxscript or ONNX Runtime; those are in logs/export.log, which the
    manifest lists and hashes like every other file."""
    import os
    import re

    from edgekit.artifact import read_manifest

    env = {k: v for k, v in os.environ.items() if k not in ("EDGEKIT_QUIET", "EDGEKIT_VERBOSE")}
    out = tmp_path / "v3-int8"
    p = subprocess.run([sys.executable, "-m", "edgekit.cli", "export", "v3-tiny", "--int8", "--out", str(out)],
                       capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stderr.splitlines()
    assert len(lines) >= 3 and all(re.fullmatch(r"[a-z].* {2}\d+\.\ds", line) for line in lines), p.stderr
    assert p.stdout.startswith(f"wrote {out}") and "Warning" not in p.stdout, p.stdout
    manifest = read_manifest(out)  # every hash checks, the log's too
    assert "logs/export.log" in manifest["files"]
    assert (out / "logs" / "export.log").read_text().startswith("# edgekit export")
