"""On the device: install a bundle (private copy, verify, machine check, atomic extraction, the TensorRT
engine), read an installed one, run it."""

from __future__ import annotations

import contextlib
import json
import os
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgekit.artifact import os_error, partial_name, sha256_file
from edgekit.bundle.compat import check_machine
from edgekit.bundle.format import BUNDLE_JSON, BUNDLE_SIG, CHUNK, META, TAMPERED, TOKENIZER
from edgekit.bundle.keys import _check_signature, load_public_key, require_key
from edgekit.bundle.read import _compare, _open_bundle, _parse_manifest, _verify, check_member
from edgekit.bundle.write import check_settings
from edgekit.errors import EdgekitError
from edgekit.families import FAMILIES


def _extract(file: Path, tmp: Path, listed: dict[str, dict], source: Path | None = None) -> None:
    with _open_bundle(file, source) as tf:
        for m in tf:
            check_member(file, m)  # again: the file may have changed since it was verified
            if m.name not in listed and m.name not in META:
                raise EdgekitError(f"{file}: member {m.name!r} is not listed in {BUNDLE_JSON}", TAMPERED)
            try:
                tf.extract(m, tmp, set_attrs=True, filter="data")
            except tarfile.FilterError as e:
                raise EdgekitError(f"{file}: member {m.name!r} refused by the tar data filter ({e})", TAMPERED) \
                    from None


def _installed_hashes(directory: Path, listed: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for rel in listed:
        p = directory / rel
        if p.is_file() and not p.is_symlink():
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def _safe_to_replace(dest: Path) -> bool:
    """--force replaces only what install could have made: an installed bundle or an empty directory."""
    return dest.is_dir() and not dest.is_symlink() and ((dest / BUNDLE_JSON).is_file() or not any(dest.iterdir()))


@contextlib.contextmanager
def private_copy(file: Path, beside: Path) -> Iterator[Path]:
    """A copy of the bundle that only this process can reach (a 0700 directory next to `beside`), read
    from `file` once: what is verified is exactly what is extracted, whatever happens to `file` meanwhile."""
    if not file.exists():
        raise EdgekitError(f"{file} does not exist", "pass a bundle written by 'edgekit package'")
    if not file.is_file():
        raise EdgekitError(f"{file} is not a file", "pass the bundle (.tar.gz) written by 'edgekit package'")
    parent = beside.parent if str(beside.parent) else Path(".")
    prefix, suffix = partial_name(beside)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        td = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))  # 0700
    except OSError as e:
        raise os_error(e, beside, "--dest") from None
    try:
        copy = td / "bundle.tar.gz"
        try:
            src = open(file, "rb")
        except OSError as e:
            raise EdgekitError(f"cannot read {file}: {e.strerror or e}") from None
        try:
            with src, open(copy, "xb") as dst:
                while block := src.read(CHUNK):
                    dst.write(block)
        except OSError as e:
            raise os_error(e, beside, "--dest") from None
        yield copy
    finally:
        import shutil

        shutil.rmtree(td, ignore_errors=True)


def install(file: str | Path, dest: str | Path, public_key: str | Path | None = None, force: bool = False,
            allow_unsigned: bool = False) -> dict:
    """Verify a bundle, check this machine against its target, and extract it atomically into `dest`.

    The signature is checked against `public_key`; without one, install refuses unless `allow_unsigned`.
    The bundle is read once into a private copy; that copy is verified and extracted.
    """
    from edgekit.artifact import staging

    file, dest = Path(file), Path(dest)
    require_key(file, public_key, allow_unsigned)
    if dest.exists() or dest.is_symlink():
        if not force:
            raise EdgekitError(f"{dest} already exists", "pass --force to replace it, or choose another --dest")
        if not _safe_to_replace(dest):
            raise EdgekitError(f"{dest} exists and is not an installed bundle; --force will not replace it",
                               "choose another --dest")
    pub = load_public_key(public_key) if public_key else None  # fail before copying anything
    with private_copy(file, dest) as copy:
        report, manifest = _verify(file, public_key, source=copy)
        compat, settings = manifest["compatibility"], check_settings(file, manifest["settings"])
        ok, bad = check_machine(compat, settings)
        if bad and not force:
            raise EdgekitError(f"this machine cannot run the bundle for {compat.get('device')}: {'; '.join(bad)}",
                               "install it on a matching device, or pass --force to install anyway")
        try:
            with staging(dest, force=force, option="--dest") as tmp:
                os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; an installed bundle is readable like any directory
                _extract(file, tmp, manifest["files"], source=copy)
                _compare(f"{file} (as extracted)", manifest["files"], _installed_hashes(tmp, manifest["files"]))
                engine = _build_engine(tmp, manifest, force)
        except OSError as e:  # disk full and the like while extracting; staging removes the temporary directory
            raise os_error(e, dest, "--dest") from None
    signature = report["signature"] if pub is not None else f"{report['signature'].split(' (')[0]} (--allow-unsigned)"
    return {"installed": str(dest), "model": manifest.get("model"), "device": compat.get("device"),
            "signature": signature, "files": report["files_checked"],
            "machine": ok + [f"IGNORED (--force): {b}" for b in bad], "engine": engine,
            "settings": settings}


def _build_engine(directory: Path, manifest: dict, force: bool = False) -> str:
    """On a TensorRT target with TensorRT present, build the engine once, at install."""
    if manifest["settings"].get("runtime") != "tensorrt":
        return "not needed"
    try:
        from edgekit.engine import build_engine
    except ImportError:
        return "not built: the TensorRT exporter is not available (built at first run)"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "not built: TensorRT is not installed (built at first run)"
    recipe = directory / "trt_recipe.json"
    try:
        build_engine(directory, recipe if recipe.is_file() else None, force=force)
    except EdgekitError as e:  # no GPU, another SM / TensorRT: the install stands, the engine waits
        return f"not built: {e}"
    return "built"


def read_installed(directory: str | Path, public_key: str | Path | None = None, allow_unsigned: bool = False) -> dict:
    """The bundle manifest of an installed bundle, after checking its signature and every file's hash
    (without a public key only with `allow_unsigned`) and its settings."""
    directory = Path(directory)
    require_key(directory, public_key, allow_unsigned)
    path = directory / BUNDLE_JSON
    if not path.is_file():
        raise EdgekitError(f"{directory} is not an installed bundle (no {BUNDLE_JSON})",
                           "install one with 'edgekit install FILE --dest DIR', or pass the bundle file")
    try:
        data = path.read_bytes()
        sig_path = directory / BUNDLE_SIG
        sig = sig_path.read_bytes() if sig_path.is_file() else None
    except OSError as e:
        raise EdgekitError(f"cannot read {path}: {e.strerror or e}") from None
    _check_signature(directory, sig, data, load_public_key(public_key) if public_key else None)
    manifest = _parse_manifest(directory, data)
    # files built on the device (an engine, a timing cache) may be added; listed ones must be intact
    _compare(str(directory), manifest["files"], _installed_hashes(directory, manifest["files"]), extra_ok=True)
    check_settings(directory, manifest["settings"])
    return manifest


def run(target: str | Path, prompt: str, max_new_tokens: int = 16, public_key: str | Path | None = None,
        threshold: float | None = None, runtime: str | None = None, threads: int | None = None,
        temperature: float = 0.0, top_k: int = 0, seed: int = 0, force: bool = False, chat: bool = False,
        allow_unsigned: bool = False, prefill_chunk: int | None = None) -> dict:
    """Run an installed bundle, or verify and install a bundle file into a temporary directory and run it.

    The bundle's settings (runtime, threads, threshold) apply unless given here; chat=True answers `prompt`
    as a user message through the model's chat template (Hugging Face models that have one).
    """
    from edgekit.api import generate
    from edgekit.device import check_threads, usable_cores

    target = Path(target)
    check_threads(threads)
    if target.is_file():
        require_key(target, public_key, allow_unsigned)
        with tempfile.TemporaryDirectory(prefix="edgekit-run-") as td:
            dest = Path(td) / "bundle"
            install(target, dest, public_key=public_key, force=force, allow_unsigned=allow_unsigned)
            return {**run(dest, prompt, max_new_tokens, public_key, threshold, runtime, threads, temperature,
                          top_k, seed, chat=chat, allow_unsigned=allow_unsigned, prefill_chunk=prefill_chunk),
                    "bundle": str(target)}
    if not target.is_dir():
        raise EdgekitError(f"{target} does not exist", "pass an installed bundle directory or a bundle file")
    manifest = read_installed(target, public_key, allow_unsigned)
    tok = _read_tokenizer(target)
    # a Hugging Face tokenizer.json (tokenizers' format: a "model" section) for hf-* models, else edgekit's byte one
    known = FAMILIES.get(str(manifest.get("family", "")))
    hf = known is not None and known.tokenizer == "tokenizer.json" and isinstance(tok.get("model"), dict)
    if not hf and tok.get("type") != "byte":
        raise EdgekitError(f"{target}: tokenizer type {tok.get('type')!r} is not supported by this edgekit",
                           "upgrade edgekit on the device")
    s = manifest["settings"]
    # the bundle's thread count was chosen for its target device: never more than this machine's usable cores
    options = {"threads": threads or (min(s["threads"], usable_cores()) if s.get("threads") else None),
               "prefill_chunk": prefill_chunk}
    result = generate(target, prompt, max_new_tokens=max_new_tokens,
                      threshold=threshold if threshold is not None else s.get("threshold"),
                      temperature=temperature, top_k=top_k, seed=seed, runtime=runtime or s.get("runtime"),
                      chat=chat, **{k: v for k, v in options.items() if v})
    return {**result, "bundle": str(target), "device": manifest["compatibility"].get("device")}


def _read_tokenizer(directory: Path) -> dict:
    try:
        return json.loads((directory / TOKENIZER).read_text())
    except (OSError, ValueError) as e:
        raise EdgekitError(f"{directory}: cannot read {TOKENIZER} ({e})", TAMPERED) from None
