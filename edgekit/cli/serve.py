"""edgekit serve (an OpenAI-compatible HTTP server) and edgekit cascade calibrate (its R1 -> V3 policy)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgekit.cli import render
from edgekit.cli.options import AllowUnsigned, Force, JsonOut, PublicKey, Threads, at_least, number


def serve_cmd(
    target: Annotated[str, typer.Argument(help="Artifact (or preset / checkpoint) directory, installed bundle "
                                          "directory or bundle file (.tar.gz, verified first).")],
    fallback: Annotated[str | None, typer.Option("--fallback", help="Cascade: the model (V3) that answers "
                                                 "requests below the policy's confidence threshold.")] = None,
    policy: Annotated[Path | None, typer.Option("--policy", help="Cascade policy file from 'edgekit cascade "
                                                "calibrate'.")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (default: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", callback=at_least(0, "--port"), help="TCP port.")] = 8000,
    batching: Annotated[str, typer.Option("--batching", help="dynamic (continuous, by prompt length under the "
                                          "token budget) or fixed (arrival order, a batch runs to completion).")]
    = "dynamic",
    max_batch: Annotated[int, typer.Option("--max-batch", callback=at_least(1, "--max-batch"),
                                           help="Rows per model call at most.")] = 8,
    token_budget: Annotated[int | None, typer.Option("--token-budget", callback=at_least(1, "--token-budget"),
                                                     help="dynamic: rows x padded cache length at most (default: "
                                                     "max batch x context).")] = None,
    queue_limit: Annotated[int, typer.Option("--queue-limit", callback=at_least(1, "--queue-limit"),
                                             help="Waiting requests at most; more get 429 + Retry-After.")] = 64,
    timeout: Annotated[float, typer.Option("--timeout", callback=number("--timeout", low=0.001),
                                           help="Seconds a request may take (504 after).")] = 60.0,
    max_tokens: Annotated[int, typer.Option("--max-tokens", callback=at_least(1, "--max-tokens"),
                                            help="Cap on a request's max_tokens.")] = 256,
    threads: Threads = None,
    threshold: Annotated[float | None, typer.Option("--threshold", callback=number("--threshold"),
                                                    help="R1 skip threshold (default: the model's or bundle's).")]
    = None,
    public_key: PublicKey = None,
    allow_unsigned: AllowUnsigned = False,
    drain: Annotated[float, typer.Option("--drain", callback=number("--drain", low=0),
                                         help="On shutdown, seconds admitted requests may still take.")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print what is served (and 'stopped') as JSON lines.")]
    = False,
) -> None:
    """Serve a model over HTTP: OpenAI-compatible /v1/completions and /v1/chat/completions, /health, /metrics."""
    from edgekit.serve import Options, open_service
    from edgekit.serve.server import serve

    options = Options(batching, max_batch, token_budget, queue_limit, timeout, max_tokens, threads, threshold,
                      None, public_key, allow_unsigned, drain)
    service = open_service(target, fallback, policy, options)
    import json

    models = " -> ".join(m.name for m in service.models)
    if as_json:
        print(json.dumps({"url": f"http://{host}:{port}", **service.describe()}), flush=True)
    else:
        render.say(f"serving {models} on http://{host}:{port} ({batching} batching, max batch {max_batch}, "
                   f"queue {queue_limit}); Ctrl-C drains and stops")
    serve(service, host, port)
    print(json.dumps({"stopped": True}) if as_json else "stopped", flush=True)


def calibrate_cmd(
    primary: Annotated[str, typer.Argument(help="The model that answers first (R1).")],
    fallback: Annotated[str, typer.Argument(help="The model that answers escalated requests (V3).")],
    data: Annotated[Path, typer.Option("--data", help=".jsonl of {\"prompt\", \"answer\"} objects, or one prompt "
                                       "per line.")],
    out: Annotated[Path, typer.Option("--out", help="Policy file to write (JSON).")],
    rate: Annotated[float, typer.Option("--rate", callback=number("--rate", 0, 1),
                                        help="Share of requests to escalate (0..1).")] = 0.2,
    signal: Annotated[str, typer.Option("--signal", help="probe (needs answers), margin, neg_entropy or "
                                        "mean_logprob.")] = "probe",
    threads: Threads = None,
    force: Force = False,
    as_json: JsonOut = False,
) -> None:
    """Choose the cascade's confidence threshold for a target escalation rate and write the policy."""
    from edgekit.serve.calibrate import calibrate

    r = calibrate(primary, fallback, data, rate, out, signal=signal, threads=threads, force=force)

    def show(r):
        acc = (f"; on the data: primary {r['primary_accuracy']:.1%}, fallback {r['fallback_accuracy']:.1%}, "
               f"cascade {r['cascade_accuracy']:.1%}") if "cascade_accuracy" in r else ""
        render.say(f"wrote {r['policy']}: signal {r['signal']}, threshold {r['threshold']:.6g}, escalates "
                   f"{r['achieved_rate']:.1%} of {r['n']} requests (asked {r['rate']:.1%}){acc}")

    render.emit(r, as_json, show)


cascade = typer.Typer(help="The R1 -> V3 cascade: calibrate its policy.", no_args_is_help=True)
cascade.command("calibrate")(calibrate_cmd)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.add_typer(cascade, name="cascade")
