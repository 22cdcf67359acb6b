"""Signing keys: ed25519 key pairs (keygen), reading them, signing bundle.json and checking a signature."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from pathlib import Path

from edgekit.artifact import os_error
from edgekit.bundle.format import BUNDLE_JSON, BUNDLE_SIG, PRIVATE_KEY, PUBLIC_KEY, TAMPERED, _canonical
from edgekit.errors import EdgekitError


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
