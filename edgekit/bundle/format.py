"""The bundle format: names, limits and the canonical JSON of bundle.json / bundle.sig.

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

from edgekit.artifact import dumps

BUNDLE_FORMAT = 1
BUNDLE_JSON, BUNDLE_SIG = "bundle.json", "bundle.sig"
META = (BUNDLE_JSON, BUNDLE_SIG)
PRIVATE_KEY, PUBLIC_KEY = "edgekit.key", "edgekit.pub"
TOKENIZER = "tokenizer.json"
MAX_META = 16 << 20  # bundle.json, bundle.sig and the artifact manifest are read into memory: cap them
CHUNK = 1 << 20
WEIGHT_SUFFIXES = (".safetensors", ".onnx", ".data", ".onnx_data", ".bin", ".engine")

TAMPERED = "the bundle was altered or damaged; get it again from its publisher"


def _canonical(obj) -> bytes:
    return (dumps(obj, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()
