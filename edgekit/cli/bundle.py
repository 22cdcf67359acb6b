"""IoT bundles (edgekit.bundle): keygen, package, verify, install, run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgekit.cli import render
from edgekit.cli.options import (
    AllowUnsigned,
    BundleFile,
    Chat,
    Force,
    JsonOut,
    MaxNewTokens,
    PrefillChunk,
    Prompt,
    PublicKey,
    Threshold,
    at_least,
    number,
    one_of,
)


def keygen_cmd(
    out: Annotated[Path, typer.Option("--out", help="Directory for edgekit.key (private) and edgekit.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key pair.")] = False,
    as_json: JsonOut = False,
) -> None:
    """Create an ed25519 key pair for signing bundles."""
    from edgekit import bundle as bundles

    r = bundles.keygen(out, force=force)
    render.emit(r, as_json, lambda r: render.say(
        f"wrote {r['private_key']} (private: keep it on the build machine) and {r['public_key']} "
        f"(ship this one; key id {r['key_id']})"))


def package_cmd(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (export, quantize or checkpoint).")],
    device: Annotated[str, typer.Option("--device", help="Target device profile (e.g. cpu, jetson-orin-nano).")],
    out: Annotated[Path, typer.Option("--out", help="Bundle file to write (.tar.gz, written atomically).")],
    sign_key: Annotated[Path | None, typer.Option("--sign-key", help="ed25519 private key (edgekit.key).")] = None,
    runtime: Annotated[str | None, typer.Option(help="Runtime on the device (default: by artifact).")] = None,
    threads: Annotated[int | None, typer.Option(callback=at_least(1, "--threads"), help="CPU threads on the device "
                                                "(run uses at most the device's usable cores).")] = None,
    threshold: Threshold = None,
    force: Force = False,
    as_json: JsonOut = False,
) -> None:
    """Bundle an artifact for a device: one reproducible, optionally signed .tar.gz."""
    from edgekit import bundle as bundles

    r = bundles.package(artifact, device, out, sign_key=sign_key, runtime=runtime, threads=threads,
                        threshold=threshold, force=force)
    render.emit(r, as_json, lambda r: render.say(
        f"wrote {r['bundle']}: {r['model']} for {r['device']}, {r['files']} files, {r['bytes']} bytes, "
        f"sha256 {r['sha256']}, signed: {r['signed']}"))


def verify_cmd(file: BundleFile, public_key: PublicKey = None, as_json: JsonOut = False) -> None:
    """Check a bundle: signature, every file's hash, none missing, none extra."""
    from edgekit import bundle as bundles

    r = bundles.verify(file, public_key)
    render.emit(r, as_json, lambda r: render.say(
        "\n".join([f"OK {r['bundle']}: {r['model']} for {r['device']}", *(f"  {c}" for c in r["checks"])])))


def install_cmd(
    file: BundleFile,
    dest: Annotated[Path, typer.Option("--dest", help="Directory to install into (created atomically).")],
    public_key: PublicKey = None,
    allow_unsigned: AllowUnsigned = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an installed bundle at --dest and skip the "
                                                         "machine check.")] = False,
    as_json: JsonOut = False,
) -> None:
    """Verify a bundle (signature: --public-key, or --allow-unsigned), check this machine, install it atomically."""
    from edgekit import bundle as bundles

    r = bundles.install(file, dest, public_key=public_key, force=force, allow_unsigned=allow_unsigned)
    render.emit(r, as_json, lambda r: render.say(
        "\n".join([f"installed {r['model']} to {r['installed']} (signature: {r['signature']}; engine: "
                   f"{r['engine']})", *(f"  machine: {m}" for m in r["machine"])])))


def run_cmd(
    target: Annotated[Path, typer.Argument(help="Installed bundle directory, or a bundle file.")],
    prompt: Prompt = None,
    chat: Chat = None,
    max_new_tokens: MaxNewTokens = 16,
    public_key: PublicKey = None,
    allow_unsigned: AllowUnsigned = False,
    threshold: Annotated[float | None, typer.Option("--threshold", callback=number("--threshold"),
                                                    help="Override the bundle's threshold.")] = None,
    prefill_chunk: PrefillChunk = None,
    force: Annotated[bool, typer.Option("--force", help="Run a bundle file even if this machine does not "
                                                         "match its target.")] = False,
    as_json: JsonOut = False,
) -> None:
    """Run an installed bundle (or verify and run a bundle file) with its runtime and settings."""
    from edgekit import bundle as bundles

    one_of(prompt, chat, "run")
    r = bundles.run(target, prompt if chat is None else chat, max_new_tokens=max_new_tokens, public_key=public_key,
                    threshold=threshold, force=force, chat=chat is not None, allow_unsigned=allow_unsigned,
                    prefill_chunk=prefill_chunk)
    render.emit(r, as_json, render.show_run)


def register(app: typer.Typer) -> None:
    app.command("keygen")(keygen_cmd)
    app.command("package")(package_cmd)
    app.command("verify")(verify_cmd)
    app.command("install")(install_cmd)
    app.command("run")(run_cmd)
