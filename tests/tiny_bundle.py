"""A real tiny bundle built in code (v3-tiny checkpoint + byte tokenizer, packaged for 'cpu', unsigned), shared by
the tests that run or ship one (on sys.path through pyproject's pytest `pythonpath`)."""

from __future__ import annotations

from pathlib import Path


def v3_tiny_bundle(directory: Path, name: str = "v3-tiny.tar.gz") -> Path:
    from edgekit import bundle as bundles
    from edgekit.artifact import staging, write_manifest
    from edgekit.checkpoint import save_checkpoint
    from edgekit.models import build
    from edgekit.tokenizer import ByteTokenizer

    art = Path(directory) / "v3-tiny"
    with staging(art) as tmp:
        save_checkpoint(build("v3-tiny"), tmp)
        ByteTokenizer().save(tmp)
        write_manifest(tmp, format="checkpoint", model="v3-tiny")
    out = Path(directory) / name
    bundles.package(art, "cpu", out)
    return out
