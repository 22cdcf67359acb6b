"""edgekit fleet check / profile / report: one bundle on many devices over SSH (edgekit.fleet)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from edgekit.cli import render
from edgekit.cli.options import (
    Batch,
    BundleFile,
    JsonOut,
    NewTokens,
    ProfRuntime,
    PromptLen,
    Provider,
    PublicKey,
    Runs,
    Threads,
    Threshold,
    Warmup,
)

Hosts = Annotated[Path, typer.Option("--hosts", help="fleet.toml: the devices by name (README: 'Profiling a fleet').")]
Only = Annotated[list[str] | None, typer.Option("--only", help="Only this device of fleet.toml (repeatable).")]
AcceptNew = Annotated[bool, typer.Option("--accept-new-host-keys", help="Record the key of a host that known_hosts "
                                         "does not list yet (trust on first use); a changed key is always refused.")]
AllowUnsigned = Annotated[bool, typer.Option("--allow-unsigned", help="Install the bundle on the devices without "
                                             "checking its signature (else --public-key is required).")]
Parallel = Annotated[int, typer.Option("--parallel", min=1, help="Devices worked on at once.")]

app = typer.Typer(help="Profile one bundle on many devices over SSH and merge one report.", no_args_is_help=True)


def _num(v, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _said(device: str, text: str | None) -> str:
    text = text or "no details"
    return text if text.startswith(device) else f"{device}: {text}"


def _table(r: dict) -> None:
    """One row per device; plan's estimate in brackets beside the measurement it estimates."""
    rows = []
    for x in r["rows"]:
        est = x.get("estimate") or {}

        def plan(key: str, digits: int, est: dict = est) -> str:
            return f" ({_num(est[key], digits)})" if est.get(key) is not None else ""

        rows.append({
            "device": x["device"], "status": x["status"],
            "runtime": f"{x.get('runtime') or '—'} {x.get('precision') or ''}".strip(),
            "TTFT p50 ms (plan)": _num(x.get("ttft_ms_p50")) + plan("ttft_ms", 3),
            "decode p50/p99 ms": f"{_num(x.get('decode_ms_p50'))}/{_num(x.get('decode_ms_p99'))}"
            if x.get("decode_ms_p50") is not None else "—",
            "tokens/s (plan)": _num(x.get("tokens_per_s"), 1) + plan("decode_tokens_per_s", 1),
            "peak MiB": _num(x.get("peak_memory_mib"), 0) + (f" (GPU {x['gpu_peak_mib']:.0f})"
                                                              if x.get("gpu_peak_mib") else ""),
            "J/token": _num(x.get("joules_per_token"), 4),
            "roofline": _num(x.get("fraction_of_roofline")),
        })
    render.show_rows(rows, list(rows[0]))
    for x in r["rows"]:
        if x["status"] != "ok":
            render.say(f"{x['status']}: {_said(x['device'], x.get('error'))}")
        elif x.get("estimate_note") and x.get("profile") not in (None, "host"):
            render.say(f"no estimate: {_said(x['device'], x['estimate_note'])}")
    render.say(f"plot: {r['plot']}" if r["plot"] else r["plot_note"])
    if any(x.get("estimate") for x in r["rows"]):
        render.say("(plan): edgekit plan's roofline estimate for the device's profile, not a measurement")


def check_cmd(hosts: Hosts, only: Only = None, parallel: Parallel = 8, accept_new: AcceptNew = False,
              as_json: JsonOut = False) -> None:
    """Reach every device: host key, login, remote edgekit version, identity against its expected profile."""
    from edgekit import fleet

    r = fleet.check(hosts, only, parallel=parallel, accept_new_host_keys=accept_new)

    def show(r: dict) -> None:
        rows = []
        for d in r["devices"]:
            ident = d.get("identity") or {}
            what = (ident.get("jetson") or {}).get("model") or (ident.get("cuda") or {}).get("name") or \
                (f"CPU {ident.get('machine')}" if ident else "—")
            rows.append({"device": d["device"], "status": d["status"], "edgekit": d.get("edgekit") or "—",
                         "identity": what, "looks like": ident.get("profile") or "—",
                         "expected": d.get("expected_profile") or "—"})
        render.show_rows(rows, list(rows[0]))
        for d in r["devices"]:
            for p in ([d["error"]] if d.get("error") else []) + d.get("problems", []) + d.get("notes", []):
                render.say(_said(d["device"], p))

    render.emit(r, as_json, show)
    if r["interrupted"]:
        raise SystemExit(130)
    if r["ok"] < len(r["devices"]):
        raise SystemExit(1)


def profile_cmd(
    bundle: BundleFile,
    hosts: Hosts,
    out: Annotated[Path, typer.Option("--out", help="Directory for fleet.json, devices/NAME.json and the PNG.")] =
    Path("fleet-results"),
    parallel: Parallel = 4,
    only: Only = None,
    accept_new: AcceptNew = False,
    public_key: PublicKey = None,
    allow_unsigned: AllowUnsigned = False,
    timeout: Annotated[float | None, typer.Option("--timeout", min=1, help="Seconds per device (default: fleet.toml's "
                                                   "timeout, 1800).")] = None,
    purge: Annotated[bool, typer.Option("--purge", help="Also remove the cached bundle and edgekit's cache from "
                                        "each work directory (next run copies again).")] = False,
    prompt_len: PromptLen = 64,
    new_tokens: NewTokens = 32,
    batch: Batch = 1,
    warmup: Warmup = 1,
    runs: Runs = 5,
    threshold: Threshold = None,
    runtime: ProfRuntime = None,
    provider: Provider = None,
    threads: Threads = None,
    energy: Annotated[bool, typer.Option(help="Measure energy where the device reports power.")] = True,
    as_json: JsonOut = False,
) -> None:
    """Copy, verify, install and profile BUNDLE on every device of fleet.toml in parallel; one merged report."""
    from edgekit import fleet

    options = fleet.ProfileOptions(prompt_len=prompt_len, new_tokens=new_tokens, batch=batch, warmup=warmup,
                                   runs=runs, threshold=threshold, runtime=runtime, provider=provider, threads=threads,
                                   energy=energy)
    r = fleet.profile(bundle, hosts, out, only, parallel=parallel, accept_new_host_keys=accept_new, options=options,
                      public_key=public_key, allow_unsigned=allow_unsigned, purge=purge, timeout=timeout)
    merged = fleet.report(out)
    render.emit({**r, "report": merged}, as_json, lambda _: _table(merged))
    if r["interrupted"]:
        raise SystemExit(130)
    if r["failed"]:
        print(f"error: {r['failed']} of {len(r['devices'])} devices failed (their errors are in {out}/fleet.json; "
              "rerun them with --only NAME)", file=sys.stderr)
        raise SystemExit(1)


def report_cmd(
    directory: Annotated[Path, typer.Argument(help="The --out directory of 'edgekit fleet profile'.")],
    plot: Annotated[Path | None, typer.Option("--plot", help="PNG to write (default DIR/fleet.png).")] = None,
    estimate: Annotated[bool, typer.Option(help="Put plan's estimate beside each measurement (needs torch here "
                                           "for V3/R1 models; runs in a child process).")] = True,
    as_json: JsonOut = False,
) -> None:
    """One table over a fleet run: latency, throughput, memory, energy, roofline, plan's estimate; and a PNG."""
    from edgekit import fleet

    r = fleet.report(directory, plot=plot, estimate=estimate)
    render.emit(r, as_json, _table)


app.command("check")(check_cmd)
app.command("profile")(profile_cmd)
app.command("report")(report_cmd)


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="fleet")
