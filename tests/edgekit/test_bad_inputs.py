"""Bad command-line values, malformed files and faults (issue 16's list): each one line "error: ... (fix)",
exit 1, before any work where the value is known up front, and nothing half-written or replaced."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import stat
from pathlib import Path

import pytest

from edgekit import api
from edgekit.artifact import (
    MANIFEST,
    dumps,
    file_table,
    os_error,
    read_manifest,
    staging,
    sweep_partials,
    write_manifest,
)
from edgekit.config import ModelConfig
from edgekit.errors import EdgekitError


def one_line_error(code: int, err: str, *fragments: str) -> str:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert lines[0].endswith(")"), f"no (fix): {lines[0]}"
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def rehash(directory: Path, **changes) -> None:
    """Regenerate manifest.json's file table after editing the artifact (what an attacker would do)."""
    m = json.loads((directory / MANIFEST).read_text())
    m["files"] = file_table(directory)
    m.update(changes)
    (directory / MANIFEST).write_text(json.dumps(m))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A v3-tiny checkpoint artifact (config.json, model.safetensors, tokenizer.json, manifest.json)."""
    from edgekit.checkpoint import save_checkpoint
    from edgekit.models import build
    from edgekit.tokenizer import ByteTokenizer

    out = tmp_path_factory.mktemp("bad") / "v3"
    with staging(out) as tmp:
        save_checkpoint(build("v3-tiny"), tmp)
        ByteTokenizer().save(tmp)
        write_manifest(tmp, format="checkpoint", model="v3-tiny")
    return out


def copy_of(src: Path, tmp_path: Path, name: str = "copy") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# 2, 4, 5, 11, 12, 13: option values checked before any work, one line and exit 1
# ---------------------------------------------------------------------------------------------------

BAD_OPTIONS = {
    # 13: usage errors were click's boxed message with exit 2
    "max-new-tokens 0": (["generate", "v3-tiny", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    "prompt-len 0": (["profile", "v3-tiny", "--prompt-len", "0"], "--prompt-len"),
    "runs 0": (["profile", "v3-tiny", "--runs", "0"], "--runs"),
    "batch 0": (["profile", "v3-tiny", "--batch", "0"], "--batch"),
    "threads 0": (["profile", "v3-tiny", "--threads", "0"], "--threads"),
    # 2: no upper bound on --threads
    "threads 100000": (["profile", "v3-tiny", "--threads", "100000"], "usable CPU cores"),
    "package threads 100000": (["package", "ART", "--device", "cpu", "--out", "OUT/b.tar.gz", "--threads", "100000"],
                               "--threads 100000"),
    # 4: NaN for every float option
    "min-cosine nan (export)": (["export", "v3-tiny", "--out", "OUT/x", "--int8", "--min-cosine", "nan"],
                                "finite number"),
    "min-cosine nan (quantize)": (["quantize", "v3-tiny", "--out", "OUT/x", "--min-cosine", "nan"], "finite number"),
    "threshold nan": (["generate", "r1-tiny", "--prompt", "x", "--threshold", "nan"], "finite number"),
    "threshold inf": (["generate", "r1-tiny", "--prompt", "x", "--threshold", "inf"], "finite number"),
    "sweep-threshold nan": (["profile", "r1-tiny", "--sweep-threshold", "0,nan"], "finite numbers"),
    "package threshold nan": (["package", "ART", "--device", "cpu", "--out", "OUT/b.tar.gz", "--threshold", "nan"],
                              "finite number"),
    "max-ppl-increase nan": (["calibrate-skip", "ART", "--data", "ART/config.json", "--out", "OUT/x",
                              "--max-ppl-increase", "nan"], "finite number"),
    # 5: tracebacks from command-line input
    "temperature nan": (["generate", "v3-tiny", "--prompt", "x", "--temperature", "nan"], "--temperature"),
    "seed -1 (generate)": (["generate", "v3-tiny", "--prompt", "x", "--seed", "-1"], "--seed"),
    "seed -1 (profile)": (["profile", "v3-tiny", "--seed", "-1"], "--seed"),
    "prompt not UTF-8": (["generate", "v3-tiny", "--prompt", "ab\udcff"], "not valid UTF-8"),
    "chat not UTF-8": (["run", "ART", "--chat", "\udcfe"], "not valid UTF-8"),
    "batch 100000000": (["profile", "v3-tiny", "--batch", "100000000"], "GiB available"),
    # 11: options silently ignored
    "tensorrt options on onnx": (["export", "v3-tiny", "--out", "OUT/x", "--precision", "fp16", "--device", "t4",
                                  "--context", "5"], "--device, --context, --precision apply to --format tensorrt"),
    "fidelity-data without int8": (["export", "v3-tiny", "--out", "OUT/x", "--fidelity-data", "ART/config.json"],
                                   "--fidelity-data applies to the int8"),
    "min-cosine without int8": (["export", "v3-tiny", "--out", "OUT/x", "--min-cosine", "0.5"],
                                "--min-cosine applies to the int8"),
    # 12: missing range checks
    "temperature -1": (["generate", "v3-tiny", "--prompt", "x", "--temperature", "-1"],
                       "--temperature must be at least 0"),
    "top-k -3": (["generate", "v3-tiny", "--prompt", "x", "--top-k", "-3"], "--top-k must be at least 0"),
    "min-cosine -7": (["quantize", "v3-tiny", "--out", "OUT/x", "--min-cosine", "-7"], "between 0 and 1"),
    "min-cosine 1.5": (["export", "v3-tiny", "--out", "OUT/x", "--int8", "--min-cosine", "1.5"], "between 0 and 1"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_option_values_are_one_line_errors_before_any_work(case, cli, tmp_path, ckpt):
    args, fragment = BAD_OPTIONS[case]
    out = tmp_path / "out"
    args = [a.replace("ART", str(ckpt)).replace("OUT", str(out)) for a in args]
    code, _, err = cli(*args)
    one_line_error(code, err, fragment)
    assert not out.exists()


def test_api_checks_the_same_values(ckpt):
    for kwargs, fragment in (({"temperature": math.nan}, "--temperature"), ({"top_k": -3}, "--top-k"),
                             ({"seed": -1}, "--seed"), ({"max_new_tokens": 0}, "--max-new-tokens")):
        with pytest.raises(EdgekitError, match=fragment):
            api.generate("v3-tiny", "x", **kwargs)
    with pytest.raises(EdgekitError, match="UTF-8"):
        api.generate("v3-tiny", "\udcff")


# ---------------------------------------------------------------------------------------------------
# 3, 8, 9, 10: the one staging helper
# ---------------------------------------------------------------------------------------------------


def test_force_replaces_only_an_artifact_or_an_empty_dir(cli, tmp_path, ckpt, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("years of work")
    afile = tmp_path / "notes.txt"
    afile.write_text("keep")
    monkeypatch.chdir(tmp_path)
    for out, fragment in ((user, "not an edgekit artifact"), (afile, "is a file"), (".", "refusing"),
                          ("..", "refusing"), ("/", "refusing"), (home, "refusing")):
        code, _, err = cli("quantize", "v3-tiny", "--out", out, "--force")
        one_line_error(code, err, fragment)
    assert (user / "thesis.txt").read_text() == "years of work" and afile.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "mine", "notes.txt"]  # no .old, no partial
    # an artifact and an empty directory can be replaced
    for target in (copy_of(ckpt, tmp_path, "art"), tmp_path / "empty"):
        target.mkdir(exist_ok=True)
        with staging(target, force=True) as tmp:
            (tmp / "new").write_text("x")
        assert (target / "new").is_file()


def test_out_under_a_file_says_so(cli, tmp_path):
    (tmp_path / "f").write_text("x")
    code, _, err = cli("quantize", "v3-tiny", "--out", tmp_path / "f" / "sub")
    one_line_error(code, err, f"{tmp_path / 'f'} is a file, not a directory", "inside a directory")


def test_concurrent_writers_one_wins_the_other_fails(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(EdgekitError, match="created by another process") as e:
        with staging(out) as first:
            (first / "who").write_text("first")
            with staging(out) as second:  # another export to the same --out finishes first
                (second / "who").write_text("second")
    assert e.value.fix and "--force" in e.value.fix
    assert (out / "who").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # the loser's temporary is gone


def test_sigterm_cleans_up_like_ctrl_c(cli, tmp_path, monkeypatch):
    from edgekit import cli as cli_module

    out = tmp_path / "art"

    def app():
        with staging(out) as tmp:
            (tmp / "half").write_text("x")
            signal.raise_signal(signal.SIGTERM)
            (tmp / "more").write_text("y")  # never reached

    monkeypatch.setattr(cli_module, "app", app)
    before = signal.getsignal(signal.SIGTERM)
    code, _, err = cli("export")
    assert code == 130 and "interrupted" in err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the command


def test_stale_partials_of_the_same_target_are_swept(tmp_path):
    out = tmp_path / "art"
    dead = tmp_path / ".art.999999999.abcd.partial"  # a pid no process has
    alive = tmp_path / f".art.{os.getppid()}.efgh.partial"  # a running writer's: kept
    other = tmp_path / ".other.999999999.ijkl.partial"  # another target's: not ours to judge
    for d in (dead, alive, other):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    assert sweep_partials(out) == [dead]
    with staging(out) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "art"])


def test_report_temp_is_removed_when_the_disk_is_full(tmp_path, monkeypatch):
    import errno

    from edgekit.profiling.measure import write_json

    real = Path.write_text

    def full(self, *a, **k):
        real(self, "")  # the file was created, then the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(EdgekitError, match="no space left"):
        write_json({"a": 1}, tmp_path / "report.json")
    assert list(tmp_path.iterdir()) == []


def test_artifact_files_are_readable_by_others(tmp_path):
    import tempfile

    out = tmp_path / "art"
    with staging(out) as tmp:
        fd, name = tempfile.mkstemp(dir=tmp, suffix=".safetensors")  # 0600, as weight writers make them
        os.close(fd)
        (tmp / "sub").mkdir(mode=0o700)
    for p in out.rglob("*"):
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_quantize_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(EdgekitError, match="no space left") as e:
        api.quantize("v3-tiny", tmp_path / "q")
    assert "--out" in e.value.fix
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# 4: strict JSON everywhere
# ---------------------------------------------------------------------------------------------------


def test_json_writers_refuse_nan(tmp_path):
    with pytest.raises(EdgekitError, match="non-finite"):
        dumps({"x": math.nan})
    with pytest.raises(EdgekitError, match="non-finite"):
        write_manifest(tmp_path, validation={"cosine": math.nan})
    assert not (tmp_path / MANIFEST).exists()


# ---------------------------------------------------------------------------------------------------
# 6, 7: malformed configs, manifests and models
# ---------------------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "5": (5, "must be a JSON object"),
    "null": (None, "must be a JSON object"),
    "[1,2,3]": ([1, 2, 3], "must be a JSON object of model fields, not [1, 2, 3]"),
    "n_heads 0": ({"family": "v3", "n_heads": 0}, "n_heads must be at least 1"),
    "d_model negative": ({"family": "v3", "d_model": -64}, "d_model must be at least 1"),
    "d_model float": ({"family": "v3", "d_model": 64.5}, "d_model must be an integer"),
    "d_model string": ({"family": "v3", "d_model": "128"}, "d_model must be an integer, got '128'"),
    "max_seq_len -1": ({"family": "v3", "max_seq_len": -1}, "max_seq_len must be at least 1"),
    "norm_eps nan": ({"family": "v3", "norm_eps": math.nan}, "norm_eps must be a finite number"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_malformed_config_is_one_line(case, cli, tmp_path):
    value, fragment = BAD_CONFIGS[case]
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(value))
    code, _, err = cli("generate", d, "--prompt", "x")
    one_line_error(code, err, fragment)
    with pytest.raises(EdgekitError):
        ModelConfig.from_dict(value)


def test_hf_config_sizes_are_checked(cli, tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "qwen2", "num_attention_heads": 0, "hidden_size": 64,
                                               "num_hidden_layers": 2, "vocab_size": 10}))
    code, _, err = cli("generate", d, "--prompt", "x")
    one_line_error(code, err, "config.json of hf")


def test_wrong_dtype_weights_are_one_line(cli, tmp_path, ckpt):
    from safetensors.torch import load_file, save_file

    d = copy_of(ckpt, tmp_path)
    state = load_file(d / "model.safetensors")
    save_file({k: v.to(__import__("torch").int32) for k, v in state.items()}, str(d / "model.safetensors"))
    rehash(d)
    code, _, err = cli("generate", d, "--prompt", "x")
    one_line_error(code, err, "has dtype int32, expected a floating-point tensor")


BAD_MANIFESTS = {
    "[]": (lambda m: [], "not a JSON object"),
    "files as a list": (lambda m: {**m, "files": list(m["files"])}, "'files' is not an object"),
    "entry without size": (lambda m: {**m, "files": {k: {"sha256": v["sha256"]} for k, v in m["files"].items()}},
                           "needs a sha256 string and a size"),
    "model_file outside": (lambda m: {**m, "model_file": "../../../../etc/passwd"}, "not a plain file name"),
    "file name outside": (lambda m: {**m, "files": {**m["files"], "../x": {"sha256": "0", "size": 1}}},
                          "not a plain relative path"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_malformed_manifest_is_one_line(case, cli, tmp_path, ckpt):
    edit, fragment = BAD_MANIFESTS[case]
    d = copy_of(ckpt, tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    (d / MANIFEST).write_text(json.dumps(edit(m)))
    code, _, err = cli("generate", d, "--prompt", "x")
    one_line_error(code, err, fragment)


def test_unlisted_weights_are_refused(cli, tmp_path, ckpt):
    """Deleting a file's entry from the manifest no longer lets a modified weights file load unchecked."""
    d = copy_of(ckpt, tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    del m["files"]["model.safetensors"]
    (d / MANIFEST).write_text(json.dumps(m))
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes())  # content unchanged is refused too: the rule is "listed", not "hashed right"
    code, _, err = cli("generate", d, "--prompt", "x")
    one_line_error(code, err, "model.safetensors is not listed in the manifest")
    with pytest.raises(EdgekitError, match="not listed"):
        read_manifest(d)
    read_manifest(d, verify=False)  # reading the fields alone still works
    # a report added next to the artifact is not something a runtime opens: allowed
    (copy_of(ckpt, tmp_path, "ok") / "profile.json").write_text("{}")
    read_manifest(tmp_path / "ok")


def test_symlinked_file_says_symlink(cli, tmp_path, ckpt):
    d = copy_of(ckpt, tmp_path)
    real = tmp_path / "elsewhere.safetensors"
    shutil.move(d / "model.safetensors", real)
    (d / "model.safetensors").symlink_to(real)
    code, _, err = cli("generate", d, "--prompt", "x")
    one_line_error(code, err, "model.safetensors is a symbolic link")


def test_onnx_dir_without_manifest_says_so(cli, tmp_path, ckpt):
    d = tmp_path / "onnx"
    d.mkdir()
    shutil.copy(ckpt / "config.json", d / "config.json")
    (d / "model.onnx").write_bytes(b"\x08\x07")
    code, _, err = cli("generate", d, "--prompt", "x")
    one_line_error(code, err, "holds an exported model but no manifest.json")


def test_unknown_artifact_format_has_a_fix(cli, tmp_path, ckpt):
    d = copy_of(ckpt, tmp_path)
    rehash(d, format="gguf")
    code, _, err = cli("generate", d, "--prompt", "x")
    one_line_error(code, err, "unknown artifact format 'gguf'", "formats: checkpoint, onnx, tensorrt")


@pytest.mark.parametrize("damage", ["garbage graph", "truncated data", "n_layers"])
def test_damaged_onnx_with_regenerated_hashes_is_one_line(damage, cli, tmp_path, onnx_v3_tiny):
    d = copy_of(onnx_v3_tiny, tmp_path)
    if damage == "garbage graph":
        (d / "model.onnx").write_bytes(b"this is not a protobuf" * 10)
        fragment = "onnxruntime cannot load"
    elif damage == "truncated data":
        data = d / "model.onnx.data"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        fragment = "onnxruntime"
    else:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "n_layers": cfg["n_layers"] - 1}))
        fragment = "does not match config.json"
    rehash(d)
    code, _, err = cli("generate", d, "--prompt", "x")
    one_line_error(code, err, fragment)


def test_hf_dir_with_pickled_weights_is_one_line(cli, tmp_path):
    import pickle

    pytest.importorskip("transformers")
    from hf_tiny import save_model, write_tokenizer

    d = tmp_path / "qwen"
    save_model(d, "qwen2")
    write_tokenizer(d)
    (d / "model.safetensors").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    code, _, err = cli("generate", d, "--prompt", "the")
    one_line_error(code, err, "cannot load", "safetensors")


# ---------------------------------------------------------------------------------------------------
# 14: wrong or unclear messages
# ---------------------------------------------------------------------------------------------------


def test_messages_name_the_right_option(cli, tmp_path, ckpt):
    import errno

    assert "--dest" in os_error(OSError(errno.ENOSPC, "full"), tmp_path, "--dest").fix
    assert "--plot" in os_error(OSError(errno.EACCES, "denied"), tmp_path, "--plot").fix
    long = os_error(OSError(errno.ENAMETOOLONG, "File name too long"), tmp_path)
    assert "too long" in long.message and long.fix == "choose a shorter --out"
    # --fidelity-data DIR, --public-key /dev/zero
    code, _, err = cli("export", "v3-tiny", "--out", tmp_path / "x", "--int8", "--fidelity-data", tmp_path)
    one_line_error(code, err, "is a directory, not a text file")
    code, _, err = cli("verify", tmp_path / "b.tar.gz", "--public-key", "/dev/zero")
    one_line_error(code, err, "/dev/zero is not a regular file")


def test_fixes_on_errors_that_had_none(cli, tmp_path):
    code, _, err = cli("plan", "v3-tiny", "--task", "chat")
    one_line_error(code, err, "--task only applies with --select")
    code, _, err = cli("profile", "v3-tiny", "--threshold", "0.5")
    one_line_error(code, err, "apply to gated models", "drop --threshold")
    from runtimes import open_runner

    with open_runner("v3-tiny") as r, pytest.raises(EdgekitError) as e:
        r.session(0)
    assert e.value.fix


def test_skipped_counts_only_gated_layers():
    from edgekit.config import preset

    r = api.generate("r1-tiny", "the edge", max_new_tokens=4, threshold=1e9)  # every gate skips
    gated = len(preset("r1-tiny").gated_layers)
    assert gated and r["layer_slots"] == 4 * gated
    assert r["skipped"] == r["layer_slots"] and r["layer_runs"] == 0
