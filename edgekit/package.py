"""IoT bundles: one signed, reproducible .tar.gz that a device checks, installs and runs.

A bundle is a gzip'd tar of regular files only (no directories, no links), in this order:

    bundle.json      the bundle manifest: sha256 + size of every other member, tool versions,
                     runtime settings (runtime, threads, threshold), the device target and its
                     compatibility (device, SM / JetPack / TensorRT range, minimum memory)
    bundle.sig       optional: an ed25519 signature over the exact bytes of bundle.json, as JSON
                     {"algorithm", "key_id", "signature" (base64)}. bundle.json does not mention the
                     signature, so signing never changes the manifest.
    config.json, manifest.json, model.safetensors | model.onnx (+ data), tokenizer.json (a Hugging Face
                     export's own, with tokenizer_config.json and its chat template), and any
                     TensorRT recipe / profile / validation report the artifact directory holds

Installed, a bundle is the artifact directory plus bundle.json (and bundle.sig): `edgekit generate
DEST` runs it like any artifact, and `edgekit run DEST` runs it with the bundle's settings.

Reproducible: members sorted after the two bundle files, uid/gid 0, no owner names, mtime 0, mode
0644, gzip header with mtime 0 and no file name, and ed25519 signatures are deterministic — the same
artifact, settings and edgekit install give the same bytes.

Trust (verify): every member must be a regular file with a plain relative path — checked as the
member is met, before its data is read; with a public key the signature must be present and valid;
every member's size and sha256 must match bundle.json, with no file missing and none extra; the
artifact's own manifest.json must agree with bundle.json; the gzip trailer (CRC, length) must be
intact. install verifies, checks this machine against the target, then extracts member by member
(the same checks again, plus tarfile's "data" filter) into a temporary sibling of dest, re-hashes
what it wrote and renames it into place (artifact.staging): a failure leaves nothing behind.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import io
import json
import os
import platform
import posixpath
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath

from edgekit.artifact import MANIFEST, dumps, os_error, partial_name, sha256_file, sweep_partials, versions
from edgekit.errors import EdgekitError, unknown_name
from edgekit.families import FAMILIES, is_gated, is_hf
from edgekit.versions import compatible, version_tuple

BUNDLE_FORMAT = 1
BUNDLE_JSON, BUNDLE_SIG = "bundle.json", "bundle.sig"
META = (BUNDLE_JSON, BUNDLE_SIG)
PRIVATE_KEY, PUBLIC_KEY = "edgekit.key", "edgekit.pub"
TOKENIZER = "tokenizer.json"
MAX_META = 16 << 20  # bundle.json, bundle.sig and the artifact manifest are read into memory: cap them
CHUNK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".onnx_data", ".bin", ".engine")

TAMPERED = "the bundle was altered or damaged; get it again from its publisher"


# ------------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------------


def keygen(out_dir: str | Path, force: bool = False) -> dict:
    """Write an ed25519 key pair: OUT/edgekit.key (private, PEM PKCS8, mode 0600) and OUT/edgekit.pub.

    The private key is not encrypted: keep it on the build machine, ship only edgekit.pub.
    """
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    priv, pub = out / PRIVATE_KEY, out / PUBLIC_KEY
    if out.exists() and not out.is_dir():
        raise EdgekitError(f"{out} is a file", "pass a directory to --out")
    for p in (priv, pub):
        if p.exists() and not force:
            raise EdgekitError(f"{p} already exists", "pass --force to replace the key pair, or choose another --out")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(ser.Encoding.PEM, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    pub_pem = key.public_key().public_bytes(ser.Encoding.PEM, ser.PublicFormat.SubjectPublicKeyInfo)
    tmps: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        # both files written in full before either is renamed into place
        for path, data, mode in ((priv, priv_pem, 0o600), (pub, pub_pem, 0o644)):
            tmp = path.with_name(f".{path.name}.partial")
            tmps.append(tmp)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmps[0], priv)
        os.replace(tmps[1], pub)
    except OSError as e:
        raise os_error(e, out) from None
    finally:
        for tmp in tmps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return {"private_key": str(priv), "public_key": str(pub), "key_id": key_id(key.public_key())}


def key_id(public_key) -> str:
    """A short fingerprint of a public key: the first 16 hex digits of sha256 over its 32 raw bytes."""
    from cryptography.hazmat.primitives import serialization as ser

    raw = public_key.public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _read_key_file(path: str | Path, option: str) -> bytes:
    path = Path(path)
    if not path.exists():
        raise EdgekitError(f"{option} {path} does not exist", "create a key pair with 'edgekit keygen --out DIR'")
    if not path.is_file():
        raise EdgekitError(f"{option} {path} is not a regular file", "pass the key file written by 'edgekit keygen'")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgekitError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > 64 << 10:
        raise EdgekitError(f"{path} is not a key file (too large)", "pass a file written by 'edgekit keygen'")
    return data


def load_private_key(path: str | Path):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_file(path, "--sign-key")
    try:
        key = ser.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        hint = "pass the public key to --public-key instead" if b"PUBLIC KEY" in data else \
            "pass the edgekit.key written by 'edgekit keygen'"
        raise EdgekitError(f"{path} is not an unencrypted PEM private key", hint) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise EdgekitError(f"{path} is not an ed25519 key", "create one with 'edgekit keygen --out DIR'")
    return key


def load_public_key(path: str | Path):
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read_key_file(path, "--public-key")
    if b"PRIVATE KEY" in data:
        raise EdgekitError(f"{path} is a private key", "pass the public key (edgekit.pub); keep the private key "
                           "off the device")
    try:
        key = ser.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise EdgekitError(f"{path} is not a PEM public key", "pass the edgekit.pub written by 'edgekit keygen'") \
            from None
    if not isinstance(key, Ed25519PublicKey):
        raise EdgekitError(f"{path} is not an ed25519 key", "pass the edgekit.pub written by 'edgekit keygen'")
    return key


def _signature_bytes(private_key, manifest_bytes: bytes) -> bytes:
    sig = {"algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
           "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode()}
    return _canonical(sig)


UNVERIFIED_FIX = ("pass --public-key with the publisher's edgekit.pub, or --allow-unsigned to accept the bundle "
                  "without checking who made it")


def require_key(where, public_key, allow_unsigned: bool) -> None:
    """install and run verify by default: without a public key they refuse unless --allow-unsigned."""
    if public_key is None and not allow_unsigned:
        raise EdgekitError(f"{where}: no --public-key to check the bundle's signature against", UNVERIFIED_FIX)


def _check_signature(file: Path, sig_bytes: bytes | None, manifest_bytes: bytes, public_key) -> str:
    """'valid (key ...)', 'unsigned' or 'present, not checked'; raises when a given key does not match."""
    from cryptography.exceptions import InvalidSignature

    if public_key is None:
        return "unsigned" if sig_bytes is None else "present, not checked (pass --public-key to check it)"
    want = key_id(public_key)
    if sig_bytes is None:
        raise EdgekitError(f"{file} is not signed, but a public key was given",
                           "ask the publisher for a bundle signed with 'edgekit package --sign-key'")
    try:
        sig = json.loads(sig_bytes)
        if sig.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {sig.get('algorithm')!r}")
        raw = base64.b64decode(sig["signature"], validate=True)
        public_key.verify(raw, manifest_bytes)
    except InvalidSignature:
        got = sig.get("key_id")
        if got != want:
            raise EdgekitError(f"{file}: signed by another key ({got}), not by the public key {want}",
                               "get the bundle and its public key from the same publisher") from None
        raise EdgekitError(f"{file}: the signature does not match {BUNDLE_JSON} (key {want})", TAMPERED) from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise EdgekitError(f"{file}: {BUNDLE_SIG} is malformed ({e})", TAMPERED) from None
    return f"valid (ed25519 key {want})"


# ------------------------------------------------------------------------------------------------
# device target and this machine
# ------------------------------------------------------------------------------------------------


GENERIC_CPU = "cpu"  # a target with no profile: any CPU machine; only memory is checked


def _device_profile(device: str):
    """The device's profile (profiles.load: a TOML in profiles/, or 'host'), None for the generic 'cpu'.

    The one place that reads device facts: edgekit.package never writes device numbers itself.
    """
    if device == GENERIC_CPU:
        return None
    import profiles

    try:
        return profiles.load(device)  # unknown names: one line with the nearest match
    except EdgekitError as e:
        if e.message.startswith("unknown device"):
            raise unknown_name("device", device, [*profiles.names(), "host", GENERIC_CPU]) from None
        raise


def _weights_bytes(table: dict[str, dict]) -> int:
    return sum(m["size"] for rel, m in table.items() if rel.endswith(WEIGHT_SUFFIXES))


def compatibility(device: str, res, table: dict[str, dict], settings: dict) -> dict:
    """What a machine must offer to run this bundle: from the device profile and `edgekit plan`.

    Minimum memory is plan's estimate (weights + KV cache + activations + the device's reserve) at the
    model's full context, so any prompt the bundle accepts fits; for the generic 'cpu' target (no
    profile) it is the weight bytes, a lower bound.
    """
    profile = _device_profile(device)
    if profile is None:
        return {"device": device, "kind": "cpu", "profile": None, "min_memory_bytes": _weights_bytes(table),
                "min_memory_source": "weight bytes (a lower bound: the generic 'cpu' target has no profile)"}
    from edgekit import plan

    precision = res.manifest.get("precision") or "fp32"
    context = res.cfg.max_seq_len
    if precision not in profile.precisions:
        raise EdgekitError(f"{res.name} is {precision}, which {profile.name} does not run (it runs "
                           f"{', '.join(profile.precisions)})", "package an artifact in one of those precisions "
                           "(export --int8, or export --format tensorrt), or choose another --device")
    row = plan.plan(res.path, profile.name, precision=precision, context=context)["rows"][0]
    if not row["fits"]:
        raise EdgekitError(f"{res.name} ({precision}) does not fit {profile.name}: edgekit plan estimates "
                           f"{row['total_gib']:.2f} GiB at {context} tokens, the device has {profile.memory_gib:g} GiB",
                           "quantize it (edgekit quantize, or export --int8) or choose a larger --device")
    compat = {"device": profile.name, "title": profile.title, "kind": profile.kind, "profile": profile.path or "host",
              "device_memory_bytes": int(profile.memory_gib * 2**30),
              "min_memory_bytes": int(row["total_gib"] * 2**30),
              "min_memory_source": f"edgekit plan estimate ({precision}, {context} tokens, batch 1)"}
    if profile.kind == "jetson":
        compat["arch"] = "aarch64"  # every Jetson runs an aarch64 L4T
    elif profile.kind == "cpu" and profile.arch in ("x86_64", "amd64", "aarch64", "arm64"):
        compat["arch"] = profile.arch
    if profile.sm:
        compat["sm"] = profile.sm
    if profile.tensorrt_versions:
        compat["tensorrt"] = sorted(set(profile.tensorrt_versions), key=version_tuple)
    jetpack = [st["jetpack"] for st in profile.stacks if "jetpack" in st]
    if jetpack:
        compat["jetpack"] = jetpack
    return compat


def host_facts(need_gpu: bool = False, need_tensorrt: bool = False) -> dict:
    """This machine: CPU arch, memory, Jetson or not; the GPU's SM and TensorRT only when asked."""
    import psutil

    facts = {"arch": platform.machine().lower(), "memory_bytes": psutil.virtual_memory().total,
             "jetson": Path("/etc/nv_tegra_release").exists()}
    with contextlib.suppress(OSError):
        facts["jetson"] = facts["jetson"] or "jetson" in Path("/proc/device-tree/model").read_text().lower()
    if need_gpu:
        try:
            import torch

            if torch.cuda.is_available():
                p = torch.cuda.get_device_properties(0)
                facts["sm"] = f"{p.major}.{p.minor}"
                facts["gpu_memory_bytes"] = p.total_memory
        except ImportError:
            pass
    if need_tensorrt and facts["jetson"]:
        import subprocess

        with contextlib.suppress(OSError, subprocess.SubprocessError):
            v = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
            if v:
                facts["jetpack"] = v.split("-")[0].split("+")[0]
    if need_tensorrt:
        import importlib.metadata as md

        for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-libs"):
            with contextlib.suppress(md.PackageNotFoundError):
                facts["tensorrt"] = md.version(dist)
                break
    return facts


def check_machine(compat: dict, settings: dict, host: dict | None = None) -> tuple[list[str], list[str]]:
    """(what matches, what does not) for this machine against a bundle's compatibility block.

    Always: memory (GPU memory on a discrete GPU, RAM elsewhere) and CPU arch where the target names
    one. A Jetson target needs a Jetson. A GPU target needs a CUDA GPU of at least the target's SM. A
    TensorRT runtime needs TensorRT in the target's range and exactly the target's SM (engines are
    built per architecture).
    """
    kind = compat.get("kind", "cpu")
    trt = settings.get("runtime") == "tensorrt"
    if host is None:
        host = host_facts(need_gpu=kind == "gpu" or trt, need_tensorrt=trt)
    ok, bad = [], []
    want_arch = compat.get("arch")
    if want_arch:
        arm = {"aarch64", "arm64"}
        arch_ok = host["arch"] in arm if want_arch in arm else host["arch"] == want_arch
        (ok if arch_ok else bad).append(f"CPU {host['arch']} (target {want_arch})")
    if kind == "jetson":
        if host.get("jetson"):
            ok.append("a Jetson")
        else:
            bad.append(f"not a Jetson (no /etc/nv_tegra_release on this {host['arch']} machine)")
    if kind == "gpu" or trt:
        want_sm = compat.get("sm")
        if host.get("sm") is None:
            bad.append("no CUDA GPU visible" + (f" (target SM {want_sm})" if want_sm else ""))
        elif want_sm is not None:
            have, want = version_tuple(host["sm"]), version_tuple(want_sm)
            sm_ok = have == want if trt else have >= want
            (ok if sm_ok else bad).append(f"GPU SM {host['sm']} (target SM {want_sm}{'' if trt else ' or newer'})")
        else:
            ok.append(f"GPU SM {host['sm']}")
    if trt:
        if "tensorrt" not in host:
            bad.append("TensorRT is not installed (JetPack, or pip install 'edgekit[tensorrt]')")
        elif compat.get("tensorrt") and not compatible(host["tensorrt"], compat["tensorrt"]):
            bad.append(f"TensorRT {host['tensorrt']} (target {compat['tensorrt']})")
        else:
            ok.append(f"TensorRT {host['tensorrt']}")
        if kind == "jetson" and compat.get("jetpack") and host.get("jetson"):
            if "jetpack" not in host:
                ok.append("JetPack version not found (nvidia-jetpack package); TensorRT checked instead")
            elif compatible(host["jetpack"], compat["jetpack"]):
                ok.append(f"JetPack {host['jetpack']}")
            else:
                bad.append(f"JetPack {host['jetpack']} (target {', '.join(compat['jetpack'])})")
    need = int(compat.get("min_memory_bytes") or 0)
    gpu_mem = kind == "gpu" and "gpu_memory_bytes" in host
    have = int(host.get("gpu_memory_bytes" if gpu_mem else "memory_bytes", 0))
    (ok if have >= need else bad).append(f"{'GPU memory' if gpu_mem else 'memory'} {_gib(have)} (needs {_gib(need)})")
    return ok, bad


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------
# package
# ------------------------------------------------------------------------------------------------


def _canonical(obj) -> bytes:
    return (dumps(obj, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()


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


# ------------------------------------------------------------------------------------------------
# reading a bundle: member checks, one streaming pass, verify
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# install and run
# ------------------------------------------------------------------------------------------------


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
        allow_unsigned: bool = False) -> dict:
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
                          top_k, seed, chat=chat, allow_unsigned=allow_unsigned), "bundle": str(target)}
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
    options = {"threads": threads or (min(s["threads"], usable_cores()) if s.get("threads") else None)}
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


__all__ = ["keygen", "package", "verify", "install", "run", "read_installed", "check_machine", "compatibility",
           "host_facts", "check_member", "load_private_key", "load_public_key", "key_id"]
