"""`fleet report DIR`: one row per device from a fleet run's directory (fleet.json + devices/NAME.json),
`edgekit plan`'s estimate beside the measurement where the device's profile is known, and a PNG.

The estimate needs the model's shape, which for the V3 / R1 families is counted on torch's meta device;
fleet itself never imports torch, so the estimates run in one child process (`python -c`, edgekit.plan).
Where that process cannot run (no torch on this machine) each row says why instead. A plain CPU device
('host') has no estimate here: its profile is measured on the device, and the report's own
fraction of roofline already compares it with its measured bandwidth.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.fleet.run import BUNDLE_DIR, DEVICES, SUMMARY

MIB = 2**20
PLAN_TIMEOUT = 600
PLAN_CHILD = r"""
import json, sys
from edgekit.errors import EdgekitError
from edgekit.plan import plan
out = []
for r in json.loads(sys.stdin.read()):
    try:
        first = plan(r["model"], r["device"], precision=r["precision"], context=r["prompt_len"], batch=r["batch"])
        full = plan(r["model"], r["device"], precision=r["precision"], context=r["prompt_len"] + r["new_tokens"],
                    batch=r["batch"])
        a, b = first["rows"][0], full["rows"][0]
        ttft_ms = r["batch"] * r["prompt_len"] / a["prefill_tokens_per_s"] * 1000
        out.append({"ttft_ms": ttft_ms, "decode_tokens_per_s": b["decode_tokens_per_s"], "fits": b["fits"],
                    "runtime": b["runtime"], "label": full["label"]})
    except EdgekitError as e:
        out.append({"error": str(e)})
print(json.dumps(out))
"""


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise EdgekitError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise EdgekitError(f"{path} is not JSON ({e})", "run 'edgekit fleet profile' again into a new --out") from None


def measured_row(name: str, record: dict, report: dict | None) -> dict:
    row = {"device": name, "status": record.get("status", "ok" if report else "missing"),
           "error": record.get("error"), "profile": record.get("profile") or _get(report, "device", "profile")}
    if report is None:
        return row
    rt = report.get("runtime") or {}
    energy = report.get("energy") or {}
    gpu_peak = _get(report, "memory", "cuda_max_reserved_bytes")
    row.update({
        "runtime": rt.get("runtime") + (f" ({rt['provider']})" if rt.get("provider") else "")
        if rt.get("runtime") else None,
        "precision": rt.get("precision") or _get(report, "size", "precision"),
        "ttft_ms_p50": _get(report, "latency", "ttft_ms", "p50"),
        "decode_ms_p50": _get(report, "latency", "decode_ms_per_token", "p50"),
        "decode_ms_p99": _get(report, "latency", "decode_ms_per_token", "p99"),
        "tokens_per_s": _get(report, "latency", "decode_tokens_per_s"),
        "peak_memory_mib": round(_get(report, "memory", "peak_rss_bytes") / MIB, 1)
        if _get(report, "memory", "peak_rss_bytes") else None,
        "gpu_peak_mib": round(gpu_peak / MIB, 1) if gpu_peak else None,
        "joules_per_token": energy.get("joules_per_token") if energy.get("available") else None,
        "energy_note": None if energy.get("available") else energy.get("reason"),
        "fraction_of_roofline": _get(report, "roofline", "fraction_of_roofline"),
        "interrupted": bool(report.get("interrupted")),
        "settings": {k: _get(report, "settings", k) for k in ("prompt_len", "new_tokens", "batch")},
    })
    return row


def estimates(model_dir: Path, rows: list[dict]) -> None:
    """plan's estimate for every row whose device profile is known (one child process for all)."""
    asks, where = [], []
    for row in rows:
        if "tokens_per_s" not in row:
            continue
        profile = row.get("profile")
        if not profile or profile == "host":
            row["estimate"], row["estimate_note"] = None, "CPU device: measured on the device (see fraction of " \
                                                          "roofline)" if profile == "host" else "device profile unknown"
            continue
        if not (model_dir / "config.json").is_file():
            row["estimate"], row["estimate_note"] = None, f"no {BUNDLE_DIR}/config.json in the run directory"
            continue
        asks.append({"model": str(model_dir), "device": profile, "precision": row["precision"] or "fp32",
                     **row["settings"]})
        where.append(row)
    if not asks:
        return
    try:
        done = subprocess.run([sys.executable, "-c", PLAN_CHILD], input=json.dumps(asks), capture_output=True,
                              text=True, timeout=PLAN_TIMEOUT)
        answers = json.loads(done.stdout) if done.returncode == 0 else None
        why = None if answers else (done.stderr.strip().splitlines() or ["no output"])[-1]
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        answers, why = None, str(e)
    for i, row in enumerate(where):
        a = answers[i] if answers else {"error": f"edgekit plan could not run here: {why}"}
        row["estimate"] = None if "error" in a else a
        row["estimate_note"] = a.get("error")
        if row["estimate"] and row.get("tokens_per_s") and a.get("decode_tokens_per_s"):
            row["measured_over_estimate"] = round(row["tokens_per_s"] / a["decode_tokens_per_s"], 3)


def write_png(rows: list[dict], path: Path, title: str) -> Path:
    """Decode tokens/s and TTFT p50 per device, the estimate beside each measurement where there is one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from edgekit.artifact import os_error

    fig = Figure(figsize=(max(6.4, 1.6 * len(rows) + 2) * 2, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    x = list(range(len(rows)))
    for ax, key, est_key, label in ((axes[0], "tokens_per_s", "decode_tokens_per_s", "decode tokens/s"),
                                    (axes[1], "ttft_ms_p50", "ttft_ms", "time to first token p50 (ms)")):
        measured = [r.get(key) or 0 for r in rows]
        est = [(r.get("estimate") or {}).get(est_key) or 0 for r in rows]
        ax.bar([i - 0.2 for i in x], measured, 0.4, color="#4c72b0", label="measured")
        if any(est):
            ax.bar([i + 0.2 for i in x], est, 0.4, color="#dd8452", hatch="//", label="plan estimate")
        for i, r in enumerate(rows):
            if r["status"] != "ok":
                ax.annotate(r["status"], (i, 0), ha="center", va="bottom", color="#c44e52")
        ax.set_xticks(x, [r["device"] for r in rows], rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.legend()
    fig.suptitle(title)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise os_error(e, path) from None
    return path


def report(directory: str | Path, plot: str | Path | None = None, estimate: bool = True) -> dict:
    """The merged table of a fleet run directory; writes DIR/fleet.png unless `plot` names another file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise EdgekitError(f"{directory} does not exist", "pass the --out directory of 'edgekit fleet profile'")
    summary_path = directory / SUMMARY
    summary = _read(summary_path) if summary_path.is_file() else {}
    records = {r["device"]: r for r in summary.get("devices", []) if isinstance(r, dict) and "device" in r}
    for p in sorted((directory / DEVICES).glob("*.json")):  # reports of a run that never wrote fleet.json
        records.setdefault(p.stem, {"device": p.stem, "status": "ok", "report": f"{DEVICES}/{p.name}"})
    if not records:
        raise EdgekitError(f"{directory} holds no fleet results ({SUMMARY} or {DEVICES}/*.json)",
                           "pass the --out directory of 'edgekit fleet profile'")
    rows = []
    for name, rec in records.items():
        rep = _read(directory / rec["report"]) if rec.get("report") else None
        rows.append(measured_row(name, rec, rep))
    if estimate:
        estimates(directory / BUNDLE_DIR, rows)
    bundle = summary.get("bundle", {})
    title = f"{bundle.get('model', '?')} on {len(rows)} devices"
    try:
        png, plot_note = str(write_png(rows, Path(plot) if plot else directory / "fleet.png", title)), None
    except ImportError:  # a device install has no matplotlib: the table stands without its picture
        png, plot_note = None, "no PNG: matplotlib is not installed (pip install 'edgekit[plot]')"
    return {"directory": str(directory), "bundle": bundle, "interrupted": summary.get("interrupted", False),
            "rows": rows, "plot": png, "plot_note": plot_note, "ok": sum(r["status"] == "ok" for r in rows),
            "failed": [{"device": r["device"], "status": r["status"], "error": r["error"]}
                       for r in rows if r["status"] != "ok"]}
