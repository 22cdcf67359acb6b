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
# files that may sit in an artifact without a manifest entry: the bundle's own files (an installed bundle;
# bundle.json lists and hashes the rest) and what a device builds for itself (a TensorRT engine and its facts)
UNLISTED_OK = ("bundle.json", "bundle.sig", "model.engine", "engine.json", "timing.cache")
# what a runtime or loader opens: such a file must be listed and hashed in the manifest
LOADED_SUFFIXES = (".onnx", ".data", ".onnx_data", ".safetensors", ".bin", ".pt", ".pth", ".gguf")
LOADED_NAMES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                "skip_gates.json", "special_tokens_map.json")


def dumps(obj, **kwargs) -> str:
    """json.dumps for every file edgekit writes: strict JSON (NaN and infinity refused, one line error)."""
    try:
        return json.dumps(obj, allow_nan=False, **kwargs)
    except ValueError as e:
        raise EdgekitError(f"refusing to write a non-finite number into JSON ({e})",
                           "pass finite numbers (NaN and infinity are not valid JSON)") from None


def plain_name(rel) -> bool:
    """A plain relative posix path: no absolute path, no '..', no backslash, nothing to normalize."""
    return (isinstance(rel, str) and rel not in ("", ".") and not rel.startswith("/") and "\\" not in rel
            and ".." not in rel.split("/") and os.path.normpath(rel) == rel and rel.isprintable())


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


def os_error(e: OSError, path: Path, option: str = "--out") -> EdgekitError:
    """An OSError while writing, as a one-line user error with the fix (`option` names where the path came from)."""
    if e.errno == errno.ENOSPC or e.errno == errno.EFBIG:
        return EdgekitError(f"no space left writing {path}", f"free disk space or choose another {option}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return EdgekitError(f"cannot write {path}: permission denied", f"choose a writable {option} directory")
    if e.errno == errno.ENAMETOOLONG:
        return EdgekitError(f"cannot write {path}: the name is too long for the file system",
                            f"choose a shorter {option}")
    return EdgekitError(f"cannot write {path}: {e.strerror or e}", f"check {option}, or choose another one")


def _refuse_target(out: Path) -> None:
    """Paths no artifact writer may write to or replace: '.', '..', '/', the home or current directory."""
    resolved = out.resolve()
    if out.name in ("", ".", "..") or resolved in (Path("/"), Path.home().resolve(), Path.cwd().resolve()) \
            or resolved in Path.cwd().resolve().parents:
        raise EdgekitError(f"refusing to write an artifact to {str(out) or '.'}",
                           "pass a new directory name to --out, e.g. --out my-model")


ARTIFACT_MARKERS = (MANIFEST, "skip_gates.json")  # an export/quantize artifact; a calibrate-skip directory


def is_artifact(path: Path) -> bool:
    """An edgekit artifact directory (manifest.json; calibrate-skip's skip_gates.json) or an empty directory:
    what --force may replace."""
    return path.is_dir() and not path.is_symlink() and (
        any((path / m).is_file() for m in ARTIFACT_MARKERS) or not any(path.iterdir()))


def check_target(out: Path, force: bool, option: str = "--out") -> None:
    """Before any work: `out` may be written (new), or replaced with --force (an artifact or an empty dir)."""
    out = Path(out)
    _refuse_target(out)
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise EdgekitError(f"{parent} is a file, not a directory", f"choose {option} inside a directory")
            break
    if out.exists() or out.is_symlink():
        if not force:
            raise EdgekitError(f"{out} already exists", f"pass --force to replace it, or choose another {option}")
        if not is_artifact(out):
            what = "a file" if not out.is_dir() or out.is_symlink() else "a directory that is not an edgekit artifact"
            raise EdgekitError(f"{out} is {what}; --force replaces only an edgekit artifact or an empty directory",
                               f"choose another {option}, or remove {out} yourself")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_partials(out: Path) -> list[Path]:
    """Remove `.NAME.PID.*.partial` siblings of `out` whose process is gone (killed runs); returns them."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    prefix, gone = f".{out.name}.", []
    try:
        siblings = list(parent.iterdir())
    except OSError:
        return gone
    for p in siblings:
        rest = p.name[len(prefix):-len(".partial")] if p.name.startswith(prefix) and p.name.endswith(".partial") \
            else None
        if rest is None or p.is_symlink():
            continue
        pid = rest.split(".", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _pid_alive(int(pid))):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        gone.append(p)
    return gone


def partial_name(out: Path) -> tuple[str, str]:
    """(prefix, suffix) of a temporary sibling of `out`: the pid lets a later run sweep it once it is dead."""
    return f".{Path(out).name}.{os.getpid()}.", ".partial"


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename that never replaces an existing `dst` (Linux renameat2 RENAME_NOREPLACE; elsewhere os.rename,
    which refuses a non-empty directory): two writers racing for one --out, one wins, the other fails."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL/ENOSYS: this filesystem lacks it, fall back
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def readable(directory: Path) -> None:
    """Files 0644 and directories 0755 (mkstemp/mkdtemp make 0600/0700): an artifact is for others to read."""
    for root, dirs, files in os.walk(directory):
        for name, mode in [(d, 0o755) for d in dirs] + [(f, 0o644) for f in files]:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                os.chmod(p, mode)


@contextlib.contextmanager
def staging(out: Path, force: bool = False, option: str = "--out") -> Iterator[Path]:
    """Yield a temporary directory that becomes `out` only if the block finishes without error.

    Refused before any work: '.', '..', '/', the home directory, a path under a file, and an existing `out`
    unless `force` -- and even then only an edgekit artifact or an empty directory is replaced. The final
    rename never replaces a destination that appeared meanwhile (another writer) unless `force`. Stale
    temporaries of killed runs for the same `out` are swept; this run's is removed on any error.
    """
    out = Path(out)
    check_target(out, force, option)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_partials(out)
        prefix, suffix = partial_name(out)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
        tmp.chmod(0o755)  # mkdtemp makes 0700; an artifact is for others to read too
    except OSError as e:
        raise os_error(e, out, option) from None
    try:
        yield tmp
        readable(tmp)
        if force and (out.exists() or out.is_symlink()):
            check_target(out, force, option)  # still an artifact (or empty) at the moment it is replaced
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                _rename_noreplace(tmp, out)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise EdgekitError(f"{out} was created by another process while this one was writing it",
                                       f"choose another {option}, or pass --force to replace it") from None
                raise
    except OSError as e:
        raise os_error(e, out, option) from None
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
    (Path(directory) / MANIFEST).write_text(dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _schema(directory: Path, manifest) -> dict:
    """manifest.json's shape: an object whose `files` maps plain relative names to {sha256, size}."""
    where = f"{directory}/{MANIFEST}"
    fix = "the artifact was altered or damaged; re-export it"
    if not isinstance(manifest, dict):
        raise EdgekitError(f"{where} is malformed: not a JSON object", fix)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise EdgekitError(f"{where} is malformed: 'files' is not an object of file entries", fix)
    for rel, meta in files.items():
        if not plain_name(rel):
            raise EdgekitError(f"{where}: file name {rel!r} is not a plain relative path", fix)
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and isinstance(meta.get("size"), int)
                and not isinstance(meta.get("size"), bool) and meta["size"] >= 0):
            raise EdgekitError(f"{where}: the entry of {rel!r} needs a sha256 string and a size", fix)
    model_file = manifest.get("model_file")
    if model_file is not None and (not plain_name(model_file) or model_file not in files):
        raise EdgekitError(f"{where}: model_file {model_file!r} is not a plain file name listed in 'files'", fix)
    return manifest


def _opened_by_loader(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return rel not in UNLISTED_OK and (name.endswith(LOADED_SUFFIXES) or name in LOADED_NAMES
                                       or name.startswith("model."))


def read_manifest(directory: Path, verify: bool = True) -> dict:
    """Read manifest.json (checked by schema) and (by default) check every listed file's size and hash.

    With verify, every file a runtime or loader could open (weights, graphs and their external data,
    config and tokenizer files) must be listed: an unlisted one is refused, as bundles refuse them.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise EdgekitError(f"{directory} is not an edgekit artifact (no {MANIFEST})",
                           "pass a directory written by 'edgekit export' or 'edgekit quantize'")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgekitError(f"{path} is corrupt: {e}", "re-export the artifact") from None
    _schema(directory, manifest)
    if verify:
        for rel, meta in manifest["files"].items():
            f = directory / rel
            if f.is_symlink():
                raise EdgekitError(f"{directory}: file {rel} is a symbolic link, not the file the manifest lists",
                                   "replace the link with the artifact's own file, or re-export it")
            if not f.is_file():
                raise EdgekitError(f"{directory}: file {rel} listed in the manifest is missing",
                                   "the artifact is incomplete; re-export it")
            if f.stat().st_size != meta["size"] or sha256_file(f) != meta["sha256"]:
                raise EdgekitError(f"{directory}: file {rel} does not match its sha256 in the manifest",
                                   "the artifact was altered or damaged; re-export it")
        for f in sorted(directory.rglob("*")):
            rel = f.relative_to(directory).as_posix()
            if rel != MANIFEST and rel not in manifest["files"] and (f.is_file() or f.is_symlink()) \
                    and _opened_by_loader(rel):
                raise EdgekitError(f"{directory}: file {rel} is not listed in the manifest",
                                   "remove it, or re-export the artifact; edgekit loads only listed, hashed files")
    return manifest
