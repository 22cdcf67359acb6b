"""Everything the CLI prints for people: rich tables and text. The only module in the project that
imports rich (the layering rule); commands pass it their results, and --json bypasses it (emit).
It also gives edgekit.progress (layer 1, no rich) its progress bar, through use_rich_progress()."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from rich.console import Console
from rich.table import Table

console = Console()


def emit(data, as_json: bool, render=None) -> None:
    """Print `data` as JSON, or through `render(data)` (default: key/value table)."""
    if as_json:
        print(json.dumps(data, indent=1, default=str))
    elif render is not None:
        render(data)
    else:
        table = Table(show_header=False)
        table.add_column(overflow="fold")
        table.add_column(overflow="fold")
        for k, v in data.items():
            table.add_row(str(k), json.dumps(v, default=str) if isinstance(v, dict | list) else str(v))
        console.print(table)


class Fitted:
    """A table that fits the width it is printed at (an 80-column terminal, a pipe): as is when it fits, else
    transposed (one column per row, the columns as rows), else one key/value block per row. Cells fold, never
    end in '...'. `columns`: (header, justify); `rows`: cell strings (rich markup allowed)."""

    def __init__(self, columns: list[tuple[str, str]], rows: list[list[str]], title: str | None = None):
        self.columns, self.rows, self.title = columns, rows, title

    def wide(self) -> Table:
        t = Table(title=self.title)
        for c, justify in self.columns:
            t.add_column(c, justify=justify, overflow="fold")
        for r in self.rows:
            t.add_row(*r)
        return t

    def transposed(self) -> Table:
        t = Table(title=self.title)
        t.add_column(self.columns[0][0], overflow="fold")
        for r in self.rows:
            t.add_column(r[0], justify="right", overflow="fold")
        for i, (c, _) in enumerate(self.columns[1:], 1):
            t.add_row(c, *(r[i] for r in self.rows))
        return t

    def stacked(self) -> Table:
        t = Table(title=self.title, show_header=False)
        t.add_column(overflow="fold")
        t.add_column(overflow="fold")
        for r in self.rows:
            for i, ((c, _), cell) in enumerate(zip(self.columns, r)):
                t.add_row(f"[bold]{c}[/bold]" if i == 0 else c, f"[bold]{cell}[/bold]" if i == 0 else cell)
            t.add_section()
        return t

    def __rich_console__(self, console: Console, options):
        for layout in (self.wide, self.transposed):
            table = layout()
            natural = console.measure(table, options=options.update_width(10_000)).maximum  # unwrapped width
            if natural <= options.max_width:
                yield table
                return
        yield self.stacked()


def table_of(rows: list[dict], columns: list[str], title: str | None = None) -> Fitted:
    return Fitted([(c, "left") for c in columns], [[str(r.get(c, "")) for c in columns] for r in rows], title)


def show_rows(rows: list[dict], columns: list[str]) -> None:
    console.print(table_of(rows, columns))


def say(text: str) -> None:
    """Plain text, unwrapped (paths and hashes stay on one line)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def rich_progress(description: str, total: float | None = None) -> Iterator:
    """A rich progress bar on stderr (edgekit.progress's display when the CLI runs)."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed:.0f}/{task.total:.0f}" if total else ""), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: float = 1, description: str | None = None) -> None:
            bar.update(task, advance=n, **({"description": description} if description else {}))

        yield advance


def use_rich_progress() -> None:
    from edgekit import progress

    progress.set_display(rich_progress)


# generate, run ------------------------------------------------------------------------------------
def show_generated(r: dict) -> None:
    """generate: the text (exactly as generated), then how much a gated model skipped."""
    console.print(r["text"], markup=False, highlight=False)
    show_skipped(r)


def show_run(r: dict) -> None:
    """run (an installed bundle): the text unwrapped, then how much a gated model skipped."""
    say(r["text"])
    show_skipped(r)


def show_skipped(r: dict) -> None:
    if r.get("layer_slots"):
        console.print(f"[dim]{r['runtime']}: skipped {r['skipped']} of {r['layer_slots']} gated-layer executions "
                      f"({100 * r['skipped'] / r['layer_slots']:.0f}%)[/dim]")


# export, quantize -------------------------------------------------------------------------------
def show_export(r: dict) -> None:
    v = r.get("validation", {})
    console.print(f"wrote {r['out']} ({r['format']}, {r['precision']}; files: {', '.join(r['files'])})")
    if "fp32" in v:
        console.print(f"validated fp32 vs PyTorch: {len(v['fp32']['cases'])} cases, max abs diff "
                      f"{v['fp32']['max_abs_diff']:.2e} ({v['fp32'].get('max_relative_diff', 0):.1e} of the outputs' "
                      f"scale), skip patterns {v['fp32']['distinct_skip_patterns']}")
    if "int8" in v:
        size = r.get("size", {})  # a streamed export never wrote the fp32 graph: its bytes only
        size = (f"{size['int8_over_fp32']:.1%} of fp32" if "int8_over_fp32" in size
                else f"{size.get('int8_bytes', 0) / 2**20:,.1f} MiB")
        console.print(f"int8: size {size}, logit cosine "
                      f"{v['int8']['logit_cosine_mean']:.5f}, argmax agreement {v['int8']['argmax_agreement']:.1%} "
                      f"(on {v['int8']['inputs']})")
        ppl = v["int8"].get("perplexity")
        if ppl:
            console.print(f"int8 perplexity {ppl['candidate']:.3f} vs fp32 {ppl['reference']:.3f} "
                          f"({100 * ppl['increase']:+.2f} % ± {100 * ppl['increase_se']:.2f}, limit "
                          f"+{100 * ppl['max_increase']:g} %; {ppl['tokens']} tokens scored) on {ppl['text']}")
    if "streamed" in r:
        st = r["streamed"]
        console.print(f"streamed: traced {st['template_layers']} layers in {st['trace_s']:.0f}s, stamped in "
                      f"{st['stamp_s']:.1f}s, {st['wall_s']:.0f}s in all, peak RSS {st['peak_rss_gib']:.2f} GiB")
    if "streamed" in v:
        console.print(f"validated against PyTorch one block at a time: logit cosine min "
                      f"{v['streamed']['logit_cosine_min']:.5f} on {len(v['streamed']['cases'])} cases")
    for name, rep in v.get("onnxruntime_cpu", {}).items():
        console.print(f"validated in ONNX Runtime ({name.replace('_', ' ')}): logit cosine "
                      f"{rep['logit_cosine_mean']:.5f}, argmax agreement {rep['argmax_agreement']:.1%}")
    if "engine" in r:
        e = r["engine"]
        why = f" ({e['why']}; {e['how']})" if e.get("why") else ""
        console.print(f"engine: {e.get('status')}{why}", markup=False)


def show_quantize(r: dict) -> None:
    v = r["validation"]["int8"]
    console.print(f"wrote {r['out']}: size {r['size']['int8_over_fp32']:.1%} of fp32, logit cosine "
                  f"{v['logit_cosine_mean']:.5f}, argmax agreement {v['argmax_agreement']:.1%} (on {v['inputs']})")


# plan ---------------------------------------------------------------------------------------------
def show_plan(r: dict) -> None:
    short = {"precision": "prec", "weights_gib": "weights", "kv_cache_gib": "KV",
             "kv_cache_decompressed_gib": "KV decompressed", "activations_gib": "act",
             "overhead_gib": "overhead", "total_gib": "total", "margin_gib": "margin", "fits": "fits",
             "max_context": "max ctx", "prefill_s": "prefill s", "decode_tokens_per_s": "decode tok/s",
             "decode_tokens_per_s_if_60pct_skipped": "tok/s 60% skip"}
    rows = [{short[k]: f"{v:.3g}" if isinstance(v, float) else ("yes" if v else "NO") if isinstance(v, bool) else v
             for k, v in row.items() if k in short}
            for row in r["rows"]]
    console.print(f"[bold]{r['label']}[/bold]: {r['model']} on {r['device']} ({r['device_title']}, "
                  f"{r['device_gib']:g} GiB), {r['context']} tokens x batch {r['batch']}; memory in GiB",
                  highlight=False)
    params, kv = r["params"], r["kv_cache"]
    active = f", {params['active'] / 1e9:.2f} B active per token (MoE)" if "active" in params else ""
    console.print(f"parameters: {params['unique'] / 1e9:.2f} B{active}; KV cache: {kv['fp16_bytes_per_token']:,} "
                  f"fp16 bytes per token ({kv['basis']})", markup=False, highlight=False)
    if "decompressed" in kv:
        console.print(f"  decompressed K/V would be {kv['decompressed']['fp16_bytes_per_token']:,} fp16 bytes per "
                      f"token ({kv['decompressed']['basis']})", markup=False, highlight=False)
    console.print(table_of(rows, [c for c in short.values() if c in rows[0]]))
    console.print(f"[bold]recommendation:[/bold] {r['recommendation']}", highlight=False)
    if "r1_vs_v3_memory" in r:
        console.print(r["r1_vs_v3_memory"]["line"], markup=False, highlight=False)
    if "cascade" in r:
        console.print(r["cascade"]["line"], markup=False, highlight=False)
    for title, lines in (("device", r["device_notes"]), ("assumptions", r["assumptions"])):
        console.print(f"[bold]{title}:[/bold]")
        for line in lines:
            console.print(f"  - {line}", markup=False, highlight=False)


def show_select(r: dict) -> None:
    console.print(f"[bold]{r['label']}[/bold]: selection for task '{r['task']}' on {r['device']}, "
                  f"{r['context']} tokens x batch {r['batch']}", highlight=False)
    choice = f"{r['choice']} at {r['precision']}" if r["choice"] else "no full-size model fits"
    console.print(f"[bold]choice:[/bold] {choice} (rule: {r['rule']['choice']}, because {r['rule']['because']}; "
                  f"numbers: {r['numbers']['because']})", highlight=False)
    for line in r["explanation"] + r["notes"] + r["assumptions"]:
        console.print(f"  - {line}", markup=False, highlight=False)
    if "r1_vs_v3_memory" in r:
        console.print(r["r1_vs_v3_memory"]["line"], markup=False, highlight=False)


# profile, compare ---------------------------------------------------------------------------------
def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def show_profile(r: dict, console: Console = console) -> None:
    rt, lat, s = r.get("runtime", {}), r["latency"], r["settings"]
    dev = r["device"]
    where = (dev.get("jetson") or {}).get("model") or (dev.get("cuda") or {}).get("name") or dev["cpu"]["model"]
    console.print(f"[bold]{r['target']['name']}[/bold] on {where} ({dev.get('profile') or 'no profile'}) - "
                  f"{rt.get('runtime', '?')} {r['size']['precision']} {rt.get('device') or rt.get('provider') or ''}; "
                  f"prompt {s['prompt_len']}, {s['new_tokens']} new tokens, batch {s['batch']}, "
                  f"{lat['measured_runs']} measured run(s) after {s['warmup']} warm-up", highlight=False)
    if r.get("interrupted"):
        console.print("[yellow]interrupted: the numbers below cover what was measured before Ctrl-C[/yellow]")
    rows = []
    for label, key in (("time to first token (ms)", "ttft_ms"), ("decode per token (ms)", "decode_ms_per_token"),
                       ("request end to end (ms)", "e2e_ms")):
        st = lat.get(key) or {}
        rows.append([label, *(_fmt(st.get(q)) for q in ("p50", "p90", "p99", "mean"))])
    console.print(Fitted([("metric", "left"), *((q, "right") for q in ("p50", "p90", "p99", "mean"))], rows))
    mem, size, roof, en, g = r.get("memory") or {}, r["size"], r.get("roofline") or {}, r["energy"], r.get("gating")
    lines = [f"decode {_fmt(lat['decode_tokens_per_s'])} tokens/s, prefill {_fmt(lat['prefill_tokens_per_s'])} "
             f"tokens/s, {_fmt(lat['requests_per_s'])} requests/s at batch {s['batch']}"]
    if mem:
        mib = {k: v / 2**20 for k, v in mem.items() if k.endswith("_bytes")}
        text = (f"memory: peak RSS {mib['peak_rss_bytes']:.1f} MiB, {mib['peak_rss_delta_bytes']:.1f} MiB over the "
                f"{mib['baseline_rss_bytes']:.1f} MiB baseline")
        if "cuda_max_allocated_bytes" in mib:
            text += (f"; CUDA max allocated {mib['cuda_max_allocated_bytes']:.1f} MiB, reserved "
                     f"{mib['cuda_max_reserved_bytes']:.1f} MiB")
        lines.append(text)
    stored = f"{size['weight_bytes_stored'] / 2**20:.2f} MiB of weights" if size.get("weight_bytes_stored") \
        else "weights not counted"
    lines.append(f"size: {stored}"
                 + (f", {size['artifact_bytes'] / 2**20:.2f} MiB on disk" if size.get("artifact_bytes") else ""))
    if g and "skipped_fraction" in g:
        lines.append(f"R1: {g['gated_skipped']} of {g['gated_executions']} gated layer executions skipped "
                     f"({100 * g['skipped_fraction']:.1f}%) at threshold {_fmt(s['threshold'])}")
    if roof.get("fraction_of_roofline") is not None:
        lines.append(f"roofline: {_fmt(roof['roofline_tokens_per_s'])} tokens/s at {_fmt(roof['bandwidth_gbs'])} GB/s "
                     f"({roof['bandwidth_from']}), {roof['weight_bytes_per_decode_step'] / 2**20:.2f} MiB of weights "
                     f"per step: measured = {100 * roof['fraction_of_roofline']:.1f}% of it")
    elif roof:
        lines.append(f"roofline: {roof['bandwidth_from']}")
    lines.append(f"energy: {_fmt(en['joules_per_token'] * 1e3)} mJ/token, mean {_fmt(en['mean_power_w'])} W "
                 f"({en['source']}, {en.get('rails', '')})" if en.get("available") else f"energy: {en['reason']}")
    jet = dev.get("jetson")
    if jet:
        lines.append(f"Jetson: L4T {jet['l4t']}, nvpmodel {(jet['nvpmodel'] or {}).get('mode', 'unknown')}, "
                     f"jetson_clocks {jet['jetson_clocks']}")
    for line in lines:
        console.print(line, highlight=False)
    if r.get("sweep"):
        rows = [[_fmt(e["threshold"]), _fmt(e["decode_ms_p50"]), _fmt(e["decode_ms_p90"]),
                 _fmt(e["decode_tokens_per_s"]), f"{100 * (e['skipped_fraction'] or 0):.1f}%"] for e in r["sweep"]]
        console.print(Fitted([(c, "right") for c in ("threshold", "decode p50 ms", "decode p90 ms", "tokens/s",
                                                     "skipped")], rows, title="threshold sweep"))
    w = r.get("workload")
    if w:
        rows = [[m, _fmt(w[m]["generated_tokens_per_s"]), _fmt(w[m]["requests_per_s"]), str(w[m]["batches"]),
                 _fmt(w[m]["rows_per_batch_mean"]), f"{100 * w[m]['prompt_padding_fraction']:.1f}%"]
                for m in ("fixed", "dynamic") if m in w]
        console.print(Fitted([(c, "right") for c in ("batching", "tokens/s", "requests/s", "batches", "rows/batch",
                                                     "prompt padding")], rows,
                             title=f"mixed workload: {w['requests']} requests, {w['new_tokens']} new tokens each, "
                                   f"token budget {w['token_budget']}"))
        if "dynamic_over_fixed" in w:
            console.print(f"dynamic / fixed throughput: {w['dynamic_over_fixed']:.3f}x", highlight=False)


def show_compare(r: dict, console: Console = console) -> None:
    if r.get("interrupted"):
        console.print("[yellow]interrupted: comparison incomplete[/yellow]")
    if "rows" not in r:
        for p in r["profiles"]:
            show_profile(p, console)
        return
    a, b = r["labels"]
    rows = []
    for row in r["rows"]:
        diff = row.get("difference_pct")
        cell = "-" if diff is None else f"{diff:+.1f}%"
        if diff is not None and row["better"]:
            good = (diff < 0) == (row["better"] == "lower")
            cell = f"[{'green' if good else 'red'}]{cell}[/]" if abs(diff) >= 0.05 else cell
        rows.append([f"{row['metric']} ({row['unit']})", _fmt(row["a"], 4), _fmt(row["b"], 4), cell])
    console.print(Fitted([("metric", "left"), ("A", "right"), ("B", "right"), ("B vs A", "right")], rows,
                         title=f"A: {a}\nB: {b}"))
    o = r.get("outputs")
    if o:
        console.print(f"outputs on {o['cases']} seeded cases ({o['reference']} vs {o['candidate']}): max abs diff "
                      f"{o['max_abs_diff']:.3g} (logits {o['logits_max_abs_diff']:.3g}), argmax agreement "
                      f"{100 * o['argmax_agreement']:.2f}%, logit cosine mean {o['logit_cosine_mean']:.6f} "
                      f"(min {o['logit_cosine_min']:.6f})", highlight=False)
