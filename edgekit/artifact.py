"""Artifacts: directories one stage writes and the next reads, with a manifest of hashes.

Every writer goes through `staging()`: it writes into a temporary sibling directory and renames it
into place at the end, so an interrupted or failed run leaves no half artifact behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgekit.errors import EdgekitError

MANIFEST = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of the tools that shaped an artifact (imported lazily: only those present)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("edgekit", "torch", "onnx", "onnxruntime", "onnxscript", "safetensors", "tensorrt"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[pkg] = md.version(pkg)
    return out


def os_error(e: OSError, path: Path) -> EdgekitError:
    """An OSError while writing, as a one-line user error with the fix."""
    if e.errno == errno.ENOSPC or e.errno == errno.EFBIG:
        return EdgekitError(f"no space left writing {path}", "free disk space or choose another --out")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EdgekitError(f"cannot write {path}: permission denied", "choose a writable --out directory")
    return EdgekitError(f"cannot write {path}: {e.strerror or e}")


@contextlib.contextmanager
def staging(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes without error."""
    out = Path(out)
    if out.exists() and not force:
        raise EdgekitError(f"{out} already exists", "pass --force to replace it, or choose another --out")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
        tmp.chmod(0o755)  # mkdtemp makes 0700; an artifact is for others to read too
    except OSError as e:
        raise os_error(e, out) from None
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        raise os_error(e, out) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_table(directory: Path) -> dict[str, dict]:
    """sha256 and size of every file under `directory` except the manifest, by relative path."""
    directory = Path(directory)
    table = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def write_manifest(directory: Path, **fields) -> dict:
    """Write manifest.json: the given fields, tool versions, and the hash table of every file."""
    manifest = {"edgekit_manifest": 1, **fields, "versions": versions(), "files": file_table(directory)}
    (Path(directory) / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def read_manifest(directory: Path, verify: bool = True) -> dict:
    """Read manifest.json and (by default) check every listed file's size and hash."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise EdgekitError(f"{directory} is not an edgekit artifact (no {MANIFEST})",
                           "pass a directory written by 'edgekit export' or 'edgekit quantize'")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{path} is corrupt: {e}", "re-export the artifact") from None
    if verify:
        for rel, meta in manifest.get("files", {}).items():
            f = directory / rel
            if not f.is_file():
                raise EdgekitError(f"{directory}: file {rel} listed in the manifest is missing",
                                   "the artifact is incomplete; re-export it")
            if f.stat().st_size != meta["size"] or sha256_file(f) != meta["sha256"]:
                raise EdgekitError(f"{directory}: file {rel} does not match its sha256 in the manifest",
                                   "the artifact was altered or damaged; re-export it")
    return manifest
