"""Every table readable at 80 columns and in a pipe (edgekit.cli.render.Fitted): as is when it fits, else
transposed, else one key/value block per row; no header or cell cut to '…'."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from edgekit.cli import render

ELLIPSIS = "…"


@pytest.fixture
def narrow(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


def lines_fit(text: str) -> None:
    assert ELLIPSIS not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text


@pytest.mark.parametrize("args", [("plan", "v3-13b", "--device", "jetson-orin-nano-8gb"), ("devices",), ("models",),
                                  ("plan", "r1-8.5b", "--device", "a100-40gb", "--context", "4096")])
def test_cli_tables_at_80_columns(cli, narrow, args):
    code, out, err = cli(*args)
    assert code == 0, err
    lines_fit(out)


def test_plan_headers_all_readable(cli, narrow):
    code, out, _ = cli("plan", "v3-13b", "--device", "jetson-orin-nano-8gb")
    for header in ("weights", "overhead", "total", "margin", "fits", "prefill s", "decode tok/s"):
        assert header in out, header


def test_profile_and_compare_at_80_columns(cli, narrow):
    code, out, err = cli("profile", "r1-tiny", "--prompt-len", "8", "--new-tokens", "3", "--warmup", "0", "--runs", "1",
                         "--sweep-threshold", "0:1:2", "--no-energy")
    assert code == 0, err
    lines_fit(out)
    assert "threshold sweep" in out and "time to first token" in out
    code, out, err = cli("profile", "v3-tiny", "--prompt-len", "8", "--new-tokens", "3", "--warmup", "0", "--runs",
                         "1", "--workload", "mixed", "--requests", "4", "--batch", "2", "--no-energy", "--json")
    assert code == 0, err
    report = json.loads(out)
    buf = io.StringIO()
    render.show_profile(report, Console(file=buf, width=80))
    lines_fit(buf.getvalue())
    assert "prompt padding" in buf.getvalue()

    from edgekit.profiling.comparison import comparison_rows

    buf = io.StringIO()
    render.show_compare({"labels": ["v3-tiny (torch fp32 cpu) with a long label", "v3-tiny again, labelled at length"],
                         "rows": comparison_rows(report, report)}, Console(file=buf, width=80))
    lines_fit(buf.getvalue())
    assert "B vs A" in buf.getvalue()


def test_a_table_too_wide_even_transposed_becomes_key_value_blocks():
    columns = [f"column number {i}" for i in range(12)]
    rows = [{c: f"value {i}-{j}" for j, c in enumerate(columns)} for i in range(9)]
    buf = io.StringIO()
    Console(file=buf, width=80).print(render.table_of(rows, columns))
    text = buf.getvalue()
    lines_fit(text)
    assert all(c in text for c in columns) and "value 8-11" in text
    buf = io.StringIO()
    Console(file=buf, width=200).print(render.table_of(rows[:2], columns[:3]))  # fits: one row per row
    assert buf.getvalue().count("value") == 6 and buf.getvalue().splitlines()[1].count("column number") == 3
