"""Reading a bundle: member checks, one streaming pass (every hash, the small JSON members), the bundle
manifest, verify."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath

from edgekit.artifact import MANIFEST
from edgekit.bundle.format import BUNDLE_FORMAT, BUNDLE_JSON, BUNDLE_SIG, CHUNK, MAX_META, META, TAMPERED
from edgekit.bundle.keys import _check_signature, load_public_key
from edgekit.errors import EdgekitError


def check_member(file: Path, m: tarfile.TarInfo) -> None:
    """Refuse anything but a regular file with a plain relative path (one line, naming the member)."""
    name = m.name
    problem = None
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        problem = "has an absolute path"
    elif ".." in name.replace("\\", "/").split("/"):
        problem = "escapes the destination ('..')"
    elif m.issym():
        problem = f"is a symbolic link (to {m.linkname!r})"
    elif m.islnk():
        problem = f"is a hard link (to {m.linkname!r})"
    elif m.ischr() or m.isblk():
        problem = "is a device file"
    elif m.isfifo():
        problem = "is a FIFO"
    elif m.isdir():
        problem = "is a directory (bundles hold only files)"
    elif not m.isreg():
        problem = "is not a regular file"
    elif "\\" in name or name in ("", ".") or posixpath.normpath(name) != name or not name.isprintable():
        problem = "has an unusual path"
    if problem:
        raise EdgekitError(f"{file}: member {name!r} {problem}; bundles hold only regular files with plain "
                           "relative paths", "this bundle was tampered with or not made by 'edgekit package'")


class _BundleReader:
    """The decompressed bundle for tarfile: read errors (truncation, bad CRC, I/O) become one EdgekitError,
    so they are never confused with errors while writing (a full disk during install)."""

    def __init__(self, gz: gzip.GzipFile, file: Path):
        self.gz, self.file = gz, file

    def read(self, size: int = -1) -> bytes:
        try:
            return self.gz.read(size)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise _truncated(self.file, e) from None
        except OSError as e:
            raise EdgekitError(f"cannot read {self.file}: {e.strerror or e}") from None


def _truncated(file: Path, e: Exception) -> EdgekitError:
    return EdgekitError(f"{file} is truncated or not a bundle ({str(e) or type(e).__name__})",
                        "copy the bundle again; it must be the .tar.gz written by 'edgekit package'")


@contextlib.contextmanager
def _open_bundle(file: Path, source: Path | None = None) -> Iterator[tarfile.TarFile]:
    """The bundle as a streaming tar; any sign of truncation or corruption is one EdgekitError.
    `source`: where the bytes are read (a private copy of `file`), `file` names the bundle in messages."""
    if source is not None:
        file, real = Path(file), Path(source)
    else:
        real = file
    if not file.exists() and source is None:
        raise EdgekitError(f"{file} does not exist", "pass a bundle written by 'edgekit package'")
    if not file.is_file():
        raise EdgekitError(f"{file} is not a file", "pass the bundle (.tar.gz) written by 'edgekit package'")
    try:
        gz = gzip.open(real, "rb")
    except OSError as e:
        raise EdgekitError(f"cannot read {file}: {e.strerror or e}") from None
    with gz:
        reader = _BundleReader(gz, file)
        try:
            tf = tarfile.open(fileobj=reader, mode="r|")
        except tarfile.TarError as e:
            raise _truncated(file, e) from None
        with tf:
            try:
                yield tf
            except tarfile.TarError as e:  # a header or member cut short
                if isinstance(e, tarfile.FilterError):
                    raise
                raise _truncated(file, e) from None
        while reader.read(CHUNK):  # to the end: the gzip trailer's CRC and length are checked there
            pass


def _hash_stream(f) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    while block := f.read(CHUNK):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def _scan(file: Path, source: Path | None = None) -> dict:
    """One pass over the archive: member checks, every member's sha256, the small JSON members' bytes."""
    hashes: dict[str, dict] = {}
    small: dict[str, bytes] = {}
    with _open_bundle(file, source) as tf:
        for m in tf:
            check_member(file, m)
            if m.name in hashes or m.name in small:
                raise EdgekitError(f"{file}: member {m.name!r} appears twice", TAMPERED)
            f = tf.extractfile(m)
            if m.name in (*META, MANIFEST):
                if m.size > MAX_META:
                    raise EdgekitError(f"{file}: {m.name} is implausibly large ({m.size} bytes)", TAMPERED)
                small[m.name] = f.read()
            if m.name not in META:
                sha, n = _hash_stream(io.BytesIO(small[m.name])) if m.name in small else _hash_stream(f)
                hashes[m.name] = {"sha256": sha, "size": n}
    return {"hashes": hashes, "small": small}


def _parse_manifest(file: Path, data: bytes) -> dict:
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{file}: {BUNDLE_JSON} is not valid JSON ({e})", TAMPERED) from None
    version = manifest.get("edgekit_bundle")
    if version != BUNDLE_FORMAT:
        raise EdgekitError(f"{file}: bundle format {version!r} is not {BUNDLE_FORMAT}",
                           "install the edgekit version that made it, or package it again")
    files = manifest.get("files")
    ok = isinstance(files, dict) and all(
        isinstance(m, dict) and isinstance(m.get("sha256"), str) and isinstance(m.get("size"), int)
        for m in files.values())
    if not ok or not isinstance(manifest.get("settings"), dict) or not isinstance(manifest.get("compatibility"),
                                                                                    dict):
        raise EdgekitError(f"{file}: {BUNDLE_JSON} is malformed (files, settings or compatibility)", TAMPERED)
    return manifest


def _compare(where: str, listed: dict[str, dict], present: dict[str, dict], extra_ok: bool = False) -> None:
    missing = sorted(set(listed) - set(present))
    if missing:
        raise EdgekitError(f"{where}: file {missing[0]!r} listed in {BUNDLE_JSON} is missing"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""), TAMPERED)
    extra = sorted(set(present) - set(listed))
    if extra and not extra_ok:
        raise EdgekitError(f"{where}: file {extra[0]!r} is not listed in {BUNDLE_JSON}", TAMPERED)
    for rel, meta in listed.items():
        got = present[rel]
        if got["size"] != meta["size"] or got["sha256"] != meta["sha256"]:
            raise EdgekitError(f"{where}: file {rel!r} does not match its sha256 in {BUNDLE_JSON}", TAMPERED)


def _check_artifact_manifest(where: str, data: bytes | None, table: dict[str, dict]) -> int:
    """The artifact's own manifest.json must be in the bundle and agree with bundle.json."""
    if data is None:
        raise EdgekitError(f"{where}: no artifact {MANIFEST}", TAMPERED)
    try:
        files = json.loads(data)["files"]
        items = [(rel, m["sha256"], m["size"]) for rel, m in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{where}: the artifact {MANIFEST} is malformed ({e})", TAMPERED) from None
    for rel, sha, size in items:
        if rel not in table or table[rel]["sha256"] != sha or table[rel]["size"] != size:
            raise EdgekitError(f"{where}: file {rel!r} does not match the artifact {MANIFEST}", TAMPERED)
    return len(items)


def _verify(file: Path, public_key=None, source: Path | None = None) -> tuple[dict, dict]:
    file = Path(file)
    pub = load_public_key(public_key) if public_key else None
    scan = _scan(file, source)
    small = scan["small"]
    if BUNDLE_JSON not in small:
        raise EdgekitError(f"{file} has no {BUNDLE_JSON}: not an edgekit bundle",
                           "pass a bundle written by 'edgekit package'")
    signature = _check_signature(file, small.get(BUNDLE_SIG), small[BUNDLE_JSON], pub)
    manifest = _parse_manifest(file, small[BUNDLE_JSON])
    _compare(str(file), manifest["files"], scan["hashes"])
    n_art = _check_artifact_manifest(str(file), small.get(MANIFEST), manifest["files"])
    total = sum(m["size"] for m in manifest["files"].values())
    report = {
        "bundle": str(file), "model": manifest.get("model"), "format": manifest.get("format"),
        "device": manifest["compatibility"].get("device"), "signature": signature,
        "files_checked": len(manifest["files"]), "bytes_checked": total,
        "checks": [
            "archive: complete (gzip CRC and length), regular files only, plain relative paths",
            f"signature: {signature}",
            f"files: {len(manifest['files'])} sha256 + size match {BUNDLE_JSON} ({total} bytes), none missing, "
            "none extra",
            f"artifact {MANIFEST}: {n_art} files agree with {BUNDLE_JSON}",
        ],
        "settings": manifest["settings"],
    }
    return report, manifest


def verify(file: str | Path, public_key: str | Path | None = None) -> dict:
    """Check a bundle without installing it: signature, every hash, no file missing or extra."""
    return _verify(Path(file), public_key)[0]
