"""IoT bundles: one signed, reproducible .tar.gz that a device checks, installs and runs.

The format (what a bundle holds, how it is made reproducible, what verify trusts) is described in
edgekit/bundle/format.py. The modules, each importing only those before it:

    format   names, limits, the canonical JSON of bundle.json and bundle.sig
    keys     ed25519 key pairs, signing, checking a signature
    compat   the device target's needs and this machine's facts (check_machine)
    write    settings and packaging (the reproducible tar writer)
    read     member checks, the streaming reader, the bundle manifest, verify
    deploy   install (private copy, atomic extraction, the TensorRT engine), read_installed, run
"""

from edgekit.bundle.compat import check_machine, compatibility, host_facts
from edgekit.bundle.deploy import install, read_installed, run
from edgekit.bundle.keys import key_id, keygen, load_private_key, load_public_key
from edgekit.bundle.read import check_member, verify
from edgekit.bundle.write import package

__all__ = ["keygen", "package", "verify", "install", "run", "read_installed", "check_machine", "compatibility",
           "host_facts", "check_member", "load_private_key", "load_public_key", "key_id"]
