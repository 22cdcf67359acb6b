"""The device install (pyproject's base dependencies, `pip install .` or `.[device]`): a fresh venv with only
those verifies, installs, runs and profiles an ONNX bundle, never imports torch & co., and is small.

The venv gets the base dependencies from pyproject.toml (through pip's cache) and the source tree through a
.pth file; the bundle is made here, with the full install (the tiny exported V3 of conftest)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "onnxscript", "onnx", "transformers", "safetensors", "matplotlib")
LIMIT_MB = 300


def base_dependencies() -> list[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["optional-dependencies"]["device"] == [], "the device extra is the base install"
    return project["dependencies"]


def test_base_install_has_no_export_libraries():
    names = {d.split(">")[0].split("=")[0].split(";")[0].strip().lower() for d in base_dependencies()}
    assert not names & set(HEAVY), names & set(HEAVY)
    assert {"onnxruntime", "numpy", "tokenizers", "cryptography", "typer", "rich", "psutil"} <= names


# runs the CLI in-process in the device venv, then reports which heavy libraries got imported
CLI = """
import json, sys
from edgekit import cli
status = sys.argv[2]
sys.argv = ["edgekit", *json.loads(sys.argv[1])]
code = 0
try:
    cli.main()
except SystemExit as e:
    code = e.code if isinstance(e.code, int) else 1
with open(status, "w") as f:
    json.dump({"code": code, "loaded": sorted(m for m in HEAVY if m in sys.modules)}, f)
""".replace("HEAVY", repr(HEAVY))


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                          "--disable-pip-version-check", *base_dependencies()], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "edgekit-source.pth").write_text(str(ROOT) + "\n")
    return venv


def device(venv: Path, *args) -> tuple[int, str, str, list[str]]:
    """(exit code, stdout, stderr, heavy modules imported) of `edgekit ARGS` in the device venv."""
    status = venv.parent / "status.json"
    p = subprocess.run([str(venv / "bin" / "python"), "-c", CLI, json.dumps([str(a) for a in args]), str(status)],
                       capture_output=True, text=True, cwd=venv.parent,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(venv.parent), "EDGEKIT_QUIET": "1"})
    assert status.is_file(), p.stderr[-3000:]
    result = json.loads(status.read_text())
    status.unlink()
    return result["code"], p.stdout, p.stderr, result["loaded"]


@pytest.mark.slow
def test_device_venv_verifies_installs_runs_and_profiles_a_bundle_without_torch(device_venv, onnx_v3_tiny,
                                                                                  tmp_path):
    from edgekit import bundle as bundles

    keys = bundles.keygen(tmp_path / "keys")
    bundle = tmp_path / "v3-tiny.tar.gz"
    bundles.package(onnx_v3_tiny, "cpu", bundle, sign_key=keys["private_key"])
    python = device_venv / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0

    key = ("--public-key", keys["public_key"])
    code, out, err, loaded = device(device_venv, "verify", bundle, *key)
    assert (code, loaded) == (0, []) and "signature: valid" in out, err
    installed = tmp_path / "installed"
    code, out, err, loaded = device(device_venv, "install", bundle, "--dest", installed, *key)
    assert (code, loaded) == (0, []), err
    code, out, err, loaded = device(device_venv, "run", installed, "--prompt", "the edge", "--max-new-tokens", "4",
                                    "--json", *key)
    assert (code, loaded) == (0, []), err
    assert len(json.loads(out)["tokens"]) == 4
    code, out, err, loaded = device(device_venv, "profile", installed, "--prompt-len", "8", "--new-tokens", "4",
                                    "--warmup", "0", "--runs", "1", "--no-energy", "--json")
    assert (code, loaded) == (0, []), err
    report = json.loads(out)
    assert report["size"]["weight_bytes_stored"] > 0 and report["latency"]["measured_runs"] == 1

    # exporting on the device install: one line naming the extra to install, nothing written
    code, out, err, _ = device(device_venv, "export", "v3-tiny", "--out", tmp_path / "x")
    assert code == 1 and err.count("\n") == 1 and err.endswith("(pip install 'edgekit[export]')\n"), err
    assert not (tmp_path / "x").exists()

    size = subprocess.run(["du", "-sm", str(device_venv)], capture_output=True, text=True, check=True)
    assert int(size.stdout.split()[0]) <= LIMIT_MB, size.stdout
