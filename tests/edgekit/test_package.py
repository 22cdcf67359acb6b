"""IoT bundles: package -> verify -> install -> run, and every way a bundle can be bad.

Every bad input is a real bundle made by `edgekit package` and then damaged; each must give a
one-line error, exit 1, write nothing outside dest and leave dest as it was.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgekit import api
from edgekit import bundle as bundles
from edgekit.artifact import staging, write_manifest
from edgekit.bundle import compat, deploy
from edgekit.errors import EdgekitError

PROMPT = "the edge"
THRESHOLD = 0.7  # not the preset's default: proves the bundle's settings reach the runner
JETSON = "jetson-orin-nano-8gb"


# ---------------------------------------------------------------------------------------------
# fixtures: one checkpoint artifact, one key pair, one signed bundle per module
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("package")


@pytest.fixture(scope="module")
def artifact(work) -> Path:
    """A checkpoint artifact of r1-tiny, plus the reports a device bundle should carry."""
    from edgekit.checkpoint import save_checkpoint
    from edgekit.models import build
    from edgekit.tokenizer import ByteTokenizer

    out = work / "r1-tiny"
    with staging(out) as tmp:
        save_checkpoint(build("r1-tiny"), tmp)
        ByteTokenizer().save(tmp)
        write_manifest(tmp, format="checkpoint", model="r1-tiny")
        (tmp / "profile.json").write_text(json.dumps({"decode_tok_s": 1.0}))
        (tmp / "reports").mkdir()
        (tmp / "reports" / "validation.json").write_text(json.dumps({"ok": True}))
    return out


@pytest.fixture(scope="module")
def keys(work) -> dict:
    return bundles.keygen(work / "keys")


@pytest.fixture(scope="module")
def other_keys(work) -> dict:
    return bundles.keygen(work / "other-keys")


@pytest.fixture(scope="module")
def bundle(work, artifact, keys) -> Path:
    out = work / "r1-tiny.tar.gz"
    bundles.package(artifact, "cpu", out, sign_key=keys["private_key"], threshold=THRESHOLD)
    return out


@pytest.fixture(scope="module")
def direct(artifact) -> dict:
    """What the artifact gives when run directly, with the settings the bundle carries."""
    return api.generate(artifact, PROMPT, max_new_tokens=8, threshold=THRESHOLD)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def members_of(path: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(path, "r:gz") as tf:
        return [(m, tf.extractfile(m).read() if m.isreg() else None) for m in tf.getmembers()]


def write_members(path: Path, members) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m, data in members:
            if data is not None:
                m.size = len(data)
            tf.addfile(m, io.BytesIO(data) if data is not None else None)
    return path


def with_member(bundle: Path, out: Path, name: str, data: bytes | None = b"x", **attrs) -> Path:
    ti = tarfile.TarInfo(name)
    for k, v in attrs.items():
        setattr(ti, k, v)
    return write_members(out, [*members_of(bundle), (ti, data)])


def replace_member(bundle: Path, out: Path, name: str, edit) -> Path:
    members = [(m, edit(d) if m.name == name else d) for m, d in members_of(bundle)]
    return write_members(out, members)


def flip(data: bytes, at: int | None = None) -> bytes:
    at = len(data) // 2 if at is None else at
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1:]


def sign_with(private_key_path: str, manifest_bytes: bytes) -> bytes:
    key = bundles.load_private_key(private_key_path)
    return json.dumps({"algorithm": "ed25519", "key_id": bundles.key_id(key.public_key()),
                       "signature": base64.b64encode(key.sign(manifest_bytes)).decode()}).encode()


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a digest of its content: 'nothing written, nothing changed'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------
# round trip and reproducibility
# ---------------------------------------------------------------------------------------------


def test_round_trip_cli_gives_the_artifacts_greedy_tokens(cli, tmp_path, artifact, direct):
    code, out, err = cli("keygen", "--out", tmp_path / "keys")
    assert code == 0, err
    assert "key id" in out
    assert oct((tmp_path / "keys" / "edgekit.key").stat().st_mode & 0o777) == "0o600"

    b = tmp_path / "bundle.tar.gz"
    code, out, err = cli("package", artifact, "--device", "cpu", "--out", b, "--sign-key",
                         tmp_path / "keys" / "edgekit.key", "--threshold", THRESHOLD, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["settings"] == {"runtime": "torch", "threads": None, "threshold": THRESHOLD}
    assert r["signed"].startswith("ed25519 key")

    code, out, err = cli("verify", b, "--public-key", tmp_path / "keys" / "edgekit.pub")
    assert code == 0, err
    assert "signature: valid" in out and "none missing, none extra" in out and "manifest.json" in out

    dest = tmp_path / "device" / "model"
    code, out, err = cli("install", b, "--dest", dest, "--public-key", tmp_path / "keys" / "edgekit.pub")
    assert code == 0, err
    assert "installed r1-tiny" in out and "machine: memory" in out
    assert sorted(p.name for p in tmp_path.joinpath("device").iterdir()) == ["model"]  # no temporary left
    assert oct(dest.stat().st_mode & 0o777) == "0o755"
    for report in ("profile.json", "reports/validation.json", "tokenizer.json", "bundle.sig"):
        assert (dest / report).is_file(), report

    for target in (dest, b):
        code, out, err = cli("run", target, "--prompt", PROMPT, "--max-new-tokens", 8, "--json",
                             "--public-key", tmp_path / "keys" / "edgekit.pub")
        assert code == 0, err
        r = json.loads(out)
        assert r["tokens"] == direct["tokens"]
        assert (r["runtime"], r["layer_runs"], r["skipped"]) == ("torch", direct["layer_runs"], direct["skipped"])
    # an installed bundle is still a plain artifact directory
    assert api.generate(dest, PROMPT, max_new_tokens=8, threshold=THRESHOLD)["tokens"] == direct["tokens"]


def test_round_trip_onnx(onnx_r1_tiny, tmp_path, keys):
    """The exported ONNX artifact: onnxruntime on the device, same greedy tokens as the artifact itself."""
    b = tmp_path / "onnx.tar.gz"
    r = bundles.package(onnx_r1_tiny, "cpu", b, sign_key=keys["private_key"])
    assert r["settings"]["runtime"] == "onnxruntime"
    dest = tmp_path / "dest"
    bundles.install(b, dest, public_key=keys["public_key"])
    got = bundles.run(dest, PROMPT, max_new_tokens=6, public_key=keys["public_key"])
    want = api.generate(onnx_r1_tiny, PROMPT, max_new_tokens=6)
    assert got["runtime"] == "onnxruntime"
    assert got["tokens"] == want["tokens"] and got["skipped"] == want["skipped"]


def test_two_packages_of_the_same_artifact_are_byte_identical(tmp_path, artifact, keys, bundle):
    again = tmp_path / "again.tar.gz"
    bundles.package(artifact, "cpu", again, sign_key=keys["private_key"], threshold=THRESHOLD)
    assert again.read_bytes() == bundle.read_bytes()
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    bundles.package(artifact, "cpu", a)
    bundles.package(artifact, "cpu", b)
    assert a.read_bytes() == b.read_bytes()
    # signing adds bundle.sig and changes nothing else
    signed = {m.name: d for m, d in members_of(bundle)}
    unsigned = {m.name: d for m, d in members_of(a)}
    assert set(signed) - set(unsigned) == {"bundle.sig"}
    assert json.loads(signed["bundle.json"])["settings"]["threshold"] == THRESHOLD
    for m, _ in members_of(bundle):
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_bundle_manifest_lists_everything(bundle, artifact):
    manifest = json.loads(dict((m.name, d) for m, d in members_of(bundle))["bundle.json"])
    names = [m.name for m, _ in members_of(bundle)]
    assert names[:2] == ["bundle.json", "bundle.sig"] and names[2:] == sorted(names[2:])
    assert set(manifest["files"]) == set(names) - {"bundle.json", "bundle.sig"}
    for rel, meta in manifest["files"].items():
        p = artifact / rel
        assert meta == {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
    assert {"profile.json", "reports/validation.json"} <= set(manifest["extras"])
    assert manifest["versions"]["python"] and "torch" in manifest["versions"]
    compat = manifest["compatibility"]
    assert compat["device"] == "cpu" and compat["min_memory_bytes"] > 0 and compat["min_memory_source"]


def test_verify_without_key_says_the_signature_was_not_checked(cli, bundle):
    code, out, err = cli("verify", bundle)
    assert code == 0, err
    assert "not checked" in out


def test_every_command_has_help():
    from edgekit.cli import app

    runner = CliRunner()
    for cmd in ("keygen", "package", "verify", "install", "run"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0, r.output
        assert "Usage" in r.output


# ---------------------------------------------------------------------------------------------
# bad bundles: one-line error, exit 1, nothing written outside dest, dest unchanged
# ---------------------------------------------------------------------------------------------


def _truncated(b, out, ctx):
    out.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
    return out


def _flipped_model(b, out, ctx):
    return replace_member(b, out, "model.safetensors", flip)


def _edited_manifest(b, out, ctx):
    def edit(data):
        m = json.loads(data)
        m["settings"]["threshold"] = 0.0  # would run every layer: a plausible tampering
        return json.dumps(m).encode()

    return replace_member(b, out, "bundle.json", edit)


def _manifest_rehashed_for_a_flipped_model(b, out, ctx):
    """bundle.json rewritten to match a changed model (unsigned): the artifact's manifest.json disagrees."""
    members = members_of(b)
    model = flip(dict((m.name, d) for m, d in members)["model.safetensors"])
    out_members = []
    for m, d in members:
        if m.name == "bundle.sig":
            continue
        if m.name == "model.safetensors":
            d = model
        elif m.name == "bundle.json":
            j = json.loads(d)
            j["files"]["model.safetensors"]["sha256"] = hashlib.sha256(model).hexdigest()
            d = json.dumps(j).encode()
        out_members.append((m, d))
    return write_members(out, out_members)


def _edited_artifact_manifest(b, out, ctx):
    return replace_member(b, out, "manifest.json", lambda d: d.replace(b'"r1-tiny"', b'"r1-fake"'))


def _other_key(b, out, ctx):
    manifest = dict((m.name, d) for m, d in members_of(b))["bundle.json"]
    return replace_member(b, out, "bundle.sig", lambda d: sign_with(ctx["other_key"], manifest))


def _unsigned(b, out, ctx):
    return write_members(out, [(m, d) for m, d in members_of(b) if m.name != "bundle.sig"])


def _escape(b, out, ctx):
    return with_member(b, out, "../evil.txt")


def _absolute(b, out, ctx):
    return with_member(b, out, str(ctx["outside"]))


def _symlink(b, out, ctx):
    return with_member(b, out, "link", None, type=tarfile.SYMTYPE, linkname=str(ctx["outside"]))


def _hardlink(b, out, ctx):
    return with_member(b, out, "hard", None, type=tarfile.LNKTYPE, linkname="config.json")


def _device_file(b, out, ctx):
    return with_member(b, out, "null", None, type=tarfile.CHRTYPE, devmajor=1, devminor=3)


def _extra_file(b, out, ctx):
    return with_member(b, out, "extra.txt", b"not listed")


def _missing_file(b, out, ctx):
    return write_members(out, [(m, d) for m, d in members_of(b) if m.name != "tokenizer.json"])


def _duplicate(b, out, ctx):
    return with_member(b, out, "config.json", b"{}")


def _not_gzip(b, out, ctx):
    out.write_bytes(b"PK\x03\x04 this is a zip, not a bundle")
    return out


BAD = {
    "truncated": (_truncated, ["truncated or not a bundle"]),
    "flipped byte in model": (_flipped_model, ["'model.safetensors' does not match its sha256"]),
    "edited manifest": (_edited_manifest, ["signature does not match bundle.json"]),
    "manifest rehashed": (_manifest_rehashed_for_a_flipped_model, ["does not match the artifact manifest.json"]),
    "edited artifact manifest": (_edited_artifact_manifest, ["'manifest.json' does not match its sha256"]),
    "signed by another key": (_other_key, ["signed by another key"]),
    "unsigned": (_unsigned, ["is not signed, but a public key was given"]),
    "path escaping dest": (_escape, ["'../evil.txt' escapes the destination"]),
    "absolute path": (_absolute, ["has an absolute path"]),
    "symlink": (_symlink, ["'link' is a symbolic link"]),
    "hardlink": (_hardlink, ["'hard' is a hard link"]),
    "device file": (_device_file, ["'null' is a device file"]),
    "extra file": (_extra_file, ["'extra.txt' is not listed in bundle.json"]),
    "missing file": (_missing_file, ["'tokenizer.json' listed in bundle.json is missing"]),
    "duplicate member": (_duplicate, ["'config.json' appears twice"]),
    "not gzip": (_not_gzip, ["truncated or not a bundle"]),
}
KEY_ONLY = {"edited manifest", "signed by another key", "unsigned"}  # without a key, nothing to check them by
NO_KEY_ONLY = {"manifest rehashed"}  # unsigned, so with a key it is the "unsigned" case


@pytest.mark.parametrize("case", list(BAD))
def test_bad_bundle_is_refused(case, cli, tmp_path, bundle, keys, other_keys):
    make, fragments = BAD[case]
    outside = tmp_path.parent / f"edgekit-outside-{os.getpid()}-{tmp_path.name}"
    bad = make(bundle, tmp_path / "bad.tar.gz", {"other_key": other_keys["private_key"], "outside": outside})
    work = tmp_path / "device"
    work.mkdir()
    dest = work / "model"
    before = snapshot(tmp_path)
    key_sets = ([] if case in NO_KEY_ONLY else [("--public-key", keys["public_key"])]) + \
        ([] if case in KEY_ONLY else [()])
    for key in key_sets:
        for args in (("verify", bad), ("install", bad, "--dest", dest), ("run", bad, "--prompt", "x")):
            unsigned = ("--allow-unsigned",) if not key and args[0] != "verify" else ()
            code, out, err = cli(*args, *key, *unsigned)
            one_line_error(code, err, *fragments)
            assert not dest.exists()
            assert snapshot(tmp_path) == before
            assert not outside.exists() and not outside.is_symlink()


def test_member_checks_also_guard_extraction(tmp_path, bundle):
    """install re-checks every member while extracting (the file may change after verify)."""
    for name, attrs in (("../evil.txt", {}), ("link", {"type": tarfile.SYMTYPE, "linkname": "/etc"})):
        bad = with_member(bundle, tmp_path / "bad.tar.gz", name, None if attrs else b"x", **attrs)
        listed = {m.name: {} for m, _ in members_of(bad)}
        with pytest.raises(EdgekitError, match="bundles hold only regular files"):
            deploy._extract(bad, tmp_path / "x", listed)
        assert not (tmp_path / "evil.txt").exists()


def test_existing_dest_is_refused_and_left_unchanged(cli, tmp_path, bundle, keys):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    code, out, err = cli("install", bundle, "--dest", dest, "--allow-unsigned")
    one_line_error(code, err, "already exists", "--force")
    # --force replaces only an installed bundle or an empty directory, never arbitrary data
    code, out, err = cli("install", bundle, "--dest", dest, "--force", "--allow-unsigned")
    one_line_error(code, err, "is not an installed bundle")
    assert snapshot(tmp_path) == before
    # an installed bundle can be replaced with --force
    shutil.rmtree(dest)
    assert cli("install", bundle, "--dest", dest, "--public-key", keys["public_key"])[0] == 0
    code, out, err = cli("install", bundle, "--dest", dest, "--force", "--public-key", keys["public_key"])
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


_FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.argv = ["edgekit", *sys.argv[2:]]
from edgekit.cli import main
main()
"""


def test_disk_full_during_install_leaves_nothing(tmp_path, bundle):
    """A file size limit (RLIMIT_FSIZE) makes the model write fail half way, as a full disk would."""
    model_size = next(m.size for m, _ in members_of(bundle) if m.name == "model.safetensors")
    dest = tmp_path / "dest"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}

    def install(*extra):
        return subprocess.run([sys.executable, "-c", _FULL_DISK, str(model_size // 2), "install", str(bundle),
                               "--dest", str(dest), "--allow-unsigned", *extra], capture_output=True, text=True,
                              env=env, timeout=120)

    before = snapshot(tmp_path)
    p = install()
    one_line_error(p.returncode, p.stderr, "no space left", str(dest))
    assert snapshot(tmp_path) == before
    # replacing an installed bundle: the old one stays whole
    bundles.install(bundle, dest, allow_unsigned=True)
    before = snapshot(tmp_path)
    p = install("--force")
    one_line_error(p.returncode, p.stderr, "no space left")
    assert snapshot(tmp_path) == before


def test_disk_full_in_process(tmp_path, bundle, monkeypatch):
    import errno

    real = tarfile.copyfileobj

    def full(src, dst, length=None, *a, **k):
        real(src, dst, min(length or 0, 1000), *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile, "copyfileobj", full)
    before = snapshot(tmp_path)
    with pytest.raises(EdgekitError, match="no space left"):
        bundles.install(bundle, tmp_path / "dest", allow_unsigned=True)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(Path("/etc/nv_tegra_release").exists(), reason="this machine is a Jetson")
def test_bundle_for_a_jetson_is_refused_here(cli, tmp_path, artifact):
    b = tmp_path / "jetson.tar.gz"
    bundles.package(artifact, JETSON, b)
    dest = tmp_path / "dest"
    before = snapshot(tmp_path)
    code, out, err = cli("install", b, "--dest", dest, "--allow-unsigned")
    one_line_error(code, err, f"cannot run the bundle for {JETSON}", "not a Jetson", "--force")
    code, out, err = cli("run", b, "--prompt", "x", "--allow-unsigned")
    one_line_error(code, err, "not a Jetson")
    assert snapshot(tmp_path) == before
    # --force installs anyway and says what it ignored
    code, out, err = cli("install", b, "--dest", dest, "--force", "--allow-unsigned")
    assert code == 0, err
    assert "IGNORED (--force): not a Jetson" in out


def test_device_target_comes_from_the_profile_and_plan(tmp_path, artifact):
    import profiles

    b = tmp_path / "jetson.tar.gz"
    compat = bundles.package(artifact, JETSON, b)["compatibility"]
    p = profiles.load(JETSON)
    assert (compat["kind"], compat["arch"], compat["sm"]) == ("jetson", "aarch64", p.sm)
    assert compat["tensorrt"] and set(compat["tensorrt"]) == set(p.tensorrt_versions)
    assert compat["jetpack"] and compat["device_memory_bytes"] == int(p.memory_gib * 2**30)
    assert compat["min_memory_source"].startswith("edgekit plan estimate")
    # plan's estimate includes the device's reserve, so it is more than the weights alone
    assert compat["min_memory_bytes"] > (artifact / "model.safetensors").stat().st_size


def test_unknown_device_and_a_model_that_does_not_fit(cli, tmp_path, artifact):
    from edgekit.models import preset

    code, _, err = cli("package", artifact, "--device", "jetson-orin-nan", "--out", tmp_path / "x.tar.gz")
    one_line_error(code, err, "unknown device 'jetson-orin-nan'", "did you mean")
    big = tmp_path / "big"
    with staging(big) as tmp:  # packaging reads the config, not the weights
        (tmp / "config.json").write_text(json.dumps(preset("r1-8.5b").to_dict()))
        (tmp / "model.safetensors").write_bytes(b"not read")
        write_manifest(tmp, format="checkpoint", model="r1-8.5b")
    code, _, err = cli("package", big, "--device", "jetson-orin-nano-4gb", "--out", tmp_path / "x.tar.gz")
    one_line_error(code, err, "does not fit jetson-orin-nano-4gb", "edgekit plan estimates", "quantize")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big"]


def test_check_machine_on_a_jetson():
    compat = {"device": JETSON, "kind": "jetson", "arch": "aarch64", "sm": "8.7", "tensorrt": ["8.5.2", "10.3"],
              "jetpack": ["6.1", "6.2"], "min_memory_bytes": 1 << 30}
    orin = {"arch": "aarch64", "memory_bytes": 8 << 30, "jetson": True, "sm": "8.7", "tensorrt": "10.3.0.30",
            "jetpack": "6.2"}
    assert bundles.check_machine(compat, {"runtime": "onnxruntime"}, orin)[1] == []
    assert bundles.check_machine(compat, {"runtime": "tensorrt"}, orin)[1] == []
    old = {**orin, "tensorrt": "8.6.2", "jetpack": "6.0"}
    assert bundles.check_machine(compat, {"runtime": "tensorrt"}, old)[1] == \
        ["TensorRT 8.6.2 (target ['8.5.2', '10.3'])", "JetPack 6.0 (target 6.1, 6.2)"]
    pc = {"arch": "x86_64", "memory_bytes": 64 << 30, "jetson": False}
    assert bundles.check_machine(compat, {"runtime": "onnxruntime"}, pc)[1] == \
        ["CPU x86_64 (target aarch64)", "not a Jetson (no /etc/nv_tegra_release on this x86_64 machine)"]


def test_not_enough_memory_is_refused(cli, tmp_path, bundle, monkeypatch):
    monkeypatch.setattr(compat, "host_facts", lambda **kw: {"arch": "x86_64", "memory_bytes": 1 << 18,
                                                            "jetson": False})
    code, out, err = cli("install", bundle, "--dest", tmp_path / "dest", "--allow-unsigned")
    one_line_error(code, err, "memory 0.2 MiB (needs 0.5 MiB)")
    assert not (tmp_path / "dest").exists()


def test_check_machine_gpu_and_tensorrt():
    host = {"arch": "x86_64", "memory_bytes": 64 << 30, "jetson": False}
    gpu = {"device": "a100-40gb", "kind": "gpu", "sm": "8.0", "min_memory_bytes": 1 << 30}
    assert "no CUDA GPU visible (target SM 8.0)" in bundles.check_machine(gpu, {"runtime": "onnxruntime"}, host)[1]
    newer = {**host, "sm": "9.0", "gpu_memory_bytes": 80 << 30}
    ok, bad = bundles.check_machine(gpu, {"runtime": "onnxruntime"}, newer)
    assert not bad and "GPU memory 80.00 GiB (needs 1.00 GiB)" in ok
    # a TensorRT recipe is built per architecture: the SM must match and TensorRT must be in range
    trt = {**gpu, "tensorrt": ["8.6", "10"]}
    bad = bundles.check_machine(trt, {"runtime": "tensorrt"}, newer)[1]
    assert "GPU SM 9.0 (target SM 8.0)" in bad and any("TensorRT is not installed" in b for b in bad)
    a100 = {**newer, "sm": "8.0", "tensorrt": "10.3.0"}
    assert bundles.check_machine(trt, {"runtime": "tensorrt"}, a100)[1] == []
    assert bundles.check_machine(trt, {"runtime": "tensorrt"}, {**a100, "tensorrt": "9.1"})[1] == \
        ["TensorRT 9.1 (target ['8.6', '10'])"]
    small = {**newer, "gpu_memory_bytes": 1 << 20}
    assert bundles.check_machine(gpu, {"runtime": "torch"}, small)[1] == ["GPU memory 1.0 MiB (needs 1.00 GiB)"]


# ---------------------------------------------------------------------------------------------
# installed bundles, keys, and packaging mistakes
# ---------------------------------------------------------------------------------------------


def test_tampered_installed_bundle_does_not_run(cli, tmp_path, bundle, keys):
    dest = tmp_path / "dest"
    bundles.install(bundle, dest, public_key=keys["public_key"])
    model = dest / "model.safetensors"
    model.write_bytes(flip(model.read_bytes()))
    code, out, err = cli("run", dest, "--prompt", "x", "--public-key", keys["public_key"])
    one_line_error(code, err, "'model.safetensors' does not match its sha256")
    shutil.copy(bundle, tmp_path / "b.tar.gz")
    bundles.install(bundle, dest, force=True, public_key=keys["public_key"])
    (dest / "bundle.json").write_text((dest / "bundle.json").read_text().replace('"cpu"', '"cpu2"'))
    code, out, err = cli("run", dest, "--prompt", "x", "--public-key", keys["public_key"])
    one_line_error(code, err, "signature does not match bundle.json")


def test_key_mistakes(cli, tmp_path, bundle, keys):
    code, out, err = cli("keygen", "--out", Path(keys["private_key"]).parent)
    one_line_error(code, err, "already exists", "--force")
    code, out, err = cli("verify", bundle, "--public-key", keys["private_key"])
    one_line_error(code, err, "is a private key", "edgekit.pub")
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key")
    code, out, err = cli("verify", bundle, "--public-key", junk)
    one_line_error(code, err, "is not a PEM public key")
    code, out, err = cli("verify", bundle, "--public-key", tmp_path / "nope.pub")
    one_line_error(code, err, "does not exist", "edgekit keygen")


def test_packaging_mistakes(cli, tmp_path, artifact, keys, bundle):
    out = tmp_path / "b.tar.gz"
    code, _, err = cli("package", "r1-tiny", "--device", "cpu", "--out", out)
    one_line_error(code, err, "not an artifact directory")
    code, _, err = cli("package", artifact, "--device", "cpu", "--out", bundle)
    one_line_error(code, err, "already exists", "--force")
    code, _, err = cli("package", artifact, "--device", "cpu", "--out", out, "--runtime", "onnxruntim")
    one_line_error(code, err, "unknown runtime 'onnxruntim'", "did you mean 'onnxruntime'")
    code, _, err = cli("package", artifact, "--device", "cpu", "--out", out, "--runtime", "onnxruntime")
    one_line_error(code, err, "cannot run a checkpoint artifact", "use --runtime torch")
    code, _, err = cli("package", artifact, "--device", "cpu", "--out", out, "--sign-key", keys["public_key"])
    one_line_error(code, err, "not an unencrypted PEM private key", "--public-key")
    code, _, err = cli("package", artifact, "--device", "cpu", "--out", artifact / "inside.tar.gz")
    one_line_error(code, err, "inside the artifact")
    assert not out.exists() and not list(tmp_path.iterdir())
    # a damaged artifact is refused before anything is written
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "model.safetensors").write_bytes(flip((broken / "model.safetensors").read_bytes()))
    code, _, err = cli("package", broken, "--device", "cpu", "--out", out)
    one_line_error(code, err, "model.safetensors does not match its sha256")
    # links in an artifact are not followed into the bundle
    linked = tmp_path / "linked"
    shutil.copytree(artifact, linked)
    (linked / "secret").symlink_to("/etc/hostname")
    code, _, err = cli("package", linked, "--device", "cpu", "--out", out)
    one_line_error(code, err, "secret is a symbolic link")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


# ---------------------------------------------------------------------------------------------
# issue 16: the install race, verification by default, bounded threads and checked settings
# ---------------------------------------------------------------------------------------------


def test_install_extracts_the_bytes_it_verified(tmp_path, artifact, bundle, keys, monkeypatch):
    """A bundle swapped after it was verified (a shared download dir, a USB stick) is not what gets installed:
    install verifies and extracts one private copy, read once."""
    evil = tmp_path / "evil.tar.gz"
    bundles.package(artifact, "cpu", evil, threshold=0.01, threads=1)  # the attacker's settings, unsigned
    target = tmp_path / "incoming.tar.gz"
    shutil.copy(bundle, target)
    real = deploy._verify  # install looks _verify up in edgekit.bundle.deploy

    def verify_then_swap(*args, **kwargs):
        result = real(*args, **kwargs)
        shutil.copy(evil, target)  # between the check and the extraction
        return result

    monkeypatch.setattr(deploy, "_verify", verify_then_swap)
    r = bundles.install(target, tmp_path / "dest", public_key=keys["public_key"])
    assert r["signature"].startswith("valid")
    installed = json.loads((tmp_path / "dest" / "bundle.json").read_text())
    assert installed["settings"]["threshold"] == THRESHOLD and installed["settings"]["threads"] is None
    assert (tmp_path / "dest" / "bundle.json").read_bytes() == members_of(bundle)[0][1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "evil.tar.gz", "incoming.tar.gz"]


def test_unverified_install_and_run_need_allow_unsigned(cli, tmp_path, bundle):
    """An edited bundle.json under a stale signature used to install and run as 'present, not checked'."""
    stale = tmp_path / "stale.tar.gz"
    edited = [(m, data.replace(b'"threads": null', b'"threads": 1') if m.name == "bundle.json" else data)
              for m, data in members_of(bundle)]
    assert edited[0][1] != members_of(bundle)[0][1]
    write_members(stale, edited)
    dest = tmp_path / "dest"
    for args in (("install", stale, "--dest", dest), ("run", stale, "--prompt", "x")):
        code, _, err = cli(*args)
        one_line_error(code, err, "no --public-key", "--allow-unsigned")
    assert not dest.exists()
    code, out, err = cli("install", stale, "--dest", dest, "--allow-unsigned")
    assert code == 0, err
    assert "(--allow-unsigned)" in out
    code, _, err = cli("run", dest, "--prompt", "x")
    one_line_error(code, err, "no --public-key", "--allow-unsigned")


def test_threads_are_bounded_when_packaging_and_running(cli, tmp_path, artifact, monkeypatch):
    from edgekit import device

    code, _, err = cli("package", artifact, "--device", "cpu", "--out", tmp_path / "b.tar.gz", "--threads", "100000")
    one_line_error(code, err, "--threads 100000 is not between 1 and")
    # a bundle made for a bigger device: run uses at most this machine's usable cores
    b = tmp_path / "b.tar.gz"
    bundles.package(artifact, "cpu", b, threads=8)
    seen = {}
    monkeypatch.setattr(device, "usable_cores", lambda: 2)
    monkeypatch.setattr(api, "generate", lambda *a, **k: seen.update(k) or {"tokens": []})
    bundles.run(b, "x", allow_unsigned=True)
    assert seen["threads"] == 2
    with pytest.raises(EdgekitError, match="usable CPU cores"):
        bundles.run(b, "x", allow_unsigned=True, threads=3)


@pytest.mark.parametrize("settings, fragment", [({"threads": 100000}, "threads 100000"),
                                                ({"threshold": float("nan")}, "threshold"),
                                                ({"runtime": "sh"}, "unknown runtime")])
def test_bundle_settings_are_checked_at_install(cli, tmp_path, bundle, settings, fragment):
    members = members_of(bundle)
    manifest = json.loads(members[0][1])
    manifest["settings"].update(settings)
    bad = tmp_path / "bad.tar.gz"
    write_members(bad, [(members[0][0], json.dumps(manifest).encode())] +
                  [(m, d) for m, d in members[1:] if m.name != "bundle.sig"])
    code, _, err = cli("install", bad, "--dest", tmp_path / "dest", "--allow-unsigned")
    one_line_error(code, err, fragment)
    assert not (tmp_path / "dest").exists()


def test_package_messages(cli, tmp_path, artifact):
    code, _, err = cli("package", artifact, "--device", "raspberry", "--out", tmp_path / "b.tar.gz")
    one_line_error(code, err, "unknown device 'raspberry'", "cpu")
    (tmp_path / "d").mkdir()
    code, _, err = cli("package", artifact, "--device", "cpu", "--out", tmp_path / "d", "--force")
    one_line_error(code, err, "is a directory; --out names the bundle file")
    int8 = tmp_path / "int8"
    shutil.copytree(artifact, int8)
    m = json.loads((int8 / "manifest.json").read_text())
    (int8 / "manifest.json").write_text(json.dumps({**m, "precision": "int8"}))
    code, _, err = cli("package", int8, "--device", "jetson-nano", "--out", tmp_path / "b.tar.gz")
    one_line_error(code, err, "which jetson-nano does not run", "choose another --device")
    assert "--precision" not in err
