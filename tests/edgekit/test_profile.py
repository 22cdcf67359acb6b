"""edgekit profile / compare: real runs of the tiny presets on this machine's CPU through torch and
onnxruntime. Fields present and sane (positive, p50 <= p90 <= p99, R1 skipping consistent with the
threshold); no timing thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekit import profiling as prof
from edgekit.config import preset
from edgekit.errors import EdgekitError
from edgekit.profiling import batching, comparison, measure, memory, roofline

SMALL = dict(prompt_len=8, new_tokens=4, warmup=1, runs=2)


def check_latency(report: dict, batch: int = 1, runs: int = 2, new_tokens: int = 4) -> None:
    lat = report["latency"]
    for key in ("ttft_ms", "decode_ms_per_token", "e2e_ms"):
        s = lat[key]
        assert 0 < s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"], (key, s)
    assert lat["decode_ms_per_token"]["n"] == runs * (new_tokens - 1)
    assert lat["ttft_ms"]["n"] == runs and lat["measured_runs"] == runs
    for key in ("decode_tokens_per_s", "prefill_tokens_per_s", "requests_per_s"):
        assert lat[key] > 0
    # throughput is consistent with the latencies it comes from
    assert lat["decode_tokens_per_s"] == pytest.approx(batch * 1e3 / lat["decode_ms_per_token"]["mean"], rel=1e-6)
    mem = report["memory"]
    assert mem["peak_rss_bytes"] >= mem["baseline_rss_bytes"] > 0
    assert mem["peak_rss_delta_bytes"] == mem["peak_rss_bytes"] - mem["baseline_rss_bytes"]
    assert report["size"]["weight_bytes_stored"] > 0 and report["size"]["weight_bytes_per_decode_step"] > 0
    en = report["energy"]
    assert en["joules_per_token"] > 0 if en["available"] else en["reason"]  # never a made-up number
    assert report["device"]["cpu"]["model"] and report["interrupted"] is False
    assert len(report["samples"]["decode_ms"]) == lat["decode_ms_per_token"]["n"]


def test_profile_r1_torch_with_sweep_report_and_plot(tmp_path):
    out, png = tmp_path / "r" / "report.json", tmp_path / "p.png"
    default = preset("r1-tiny").default_threshold
    r = prof.profile("r1-tiny", "torch", **SMALL, sweep=f"0,{default},2", out=out, plot=png)
    check_latency(r)
    assert r["runtime"]["runtime"] == "torch" and r["size"]["precision"] == "fp32"
    g = r["gating"]
    assert g["gated_layers"] == [1, 2] and g["calls"] == 2 * 4 and g["gated_executions"] == 2 * 4 * 2
    assert g["skipped_fraction"] == g["gated_skipped"] / g["gated_executions"]
    # no --threshold means the default one: the same seeded prompts skip exactly as the sweep's entry for it
    assert r["settings"]["threshold"] == default
    by_t = {e["threshold"]: e for e in r["sweep"]}
    assert by_t[default]["skipped_fraction"] == g["skipped_fraction"]
    assert g["decode_run_fraction_per_layer"][0] == g["decode_run_fraction_per_layer"][3] == 1.0  # ungated layers
    # the sweep: threshold 0 runs every gated layer, threshold 2 (> any sigmoid score) skips every one
    assert by_t[0.0]["skipped_fraction"] == 0.0 and by_t[2.0]["skipped_fraction"] == 1.0
    assert by_t[2.0]["decode_skipped_fraction"] == 1.0
    for e in r["sweep"]:
        assert 0 < e["decode_ms_p50"] <= e["decode_ms_p90"] <= e["decode_ms_p99"] and e["measured_runs"] == 2
    assert len(r["sweep"]) == 3
    roof = r["roofline"]
    assert roof["bandwidth_gbs"] > 0 and roof["roofline_tokens_per_s"] > 0 and roof["fraction_of_roofline"] > 0
    assert roof["roofline_tokens_per_s"] == pytest.approx(
        roof["bandwidth_gbs"] * 1e9 / r["size"]["weight_bytes_per_decode_step"])
    assert roof["fraction_of_roofline"] == pytest.approx(
        r["latency"]["decode_tokens_per_s"] / roof["roofline_tokens_per_s"])
    assert json.loads(out.read_text())["latency"]["decode_ms_per_token"]["n"] == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_threshold_0_and_2_skip_counts():
    r0 = prof.profile("r1-tiny", "torch", **SMALL, threshold=0.0, roofline=False)
    r2 = prof.profile("r1-tiny", "torch", **SMALL, threshold=2.0, roofline=False)
    assert r0["gating"]["gated_skipped"] == 0 and r0["gating"]["skipped_fraction"] == 0.0
    assert r2["gating"]["skipped_fraction"] == 1.0 and r2["gating"]["gated_skipped"] == r2["gating"]["gated_executions"]
    # only the gated layers skip: 2 of 4 layers
    assert r2["gating"]["layer_skipped_fraction"] == pytest.approx(0.5)
    assert r2["gating"]["decode_run_fraction_per_layer"] == [1.0, 0.0, 0.0, 1.0]
    # skipping reads fewer weights per step
    assert r2["size"]["weight_bytes_per_decode_step"] < r0["size"]["weight_bytes_per_decode_step"]


def test_profile_v3_torch_batch():
    r = prof.profile("v3-tiny", "torch", **SMALL, batch=3, roofline=False)
    check_latency(r, batch=3)
    assert r["gating"] is None and r["settings"]["threshold"] is None
    with pytest.raises(EdgekitError, match="apply to gated models"):
        prof.profile("v3-tiny", "torch", **SMALL, threshold=0.5)


def test_profile_onnxruntime_r1(onnx_r1_tiny):
    r = prof.profile(onnx_r1_tiny, None, **SMALL, sweep=[0.0, 2.0], roofline=False)
    check_latency(r)
    assert r["runtime"]["runtime"] == "onnxruntime" and r["runtime"]["providers_active"] == ["CPUExecutionProvider"]
    assert r["target"]["kind"] == "onnx" and r["size"]["artifact_bytes"] > 0
    by_t = {e["threshold"]: e for e in r["sweep"]}
    assert by_t[0.0]["skipped_fraction"] == 0.0 and by_t[2.0]["skipped_fraction"] == 1.0


def test_profile_torch_on_an_onnx_artifact_runs_its_source(onnx_v3_tiny):
    r = prof.profile(onnx_v3_tiny, "torch", **SMALL, roofline=False)
    assert r["runtime"]["runtime"] == "torch" and r["target"]["name"] == "v3-tiny"
    assert r["target"]["exported_artifact"] == str(onnx_v3_tiny) and r["size"]["artifact_bytes"] is None
    with pytest.raises(EdgekitError, match="does not apply to the onnxruntime runtime"):
        prof.profile(onnx_v3_tiny, "onnxruntime", **SMALL, dtype="bf16")
    with pytest.raises(EdgekitError, match="does not apply to the torch runtime"):
        prof.profile("v3-tiny", "torch", **SMALL, provider="cuda")


def test_profile_a_hugging_face_directory(tmp_path, cli):
    """A Hugging Face model directory profiles like a checkpoint; its weight traffic comes from its own
    structure (it used to end in KeyError: 'hf-qwen2')."""
    pytest.importorskip("transformers")
    from hf_tiny import COMMON, save_model, write_tokenizer

    from edgekit.hfconfig import weight_counts

    d = tmp_path / "qwen2"
    save_model(d, "qwen2")
    write_tokenizer(d)
    r = prof.profile(d, "torch", **SMALL, roofline=False)
    check_latency(r)
    assert r["target"]["kind"] == "hf" and r["target"]["family"] == "hf-qwen2" and r["gating"] is None
    size = r["size"]
    assert size["weight_bytes_stored"] == 4 * weight_counts(d)["total"]  # fp32: every tensor of the safetensors
    # dense and untied: each step reads every weight but the embedding rows of the other tokens
    vocab, width = COMMON["vocab_size"], COMMON["hidden_size"]
    assert size["weight_bytes_per_decode_step"] == size["weight_bytes_stored"] - (vocab - 1) * width * 4
    code, out, err = cli("profile", str(d), "--prompt-len", "8", "--new-tokens", "3", "--runs", "1")
    assert code == 0, err
    assert "decode per token (ms)" in out and "roofline:" in out
    code, _, err = cli("profile", str(d), "--threshold", "0.5")
    assert code == 1 and err.startswith("error: ") and "apply to gated models" in err and err.count("\n") == 1


def test_dynamic_batching_plans():
    lengths = [30, 5, 28, 6, 7, 29]
    assert batching.plan_fixed(lengths, 2) == [[0, 1], [2, 3], [4, 5]]
    groups = batching.plan_dynamic(lengths, new_tokens=2, budget=2 * (30 + 2))
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:  # every batch within the token budget, longest first
        assert len(g) * (lengths[g[0]] + 2) <= 64 or len(g) == 1
    # similar lengths end up together: less padding than arrival order
    def padding(groups):
        return sum(len(g) * max(lengths[i] for i in g) - sum(lengths[i] for i in g) for g in groups)
    assert padding(groups) < padding(batching.plan_fixed(lengths, 2))
    seeded = batching.mixed_requests(16, 64, 0)
    assert len(seeded) == 16 and seeded == batching.mixed_requests(16, 64, 0)
    assert 16 <= min(seeded) <= max(seeded) <= 112


def test_mixed_workload_reports_both_throughputs():
    r = prof.profile("r1-tiny", "torch", prompt_len=8, new_tokens=3, warmup=0, runs=1, batch=2, workload="mixed",
                     requests=5, roofline=False)
    w = r["workload"]
    assert w["requests"] == 5 and len(w["prompt_lengths"]) == 5 and w["token_budget"] > 0
    lengths = w["prompt_lengths"]
    assert lengths == batching.mixed_requests(5, 8, 0) and w["token_budget"] == 2 * (max(lengths) + 3)
    plans = {"fixed": batching.plan_fixed(lengths, 2), "dynamic": batching.plan_dynamic(lengths, 3, w["token_budget"])}
    for mode, groups in plans.items():
        assert w[mode]["generated_tokens_per_s"] > 0 and w[mode]["requests_per_s"] > 0
        assert w[mode]["batches"] == len(groups)
        padded = sum(len(g) * max(lengths[i] for i in g) for g in groups)
        assert w[mode]["prompt_padding_fraction"] == pytest.approx(1 - sum(lengths) / padded)
        assert w[mode]["gating"]["calls"] == len(groups) * 3  # prefill + 2 decode steps per batch
    assert w["fixed"]["batches"] == 3  # 5 requests, 2 per call
    assert w["dynamic"]["batches"] <= w["fixed"]["batches"]  # the budget allows more rows for short prompts
    assert w["dynamic_over_fixed"] == pytest.approx(
        w["dynamic"]["generated_tokens_per_s"] / w["fixed"]["generated_tokens_per_s"])
    with pytest.raises(EdgekitError, match="unknown batching"):
        prof.profile("r1-tiny", "torch", **SMALL, workload="mixed", batching="greedy")


def test_weight_traffic():
    cfg = preset("r1-tiny")
    full = roofline.weight_traffic(cfg, "fp32")
    skip = roofline.weight_traffic(cfg, "fp32", run_fraction=[1.0, 0.0, 0.0, 1.0])
    int8 = roofline.weight_traffic(cfg, "int8")
    assert skip["weight_bytes_per_decode_step"] < full["weight_bytes_per_decode_step"]
    assert int8["weight_bytes_per_decode_step"] < full["weight_bytes_per_decode_step"]
    # R1 shares blocks: 4 layers read more than the 2 unique blocks store
    assert full["weight_bytes_per_decode_step"] > full["weight_bytes_stored"] - cfg.vocab_size * cfg.d_model * 4


class FakeMemory:
    """rss() returns the values given in turn (the last one repeats); maxrss() a settable high-water mark."""

    def __init__(self, rss: list[int], maxrss: int):
        self.values, self.high = list(rss), maxrss

    def rss(self) -> int:
        return self.values.pop(0) if len(self.values) > 1 else self.values[0]

    def maxrss(self) -> int:
        return self.high


def test_rss_monitor_takes_the_kernels_peak_when_the_profile_raised_it():
    mem = FakeMemory([100, 300, 150], maxrss=200)
    with memory.RssMonitor(interval_s=None, rss=mem.rss, maxrss=mem.maxrss) as m:  # no thread: samples by hand
        m.sample()  # 300
        mem.high = 400  # the kernel saw more than any sample
    r = m.result()
    assert r["baseline_rss_bytes"] == 100 and r["peak_rss_bytes"] == 400 and r["peak_rss_delta_bytes"] == 300
    assert r["peak_from"].startswith("ru_maxrss")


def test_rss_monitor_falls_back_to_samples_when_the_process_peaked_before():
    mem = FakeMemory([100, 300, 150], maxrss=1000)  # an earlier peak hides this one from ru_maxrss
    with memory.RssMonitor(interval_s=None, rss=mem.rss, maxrss=mem.maxrss) as m:
        m.sample()
    r = m.result()
    assert r["peak_rss_bytes"] == 300 and r["peak_rss_delta_bytes"] == 200 and r["peak_from"].startswith("sampled")
    # memory freed below the baseline is no negative peak
    mem = FakeMemory([100, 50], maxrss=1000)
    with memory.RssMonitor(interval_s=None, rss=mem.rss, maxrss=mem.maxrss) as m:
        pass
    assert m.result()["peak_rss_bytes"] == 100 and m.result()["peak_rss_delta_bytes"] == 0


def test_rss_monitor_samples_on_its_thread_until_the_block_ends():
    import threading

    seen = threading.Event()
    calls = {"n": 0}

    def rss() -> int:  # 100 at the start, then rising: the thread must have taken the samples
        calls["n"] += 1
        if calls["n"] >= 4:
            seen.set()
        return 100 * calls["n"]

    with memory.RssMonitor(interval_s=0.001, rss=rss, maxrss=lambda: 10**9) as m:
        assert seen.wait(10)  # waits for the thread's samples, no sleep
    n = calls["n"]
    r = m.result()
    assert n >= 4 and r["baseline_rss_bytes"] == 100 and r["peak_rss_bytes"] == 100 * n  # the last: at exit
    assert not m._thread.is_alive()


def test_rss_monitor_sees_an_allocation():
    """This process's real readings: the block is still held when the monitor exits, so its final reading
    includes it whatever the process did before (ru_maxrss or not) and whenever the thread sampled."""
    with memory.RssMonitor() as m:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched (a fresh mapping: above malloc's mmap threshold)
    del block
    r = m.result()
    assert r["peak_rss_delta_bytes"] >= 48 * 2**20, r
    assert memory.process_maxrss() >= r["peak_rss_bytes"] - 2**20  # the kernel's mark covers what was read


def test_ctrl_c_keeps_what_was_measured(monkeypatch):
    calls = {"n": 0}
    real = measure.one_run

    def interrupted_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # warm-up, measured run 1, then Ctrl-C during measured run 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(measure, "one_run", interrupted_on_third)
    r = prof.profile("v3-tiny", "torch", prompt_len=8, new_tokens=4, warmup=1, runs=3)
    assert r["interrupted"] is True and r["roofline"] is None
    assert r["latency"]["measured_runs"] == 1 and r["latency"]["decode_ms_per_token"]["n"] == 3
    assert r["memory"]["peak_rss_bytes"] > 0


def test_cli_profile_json_and_table(cli, tmp_path):
    code, out, err = cli("profile", "r1-tiny", "--prompt-len", "8", "--new-tokens", "3", "--runs", "1",
                         "--threshold", "2", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["gating"]["skipped_fraction"] == 1.0 and r["settings"]["threshold"] == 2.0
    code, out, err = cli("profile", "v3-tiny", "--prompt-len", "8", "--new-tokens", "3", "--runs", "1",
                         "--out", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "decode per token (ms)" in out and "energy:" in out and (tmp_path / "r.json").is_file()


@pytest.mark.parametrize("args,message", [
    (("profile", "v3-tiny", "--threshold", "0.5"), "apply to gated models"),
    (("profile", "r1-tiny", "--sweep-threshold", "abc"), "cannot read 'abc'"),
    (("profile", "v3-tiny", "--provider", "cuda"), "does not apply to the torch runtime"),
    (("profile", "v3-tiny", "--prompt-len", "5000"), "exceed the context"),
    (("profile", "v3-tiny", "--workload", "bursty"), "unknown workload"),
    (("compare", "r1-tiny"), "two targets, or one target and two runtimes"),
    (("compare", "r1-tiny", "v3-tiny", "--runtime", "torch,onnxruntime"), "compares two runtimes of one target"),
    (("profile", "no-such-model"), "unknown model"),
])
def test_cli_user_errors_are_one_line(cli, args, message):
    code, out, err = cli(*args)
    assert code == 1 and message in err and err.startswith("error: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_cli_help(cli):
    for command in ("profile", "compare"):
        code, out, _ = cli(command, "--help")
        assert code == 0 and "Usage" in out


def test_cli_compare_two_targets_in_fresh_processes(cli):
    code, out, err = cli("compare", "r1-tiny", "v3-tiny", "--prompt-len", "8", "--new-tokens", "3", "--runs", "1",
                         "--warmup", "0", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["mode"] == "targets" and [p["target"]["name"] for p in r["profiles"]] == ["r1-tiny", "v3-tiny"]
    rows = {row["metric"]: row for row in r["rows"]}
    for metric in ("peak RSS", "decode latency p50", "decode throughput", "weights stored"):
        assert rows[metric]["a"] > 0 and rows[metric]["b"] > 0 and "difference_pct" in rows[metric]
    # each profile ran in its own process: both baselines are a fresh interpreter's
    assert all(p["memory"]["baseline_rss_bytes"] < 2**30 for p in r["profiles"])


def test_compare_two_runtimes_with_outputs(onnx_r1_tiny, capsys):
    r = prof.compare(str(onnx_r1_tiny), runtime="torch,onnxruntime", isolate=False, **SMALL, roofline=False)
    assert r["mode"] == "runtimes" and [p["runtime"]["runtime"] for p in r["profiles"]] == ["torch", "onnxruntime"]
    o = r["outputs"]
    assert o["reference"] == "torch" and o["candidate"] == "onnxruntime" and o["cases"] > 0
    assert o["max_abs_diff"] < 1e-3 and o["argmax_agreement"] == 1.0 and o["logit_cosine_min"] > 0.9999
    from rich.console import Console

    from edgekit.cli.render import show_compare

    show_compare(r, Console(width=150))
    shown = capsys.readouterr().out
    assert "argmax agreement 100.00%" in shown and "B vs A" in shown


def test_int8_variants(onnx_v3_tiny, onnx_v3_tiny_int8, tmp_path):
    assert comparison._int8_variant(str(onnx_v3_tiny_int8), "onnxruntime", tmp_path, print) == str(onnx_v3_tiny_int8)
    with pytest.raises(EdgekitError, match="fp32 onnx artifact"):
        comparison._int8_variant(str(onnx_v3_tiny), "onnxruntime", tmp_path, print)
    q = comparison._int8_variant("v3-tiny", "torch", tmp_path, print)
    r = prof.profile(q, "torch", **SMALL, roofline=False)
    assert r["size"]["precision"] == "int8" and r["target"]["kind"] == "checkpoint"


def test_profile_torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    r = prof.profile("r1-tiny", "torch", **SMALL, device="cuda", dtype="fp16")
    check_latency(r)
    assert r["memory"]["cuda_max_allocated_bytes"] > 0 and r["runtime"]["device"].startswith("cuda")
