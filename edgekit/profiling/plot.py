"""The profile as a PNG (`--plot`): matplotlib's Agg canvas directly (no pyplot state)."""

from __future__ import annotations

from pathlib import Path


def write_plot(report: dict, path: str | Path) -> Path:
    """PNG: decode-latency distribution; with a sweep, latency and skipped fraction vs threshold; with a
    mixed workload, the two batching throughputs. Matplotlib's Agg canvas directly (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from edgekit.artifact import os_error

    panels = [p for p in ("latency", "sweep", "workload") if report.get(p) and (p != "latency" or
                                                                                  report["samples"]["decode_ms"])]
    fig = Figure(figsize=(6.4 * len(panels), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    title = f"{report['target']['name']} · {report.get('runtime', {}).get('runtime', '?')} · " \
            f"{report.get('size', {}).get('precision', '')} · batch {report['settings']['batch']}"
    for ax, panel in zip(axes, panels):
        if panel == "latency":
            ms = report["samples"]["decode_ms"]
            ax.hist(ms, bins=min(40, max(5, len(ms) // 3)), color="#4c72b0")
            d = report["latency"]["decode_ms_per_token"]
            for q, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
                ax.axvline(d[q], color="k", linestyle=style, label=f"{q} {d[q]:.2f} ms")
            ax.set_xlabel("decode latency per step (ms)")
            ax.set_ylabel("steps")
            ax.legend()
            ax.set_title("decode latency distribution")
        elif panel == "sweep":
            sw = report["sweep"]
            x = [e["threshold"] for e in sw]
            ax.plot(x, [e["decode_ms_p50"] for e in sw], "o-", color="#4c72b0", label="decode p50 (ms)")
            ax.set_xlabel("R1 threshold (all gates)")
            ax.set_ylabel("decode latency p50 (ms)")
            ax2 = ax.twinx()
            ax2.plot(x, [e["skipped_fraction"] for e in sw], "s--", color="#dd8452", label="skipped fraction")
            ax2.set_ylabel("fraction of gated layer executions skipped")
            ax2.set_ylim(-0.05, 1.05)
            ax.set_title("latency and skipping vs threshold")
            lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
            ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
        else:
            w = report["workload"]
            modes = [m for m in ("fixed", "dynamic") if m in w]
            vals = [w[m]["generated_tokens_per_s"] for m in modes]
            ax.bar(modes, vals, color=["#4c72b0", "#55a868"][: len(modes)])
            ax.set_ylabel("generated tokens/s")
            ratio = f" (dynamic/fixed {w['dynamic_over_fixed']:.2f}x)" if "dynamic_over_fixed" in w else ""
            ax.set_title(f"mixed workload, {w['requests']} requests{ratio}")
    fig.suptitle(title)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise os_error(e, path, "--plot") from None
    return path
