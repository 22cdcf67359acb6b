"""Options shared by several commands, as `Annotated` aliases (one definition, one help text each),
and the checks that several commands make on their options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgekit.errors import EdgekitError

Target = Annotated[str, typer.Argument(help="Preset name (see 'edgekit models'), checkpoint or artifact directory.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
OutDir = Annotated[Path, typer.Option("--out", help="Output directory (written atomically).")]
FidelityData = Annotated[Path | None, typer.Option(
    "--fidelity-data", help="Text file the int8 fidelity check decodes (default: random tokens; task text for the "
    "reference checkpoints).")]

# text generation (generate, run)
Prompt = Annotated[str | None, typer.Option("--prompt", help="Text to continue.")]
Chat = Annotated[str | None, typer.Option("--chat", help="A user message, rendered with the model's chat "
                                          "template (Hugging Face models) and answered.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate.")]
Threshold = Annotated[float | None, typer.Option("--threshold", help="R1 skip threshold (all gates).")]

# bundles
PublicKey = Annotated[Path | None, typer.Option("--public-key", help="ed25519 public key (edgekit.pub); "
                                                 "the bundle must then carry a valid signature.")]
BundleFile = Annotated[Path, typer.Argument(help="Bundle file (.tar.gz) written by 'edgekit package'.")]

# devices and plan
Device = Annotated[str, typer.Option("--device", help="Target device profile (see 'edgekit devices'), or 'host'.")]

# profile and compare
PromptLen = Annotated[int, typer.Option("--prompt-len", min=1, help="Prompt tokens (seeded random).")]
NewTokens = Annotated[int, typer.Option("--new-tokens", min=2, help="Tokens generated per request.")]
Batch = Annotated[int, typer.Option("--batch", min=1, help="Sequences per call.")]
Warmup = Annotated[int, typer.Option("--warmup", min=0, help="Unmeasured runs first.")]
Runs = Annotated[int, typer.Option("--runs", min=1, help="Measured runs.")]
ProfRuntime = Annotated[str | None, typer.Option("--runtime", help="torch or onnxruntime (default: by artifact).")]
TorchDtype = Annotated[str | None, typer.Option("--dtype", help="torch: fp32, fp16 or bf16.")]
TorchDevice = Annotated[str | None, typer.Option("--device", help="torch: cpu, cuda or cuda:N on this machine.")]
Provider = Annotated[str | None, typer.Option("--provider", help="onnxruntime: cpu, cuda or tensorrt.")]
Threads = Annotated[int | None, typer.Option("--threads", min=1, help="CPU threads (intra-op).")]
ReportOut = Annotated[Path | None, typer.Option("--out", help="Also write the JSON report to this file.")]


def one_of(prompt: str | None, chat: str | None, command: str) -> None:
    """generate and run take exactly one of --prompt and --chat."""
    if (prompt is None) == (chat is None):
        raise EdgekitError(f"{command} needs one of --prompt or --chat", "--prompt TEXT continues text; --chat "
                           "MESSAGE answers it through the model's chat template")
