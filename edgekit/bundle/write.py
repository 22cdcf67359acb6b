"""Packaging: an artifact directory and its runtime settings into one reproducible, optionally signed .tar.gz."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path

from edgekit.artifact import MANIFEST, os_error, partial_name, sha256_file, sweep_partials, versions
from edgekit.bundle.compat import compatibility
from edgekit.bundle.format import BUNDLE_FORMAT, BUNDLE_JSON, BUNDLE_SIG, META, TAMPERED, TOKENIZER, _canonical
from edgekit.bundle.keys import _signature_bytes, key_id, load_private_key
from edgekit.errors import EdgekitError, unknown_name
from edgekit.families import is_gated, is_hf


def _collect(art: Path) -> dict[str, Path]:
    """Every regular file under the artifact directory, by posix relative path; links are refused."""
    files: dict[str, Path] = {}
    for root, dirs, names in os.walk(art, followlinks=False):
        dirs.sort()
        for name in [*dirs, *names]:
            p = Path(root) / name
            rel = p.relative_to(art).as_posix()
            if p.is_symlink():
                raise EdgekitError(f"{art}: {rel} is a symbolic link; bundles hold only regular files",
                                   "replace the link with a copy of the file")
            if name in dirs:
                continue
            if not p.is_file():
                raise EdgekitError(f"{art}: {rel} is not a regular file", "remove it from the artifact directory")
            if rel in META:
                raise EdgekitError(f"{art}: the artifact has its own {rel}",
                                   f"remove it: '{rel}' is reserved for the bundle")
            files[rel] = p
    return files


def _settings(res, runtime: str | None, threads: int | None, threshold) -> dict:
    from runtimes import RUNTIMES

    runtime = runtime or res.default_runtime
    if runtime not in RUNTIMES:
        raise unknown_name("runtime", runtime, RUNTIMES)
    runs = {"checkpoint": ("torch",), "onnx": ("onnxruntime", "tensorrt")}[res.kind]
    if runtime not in runs:
        raise EdgekitError(f"runtime {runtime} cannot run {'an ONNX' if res.kind == 'onnx' else 'a ' + res.kind} "
                           "artifact", f"use --runtime {' or '.join(runs)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise EdgekitError(f"--threads {threads!r} is not between 1 and {MAX_THREADS}",
                           "pass the device's core count, or leave --threads out (the runtime's default; run never "
                           "uses more than the device's usable cores)")
    _check_threshold(threshold, "--threshold")
    gated = is_gated(res.cfg)
    if threshold is not None and not gated:
        raise EdgekitError(f"--threshold applies to gated models (R1, calibrate-skip); {res.name} has no skip gates",
                           "drop --threshold")
    if gated and threshold is None:
        threshold = res.cfg.default_threshold
    return {"runtime": runtime, "threads": threads, "threshold": threshold}


MAX_THREADS = 1024  # a bundle's thread count: the device's cores are not known here; run bounds it by them


def _check_threshold(threshold, where: str) -> None:
    import math

    values = threshold if isinstance(threshold, list) else [threshold]
    if threshold is not None and not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
                                         for v in values):
        raise EdgekitError(f"{where} {threshold!r} is not a finite number", "pass a number, e.g. --threshold 0.5")


def check_settings(where, settings: dict) -> dict:
    """A bundle's runtime settings, as read at install and run (bundle.json may come from anywhere)."""
    from runtimes import RUNTIMES

    runtime, threads = settings.get("runtime"), settings.get("threads")
    if runtime is not None and runtime not in RUNTIMES:
        raise EdgekitError(f"{where}: {BUNDLE_JSON} names an unknown runtime {runtime!r}", TAMPERED)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or not 1 <= threads <= MAX_THREADS):
        raise EdgekitError(f"{where}: {BUNDLE_JSON} threads {threads!r} is not between 1 and {MAX_THREADS}",
                           TAMPERED)
    try:
        _check_threshold(settings.get("threshold"), f"{BUNDLE_JSON} threshold")
    except EdgekitError as e:
        raise EdgekitError(f"{where}: {e.message}", TAMPERED) from None
    return settings


def package(artifact_dir: str | Path, device: str, out_file: str | Path, sign_key: str | Path | None = None,
            runtime: str | None = None, threads: int | None = None, threshold: float | list[float] | None = None,
            force: bool = False) -> dict:
    """Bundle an artifact directory for `device` into one reproducible .tar.gz, signed with `sign_key`."""
    from edgekit.resolve import resolve
    from edgekit.tokenizer import ByteTokenizer

    art, out = Path(artifact_dir), Path(out_file)
    if not art.is_dir() or not (art / MANIFEST).is_file():
        raise EdgekitError(f"{art} is not an artifact directory (no {MANIFEST})",
                           "pass a directory written by 'edgekit export' or 'edgekit quantize'")
    if out.is_dir():
        raise EdgekitError(f"{out} is a directory; --out names the bundle file to write"
                           + (" (--force replaces only a file)" if force else ""),
                           f"pass a file name, e.g. --out {out / 'model.tar.gz'}")
    if out.exists() and not force:
        raise EdgekitError(f"{out} already exists", "pass --force to replace it, or choose another --out")
    if art.resolve() in out.resolve().parents:
        raise EdgekitError(f"{out} is inside the artifact {art}", "write the bundle outside the artifact directory")
    res = resolve(art)  # reads manifest.json and checks every file's sha256
    if res.kind == "engine":
        raise EdgekitError(f"{art} holds a TensorRT engine, which runs only on the GPU and TensorRT that built it",
                           "package the ONNX artifact with its trt_recipe.json; the device builds the engine")
    settings = _settings(res, runtime, threads, threshold)
    key = load_private_key(sign_key) if sign_key else None  # fail before any work

    files = _collect(art)
    blobs: dict[str, bytes] = {}
    if TOKENIZER not in files and is_hf(res.cfg):
        raise EdgekitError(f"{art} is a Hugging Face export without {TOKENIZER}, so the bundle could not run",
                           "copy the model's tokenizer.json (and tokenizer_config.json) into the artifact")
    if TOKENIZER not in files:
        with tempfile.TemporaryDirectory() as td:
            blobs[TOKENIZER] = ByteTokenizer().save(Path(td)).read_bytes()
    table = {rel: {"sha256": sha256_file(p), "size": p.stat().st_size} for rel, p in files.items()}
    table.update({rel: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for rel, b in blobs.items()})
    table = dict(sorted(table.items()))
    art_manifest = res.manifest
    manifest = {
        "edgekit_bundle": BUNDLE_FORMAT,
        "model": res.name, "family": res.cfg.family, "format": res.kind,
        "precision": art_manifest.get("precision"),
        "artifact_manifest": MANIFEST,
        "settings": settings,
        "target": {"device": device},
        "compatibility": compatibility(device, res, table, settings),
        "versions": versions(),
        "artifact_versions": art_manifest.get("versions", {}),
        "extras": sorted(rel for rel in table if rel not in art_manifest.get("files", {}) and rel != MANIFEST),
        "files": table,
    }
    manifest_bytes = _canonical(manifest)
    members: list[tuple[str, bytes | Path]] = [(BUNDLE_JSON, manifest_bytes)]
    if key is not None:
        members.append((BUNDLE_SIG, _signature_bytes(key, manifest_bytes)))
    members += [(rel, blobs[rel] if rel in blobs else files[rel]) for rel in table]
    _write_tar(out, members, table)
    return {"bundle": str(out), "model": res.name, "device": device, "files": len(table),
            "bytes": out.stat().st_size, "sha256": sha256_file(out), "settings": settings,
            "compatibility": manifest["compatibility"],
            "signed": f"ed25519 key {key_id(key.public_key())}" if key is not None else "no"}


class _HashingReader:
    """Reads a file for tarfile and hashes what it read, so a file changed after hashing is caught."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, size=-1) -> bytes:
        b = self.f.read(size)
        self.h.update(b)
        self.n += len(b)
        return b


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.type = size, 0, 0o644, tarfile.REGTYPE
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _write_tar(out: Path, members: list[tuple[str, bytes | Path]], table: dict[str, dict]) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    tmp = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_partials(out)
        prefix, suffix = partial_name(out)
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as raw:
            # filename="" and mtime=0: the gzip header carries neither the temp name nor the time
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz, \
                    tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for rel, src in members:
                    if isinstance(src, bytes):
                        tf.addfile(_tarinfo(rel, len(src)), io.BytesIO(src))
                        continue
                    with open(src, "rb") as f:
                        reader = _HashingReader(f)
                        tf.addfile(_tarinfo(rel, table[rel]["size"]), reader)
                    if reader.n != table[rel]["size"] or reader.h.hexdigest() != table[rel]["sha256"]:
                        raise EdgekitError(f"{src} changed while it was being packaged", "run the command again")
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        tmp = None
    except OSError as e:
        raise os_error(e, out) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
