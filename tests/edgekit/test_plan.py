"""edgekit plan: hand-checked arithmetic, the brief's checks, capability limits, selection, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import profiles
from edgekit import plan as P
from edgekit.cli import app
from edgekit.errors import EdgekitError

GIB = 2**30


@pytest.fixture
def fake_host(tmp_path, monkeypatch):
    """A host profile with known 'measurements' (12.5 GB/s copy, 0.25 TFLOPS GEMM), cached under tmp_path."""
    from profiles import host

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(host, "measure", lambda cores: {"bandwidth_gbs": 12.5, "fp32_tflops": 0.25,
                                                        "measured_at": "test", "seconds": 0, "method": "fake"})
    return profiles.load("host")


# hand-checked arithmetic ------------------------------------------------------------------------
def test_weights_and_kv_cache_by_hand():
    v3, r1, kind = P.shape("v3-13b"), P.shape("r1-8.5b"), "gpu"
    assert (v3.params_unique, r1.params_unique, r1.params_executed) == (13_024_313_920, 8_363_251_022, 16_464_034_382)
    assert P.weight_bytes(v3, "fp16", kind) == 13_024_313_920 * 2
    # int4: 40 blocks x (317,399,040 x 4.125/8 + 16,680 x 2) + head 163,840,000 x 4.125/8
    # + fp16 embedding 163,840,000 x 2 + final norm 5,120 x 2 = 6,547,689,600 + 84,480,000 + 327,680,000 + 10,240
    assert P.weight_bytes(v3, "int4", kind) == 6_959_859_840
    # KV: 2 (K, V) x 40 layers x 5120 x 4096 positions x 2 bytes; V3 stops at memory_len = 4096
    assert P.kv_bytes(v3, "fp16", kind, 4096, 1) == 3_355_443_200 == 3.125 * GIB
    assert P.kv_bytes(v3, "fp16", kind, 8192, 1) == 3.125 * GIB
    assert P.kv_bytes(v3, "fp16", kind, 4096, 2) == 6.25 * GIB
    # R1: 2 x 80 layers x 4096 x positions x 2 bytes, never truncated
    assert P.kv_bytes(r1, "fp16", kind, 4096, 1) == 5 * GIB
    assert P.kv_bytes(r1, "fp16", kind, 8192, 1) == 10 * GIB
    assert P.kv_bytes(r1, "fp32", "cpu", 4096, 1) == 10 * GIB  # fp32 KV on CPUs


def test_activation_peak_and_prefill_by_hand():
    v3, a100 = P.shape("v3-13b"), profiles.load("a100-40gb")
    # one 512-token chunk: hidden 512 x (4 x 5120 + 3 x 13824) x 2 + scores 3 x 40 x 512 x 512 x 2
    # + logits 512 x 32000 x 4
    assert P.activation_bytes(v3, "fp16", "gpu", 512, 1) == 63_438_848 + 62_914_560 + 65_536_000
    # FLOPs: 2 x (40 x 317,399,040 + 163,840,000) x 512 + 4 x 5120 x 512 x 512 x 40 = 13,383,185,203,200
    # at 50% of 312 TFLOPS; the weight + KV traffic (26.1 GB at 1244 GB/s = 21 ms) is smaller
    assert P.prefill_seconds(v3, a100, "fp16", 512, 1) == pytest.approx(13_383_185_203_200 / 156e12)


def test_decode_is_bandwidth_bound_by_hand():
    v3, a100 = P.shape("v3-13b"), profiles.load("a100-40gb")
    # bytes per token: 40 x (317,399,040 + 16,680) x 2 + head 327,680,000 + embedding row 10,240 + final norm 10,240
    # = 25,720,958,080, plus the KV cache 3,355,443,200; at 80% of 1555 GB/s
    assert P.decode_weight_bytes(v3, "fp16", "gpu", 1) == 25_720_958_080
    row = P.estimate(v3, a100, "fp16", 4096, 1)
    assert row["decode_bound"] == "bandwidth"
    assert row["decode_tokens_per_s"] == pytest.approx(1244e9 / (25_720_958_080 + 3_355_443_200), abs=0.01)


def test_measured_host_ceilings_are_used_at_full_value(fake_host):
    s = P.shape("v3-mini")
    # fp32 bytes per token: 12 x (7,087,104 + 2,508) x 4 + head 198,912 x 4 + embedding row 768 x 4 + norm 768 x 4
    # = 341,103,168, plus KV 2 x 12 x 768 x 128 x 4 = 9,437,184; at the measured 12.5 GB/s (100%)
    row = P.estimate(s, fake_host, "fp32", 128, 1)
    assert row["decode_tokens_per_s"] == pytest.approx(12.5e9 / (341_103_168 + 9_437_184), abs=0.01)
    assert row["bandwidth_ceiling"] == "100% of measured 12.5 GB/s"
    assert row["compute_ceiling"] == "70% of measured 0.25 TFLOPS"


# the brief's checks ----------------------------------------------------------------------------
def test_v3_13b_on_a100_40gb_fp16_peaks_within_26_to_30_gib():
    r = P.plan("v3-13b", "a100-40gb", precision="fp16")
    row = r["rows"][0]
    assert r["context"] == 4096 and r["batch"] == 1  # the documented default
    assert 26 <= row["total_gib"] <= 30 and row["fits"]
    assert row["total_gib"] == pytest.approx(24.26 + 3.125 + 0.589 + 0.9, abs=0.01)


def test_r1_8_5b_on_a100_40gb_fp16_estimate_is_honest():
    """R1's cache (80 layers x 4096 wide, never truncated) is 5 GiB at 4096 tokens, so the estimate is
    22.0 GiB, above the brief's 15-18; it is inside 15-18 only up to ~1100 tokens."""
    row = P.plan("r1-8.5b", "a100-40gb", precision="fp16")["rows"][0]
    assert row["weights_gib"] == pytest.approx(15.578, abs=0.001) and row["kv_cache_gib"] == 5.0
    assert row["total_gib"] == pytest.approx(22.02, abs=0.02)
    short = P.plan("r1-8.5b", "a100-40gb", precision="fp16", context=1024)["rows"][0]
    assert 15 <= short["total_gib"] <= 18


@pytest.mark.xfail(strict=True, reason="the brief's R1 ~16 GB holds only for short contexts: 22.0 GiB at 4096 tokens")
def test_brief_r1_8_5b_on_a100_40gb_fp16_peaks_within_15_to_18_gib_at_default_context():
    row = P.plan("r1-8.5b", "a100-40gb", precision="fp16")["rows"][0]
    assert 15 <= row["total_gib"] <= 18


@pytest.mark.parametrize("device", ["t4", "jetson-orin-nx-16gb"])
def test_v3_13b_fp16_does_not_fit_a_16_gb_device(device):
    r = P.plan("v3-13b", device, precision="fp16")
    assert not r["rows"][0]["fits"] and r["rows"][0]["margin_gib"] < -10
    assert r["recommended_precision"] is None and "does not fit" in r["recommendation"]


def test_orin_nano_8gb_plan_names_what_would_fit():
    r = P.plan("v3-13b", "jetson-orin-nano-8gb")
    assert not any(row["fits"] for row in r["rows"])
    fits = {(f["model"], f["precision"]) for f in r["would_fit"]}
    assert {("r1-8.5b", "int4"), ("v3-mini", "fp16"), ("r1-mini", "fp16")} <= fits
    r1_int4 = next(f for f in r["would_fit"] if f["model"] == "r1-8.5b")
    assert 1000 < r1_int4["max_context"] < 4096 and not r1_int4["fits_requested_context"]
    assert "r1-8.5b int4 (up to" in r["recommendation"] and "v3-mini fp16" in r["recommendation"]
    check = P.plan("r1-8.5b", "jetson-orin-nano-8gb", precision="int4", context=r1_int4["max_context"])
    assert check["rows"][0]["fits"]


# the plan's shape ------------------------------------------------------------------------------
def test_plan_without_precision_is_a_labelled_table_with_a_recommendation():
    r = P.plan("v3-13b", "a100-40gb")
    assert r["estimate"] is True and "ESTIMATE" in r["label"]
    assert [row["precision"] for row in r["rows"]] == ["fp16", "bf16", "int8", "int4", "fp32"]
    assert r["recommended_precision"] == "fp16"
    fp32 = r["rows"][-1]
    assert not fp32["fits"] and fp32["weights_gib"] == pytest.approx(2 * r["rows"][0]["weights_gib"], abs=0.002)
    assert any("default: 4096 tokens" in a for a in r["assumptions"])
    assert any("memory_len = 4096" in a for a in r["assumptions"])
    assert any("no fp8" in n and "sm_89" in n for n in r["device_notes"])


def test_mini_default_context_is_capped_by_the_model():
    assert P.plan("v3-mini", "jetson-nano", precision="fp16")["context"] == 2048


def test_device_limits_are_errors_with_the_reason():
    with pytest.raises(EdgekitError, match="sm_89"):
        P.plan("v3-13b", "a100-40gb", precision="fp8")
    with pytest.raises(EdgekitError, match="no int8 tensor-core path.*use --precision fp32 or fp16"):
        P.plan("r1-mini", "jetson-nano", precision="int8")
    with pytest.raises(EdgekitError, match="did you mean 'fp16'"):
        P.plan("r1-mini", "t4", precision="fp61")
    nano = P.plan("r1-mini", "jetson-nano")
    assert any("8.2.1" in n for n in nano["device_notes"])


# selection -------------------------------------------------------------------------------------
def test_select_on_a100_agrees_on_v3():
    r = P.select("a100-40gb", "reasoning")
    assert (r["choice"], r["precision"], r["agree"]) == ("v3-13b", "fp16", True)
    assert any("R1 saves memory, not bandwidth" in n for n in r["notes"])


def test_select_says_when_rule_and_numbers_disagree():
    r = P.select("jetson-agx-orin-64gb", "chat")
    assert r["rule"]["choice"] == "r1-8.5b" and r["numbers"]["choice"] == "v3-13b" and not r["agree"]
    assert "the rule picks r1-8.5b" in r["disagreement"] and "decodes faster" in r["disagreement"]


def test_select_under_24_gb_and_when_nothing_full_size_fits():
    t4 = P.select("t4", "general")
    assert t4["rule"]["because"].startswith("under 24 GB") and t4["choice"] == "r1-8.5b" and t4["agree"]
    nano = P.select("jetson-orin-nano-8gb", "reasoning")
    assert nano["choice"] is None and not nano["agree"]
    assert ("r1-8.5b", "int4") in {(f["model"], f["precision"]) for f in nano["would_fit"]}


# CLI -------------------------------------------------------------------------------------------
runner = CliRunner()


@pytest.mark.parametrize("args,message", [
    (["plan", "v3-13b", "--device", "a100-40"], "unknown device 'a100-40' (did you mean 'a100-40gb'?"),
    (["plan", "v3-13b", "--device", "a100-40gb", "--context", "100000"], "--context 100000 is impossible"),
    (["plan", "v3-13b", "--device", "a100-40gb", "--context", "0"], "--context 0 is impossible"),
    (["plan", "r1-8.5b", "--device", "t4", "--batch", "-2"], "--batch must be at least 1, got -2"),
    (["plan", "--select", "--device", "t4"], "--select needs --task"),
    (["plan", "--select", "--device", "t4", "--task", "reasoninng"], "did you mean 'reasoning'"),
    (["plan", "v3-13b", "--device", "t4", "--task", "chat"], "--task only applies with --select"),
])
def test_bad_input_is_one_line_and_exit_1(args, message, cli):
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and isinstance(result.exception, EdgekitError)
    assert message in str(result.exception) and "Traceback" not in result.output
    code, out, err = cli(*args)  # through main(), as the installed `edgekit` runs
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_cli_plan_json_and_table():
    result = runner.invoke(app, ["plan", "r1-8.5b", "--device", "jetson-agx-orin-64gb", "--precision", "int8",
                                 "--context", "2048", "--json"])
    assert result.exit_code == 0, result.output
    r = json.loads(result.output)
    assert r["estimate"] and r["rows"][0]["precision"] == "int8" and r["context"] == 2048
    assert "decode_tokens_per_s_if_60pct_skipped" in r["rows"][0]
    table = runner.invoke(app, ["plan", "v3-13b", "--device", "h100-sxm"])
    assert table.exit_code == 0 and "ESTIMATE" in table.output and "recommendation" in table.output
    sel = runner.invoke(app, ["plan", "--select", "--device", "l4", "--task", "reasoning", "--json"])
    assert sel.exit_code == 0 and json.loads(sel.output)["choice"] == "v3-13b"


def test_cli_devices_lists_every_profile_and_the_host(fake_host):
    result = runner.invoke(app, ["devices", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == [p.stem for p in sorted(profiles.DIR.glob("*.toml"))] + ["host"]
    assert rows[-1]["bandwidth_gbs"] == 12.5 and rows[-1]["file"] == "measured at run time"
    assert runner.invoke(app, ["devices"]).exit_code == 0
    for command in ("devices", "plan"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0
