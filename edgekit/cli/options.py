"""Options shared by several commands, as `Annotated` aliases (one definition, one help text each),
and the checks that several commands make on their options."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgekit.errors import EdgekitError

# ---------------------------------------------------------------------------------------------------
# checks on option values, run while the command line is parsed (before any work): a bad value is an
# EdgekitError, so it prints the one line "error: ... (fix)" and exits 1 like every other user mistake
# ---------------------------------------------------------------------------------------------------


def at_least(low: int, option: str, fix: str | None = None):
    """Callback: an integer option (None allowed) must be >= low."""
    def check(value):
        if value is not None and value < low:
            raise EdgekitError(f"{option} must be at least {low}, got {value}", fix or f"pass {option} {low} or more")
        return value
    return check


def number(option: str, low: float | None = None, high: float | None = None, fix: str | None = None):
    """Callback: a float option (None allowed) must be finite (NaN and infinity are refused) and in
    [low, high] where given."""
    import math

    def check(value):
        if value is None:
            return value
        if not math.isfinite(value):
            raise EdgekitError(f"{option} must be a finite number, got {value}", fix or f"pass {option} a number")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low:g} and {high:g}" if low is not None and high is not None else \
                f"at least {low:g}" if low is not None else f"at most {high:g}"
            raise EdgekitError(f"{option} must be {bounds}, got {value:g}", fix or f"pass {option} {bounds}")
        return value
    return check


def threads_check(value):
    """Callback: --threads between 1 and this machine's usable cores."""
    from edgekit.device import check_threads

    return check_threads(value)


def utf8(text: str | None, option: str) -> str | None:
    """Command-line text must be valid UTF-8 (undecodable bytes arrive as lone surrogates)."""
    if text is not None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise EdgekitError(f"{option} is not valid UTF-8 text (byte {e.start} cannot be decoded)",
                               "pass UTF-8 text; check the terminal's or the script's encoding") from None
    return text


def model_source(value):
    """Callback: a .gguf file is converted to a Hugging Face directory once (cached) and that is the target."""
    if value is None or not str(value).lower().endswith(".gguf"):
        return value
    from edgekit.models.gguf import source

    return str(source(value))


Target = Annotated[str, typer.Argument(callback=model_source, help="Preset name (see 'edgekit models'), checkpoint, "
                                       "Hugging Face or artifact directory, or a llama/qwen2 .gguf file.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Verbose = Annotated[bool, typer.Option("--verbose", help="Show third-party warnings and logs live (default: only "
                                       "in the artifact's logs/ file).")]
Force = Annotated[bool, typer.Option("--force", help="Replace an existing output.")]
OutDir = Annotated[Path, typer.Option("--out", help="Output directory (written atomically).")]
FidelityData = Annotated[Path | None, typer.Option(
    "--fidelity-data", help="Text file the int8 fidelity check decodes (default: random tokens; task text for the "
    "reference checkpoints).")]

# text generation (generate, run)
Prompt = Annotated[str | None, typer.Option("--prompt", help="Text to continue.")]
Chat = Annotated[str | None, typer.Option("--chat", help="A user message, rendered with the model's chat "
                                          "template (Hugging Face models) and answered.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", callback=at_least(1, "--max-new-tokens"),
                                           help="Tokens to generate.")]
Threshold = Annotated[float | None, typer.Option("--threshold", callback=number("--threshold"),
                                                 help="R1 skip threshold (all gates).")]

PrefillChunk = Annotated[int | None, typer.Option("--prefill-chunk", callback=at_least(1, "--prefill-chunk"),
                                                 help="Feed the prompt through the KV cache at most N tokens at a "
                                                 "time (bounds prefill memory; same logits; default: one call).")]

# bundles
PublicKey = Annotated[Path | None, typer.Option("--public-key", help="ed25519 public key (edgekit.pub); "
                                                 "the bundle must then carry a valid signature.")]
AllowUnsigned = Annotated[bool, typer.Option("--allow-unsigned", help="Accept the bundle without checking its "
                                             "signature (needed when no --public-key is given).")]
BundleFile = Annotated[Path, typer.Argument(help="Bundle file (.tar.gz) written by 'edgekit package'.")]

# sampling (generate, run)
Temperature = Annotated[float, typer.Option("--temperature", callback=number("--temperature", low=0),
                                            help="0 = greedy.")]
TopK = Annotated[int, typer.Option("--top-k", callback=at_least(0, "--top-k", "pass --top-k 0 for all tokens, or "
                                   "a positive k"), help="Sample from the k most likely tokens (0 = all).")]
Seed = Annotated[int, typer.Option("--seed", callback=at_least(0, "--seed"), help="Sampling seed (0 or more).")]
MinCosine = Annotated[float | None, typer.Option("--min-cosine", callback=number("--min-cosine", 0, 1),
                                                 help="Fail below this logit cosine (0..1).")]

# devices and plan
Device = Annotated[str, typer.Option("--device", help="Target device profile (see 'edgekit devices'), or 'host'.")]

# profile and compare
PromptLen = Annotated[int, typer.Option("--prompt-len", callback=at_least(1, "--prompt-len"),
                                        help="Prompt tokens (seeded random).")]
NewTokens = Annotated[int, typer.Option("--new-tokens", callback=at_least(2, "--new-tokens", "decode latency needs "
                                        "at least 2 new tokens"), help="Tokens generated per request.")]
Batch = Annotated[int, typer.Option("--batch", callback=at_least(1, "--batch"), help="Sequences per call.")]
Warmup = Annotated[int, typer.Option("--warmup", callback=at_least(0, "--warmup"), help="Unmeasured runs first.")]
Runs = Annotated[int, typer.Option("--runs", callback=at_least(1, "--runs"), help="Measured runs.")]
ProfRuntime = Annotated[str | None, typer.Option("--runtime", help="torch or onnxruntime (default: by artifact).")]
TorchDtype = Annotated[str | None, typer.Option("--dtype", help="torch: fp32, fp16 or bf16.")]
TorchDevice = Annotated[str | None, typer.Option("--device", help="torch: cpu, cuda or cuda:N on this machine.")]
Provider = Annotated[str | None, typer.Option("--provider", help="onnxruntime: cpu, cuda or tensorrt.")]
Threads = Annotated[int | None, typer.Option("--threads", callback=threads_check, help="CPU threads (intra-op, 1 to "
                                              "the machine's usable cores).")]
ReportOut = Annotated[Path | None, typer.Option("--out", help="Also write the JSON report to this file.")]


def one_of(prompt: str | None, chat: str | None, command: str) -> None:
    """generate and run take exactly one of --prompt and --chat."""
    utf8(prompt, "--prompt")
    utf8(chat, "--chat")
    if (prompt is None) == (chat is None):
        raise EdgekitError(f"{command} needs one of --prompt or --chat", "--prompt TEXT continues text; --chat "
                           "MESSAGE answers it through the model's chat template")
