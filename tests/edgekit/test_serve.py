"""edgekit serve: the scheduler against each request alone, the HTTP front end in-process (Starlette's
TestClient / httpx over ASGI), the queue bound, the cascade and its calibration. The model thread is
held with an Event where a test needs requests to pile up; nothing here sleeps or times."""

from __future__ import annotations

import asyncio
import json
import threading

import numpy as np
import pytest

pytest.importorskip("starlette")

from edgekit.errors import EdgekitError  # noqa: E402
from edgekit.serve import Options, Request, Scheduler, open_service  # noqa: E402
from edgekit.serve.app import create_app  # noqa: E402
from edgekit.serve.scheduler import ShuttingDown  # noqa: E402
from edgekit.tokenizer import EOS  # noqa: E402

NEW = 6


def masked(runner) -> bool:
    return "attention_mask" in runner.spec.input_names


def threshold(runner):
    """R1 before per-row gates: every gate open (score > -1), so one decision per call cannot couple rows."""
    return None if masked(runner) or not runner.spec.gated else -1.0


def prompts(runner, n: int, seed: int = 0) -> list[list[int]]:
    """Seeded prompts: mixed lengths where the graph takes a mask, else one length."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 13, n) if masked(runner) else [7] * n
    return [[256, *rng.integers(0, 256, int(k) - 1).tolist()] for k in lengths]


def alone(runner, prompt, thr) -> list[int]:
    return runner.generate(prompt, NEW, thresholds=thr, stop=EOS).tokens


def drive(sched: Scheduler) -> None:
    while not sched.idle():
        sched.step()


@pytest.fixture(scope="module")
def v3(onnx_v3_tiny):
    from runtimes import open_runner

    with open_runner(onnx_v3_tiny) as r:
        yield r


@pytest.fixture(scope="module")
def r1(onnx_r1_tiny):
    from runtimes import open_runner

    with open_runner(onnx_r1_tiny) as r:
        yield r


@pytest.mark.parametrize("family", ["v3", "r1"])
@pytest.mark.parametrize("policy", ["dynamic", "fixed"])
def test_batched_greedy_equals_each_request_alone(family, policy, request):
    runner = request.getfixturevalue(family)
    thr = threshold(runner)
    ps = prompts(runner, 6)
    want = [alone(runner, p, thr) for p in ps]
    sched = Scheduler(runner, policy, max_batch=4, thresholds=thr, eos=EOS)
    reqs = [sched.submit(Request(p, NEW)) for p in ps]
    drive(sched)
    assert [r.tokens for r in reqs] == want
    assert all(r.finish_reason in ("stop", "length") for r in reqs)


@pytest.mark.parametrize("name", ["r1-ref", "v3-ref"])
def test_trained_models_batched_equal_alone(name):
    """The shipped checkpoints (torch runtime) on task prompts of mixed lengths at R1's default threshold:
    its trained gates skip different layers for different requests, decided per row."""
    from edgekit import tasks
    from runtimes import open_runner

    with open_runner(name) as runner:
        ps = [p.prompt_ids() for p in tasks.test_split(per_cell=1)][:8]
        want = [runner.generate(p, NEW, stop=EOS) for p in ps]
        sched = Scheduler(runner, "dynamic", max_batch=8, eos=EOS)
        reqs = [sched.submit(Request(p, NEW)) for p in ps]
        sched.step()
        assert len(sched.batch) == 8 and not sched.batch.mask.all()  # one left-padded batch
        drive(sched)
    assert len({len(p) for p in ps}) > 3
    assert [r.tokens for r in reqs] == [w.tokens for w in want]
    if name == "r1-ref":
        assert len({w.skipped for w in want}) > 2  # the rows' own gate decisions differ


@pytest.mark.parametrize("family", ["v3", "r1"])
def test_a_row_joins_mid_decode(family, request):
    runner = request.getfixturevalue(family)
    thr = threshold(runner)
    first = prompts(runner, 2, seed=1)
    sched = Scheduler(runner, "dynamic", max_batch=4, thresholds=thr, eos=EOS)
    early = [sched.submit(Request(p, NEW)) for p in first]
    sched.step()  # prefill + first decode step
    sched.step()
    assert len(sched.batch) == 2 and all(len(r.tokens) == 3 for r in early)
    # without a mask a joining row must have the running length: a prompt of exactly that many tokens
    n = sched.batch.past_len if not masked(runner) else 5
    late = sched.submit(Request([256, *range(40, 40 + n - 1)], NEW))
    sched.step()
    assert len(sched.batch) == 3 and late.tokens  # joined while the others were decoding
    drive(sched)
    assert [r.tokens for r in early + [late]] == [alone(runner, r.prompt, thr) for r in early + [late]]


def test_rows_leave_and_padding_is_trimmed(v3):
    sched = Scheduler(v3, "dynamic", max_batch=4, eos=None)
    short, long_ = Request(prompts(v3, 1)[0], 1), Request(prompts(v3, 1, seed=3)[0], 4)
    sched.submit(short), sched.submit(long_)
    sched.step()
    assert short.finish_reason == "length" and len(short.tokens) == 1 and sched.batch.rows == [long_]
    assert sched.batch.mask.all()  # nothing but the remaining row's real positions
    assert sched.batch.past_len == len(long_.prompt) + 1


def test_fixed_runs_a_batch_to_completion_dynamic_joins(v3):
    p = prompts(v3, 1, seed=4)[0]
    for policy in ("fixed", "dynamic"):
        sched = Scheduler(v3, policy, max_batch=4, eos=None)
        a = sched.submit(Request(p, 4))
        sched.step()
        assert sched.batch.past_len == len(p) + 1
        b = sched.submit(Request([*p, 7], 3))  # the running length: joinable even without a mask
        sched.step()
        assert len(sched.batch) == (1 if policy == "fixed" else 2) and bool(b.tokens) == (policy == "dynamic")
        drive(sched)
        assert (a.tokens, b.tokens) == (v3.generate(a.prompt, 4).tokens, v3.generate(b.prompt, 3).tokens)


def test_fixed_keeps_a_finished_row_until_the_batch_is_done(v3):
    short, long_ = (Request(p, n) for p, n in zip(prompts(v3, 2, seed=5), (1, 4)))
    sched = Scheduler(v3, "fixed", max_batch=4, eos=None)
    sched.submit(short), sched.submit(long_)
    sched.step()
    assert short.finish_reason == "length" and short.tokens == v3.generate(short.prompt, 1).tokens
    assert sched.batch.rows == [short, long_]  # static batching: the slot stays taken
    drive(sched)
    assert long_.tokens == v3.generate(long_.prompt, 4).tokens and len(short.tokens) == 1
    assert not sched.batch.rows and not sched.ghosts


def test_timeout_and_cancel_end_requests_waiting_or_running(v3):
    now = [0.0]
    sched = Scheduler(v3, "dynamic", max_batch=1, eos=None, clock=lambda: now[0])
    running, waiting, gone = (sched.submit(Request(p, 20, timeout=5.0)) for p in prompts(v3, 3))
    sched.step()
    assert running.tokens and not waiting.tokens  # max_batch 1: the others wait
    gone.cancelled = True
    now[0] = 5.0  # the deadline of all three
    sched.step()
    assert (running.finish_reason, waiting.finish_reason, gone.finish_reason) == ("timeout", "timeout", "cancelled")
    assert sched.idle() and len(running.tokens) == 2


def test_sampling_is_seeded_per_request(v3):
    p = prompts(v3, 1)[0]
    outs = []
    for batch in (1, 3):
        sched = Scheduler(v3, "dynamic", max_batch=batch, eos=None)
        reqs = [sched.submit(Request(p, NEW, temperature=1.0, seed=7)) for _ in range(3)]
        drive(sched)
        outs.append([r.tokens for r in reqs])
    assert outs[0] == outs[1] and outs[0][0] == outs[0][1]


def test_a_failed_inference_ends_every_request_and_refuses_new_ones(v3, monkeypatch):
    def boom(feeds):
        raise RuntimeError("boom")

    sched = Scheduler(v3, "dynamic", max_batch=2, eos=None)
    events = []
    reqs = [sched.submit(Request(p, 4, sink=events.append)) for p in prompts(v3, 3)]
    monkeypatch.setattr(v3, "infer", boom)
    sched.start().join(timeout=60)
    assert not sched.thread.is_alive() and str(sched.error) == "boom"
    assert [r.finish_reason for r in reqs] == ["error"] * 3 and events.count(("done", "error")) == 3
    with pytest.raises(ShuttingDown):
        sched.submit(Request([256, 1], 1))


# ------------------------------------------------------------------------------------------------ HTTP


@pytest.fixture
def service(onnx_v3_tiny):
    svc = open_service(onnx_v3_tiny, options=Options(max_batch=4, queue_limit=4, max_tokens=32))
    yield svc
    svc.close()


def test_completions_chat_and_stream(service):
    from starlette.testclient import TestClient

    with TestClient(create_app(service)) as c:
        body = {"prompt": "sort 3141=", "max_tokens": NEW, "temperature": 0}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200
        out = r.json()
        want = service.models[0].runner.generate(service.tokenizer.encode("sort 3141="), NEW, stop=EOS).tokens
        assert out["object"] == "text_completion" and out["model"] == "v3-tiny"
        assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": len(want), "total_tokens": 11 + len(want)}
        assert out["choices"][0]["text"] == service.tokenizer.decode([t for t in want if t != EOS])
        assert out["choices"][0]["finish_reason"] == ("stop" if want[-1] == EOS else "length")

        s = c.post("/v1/completions", json={**body, "stream": True})
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in s.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(ch["object"] == "text_completion" and ch["id"] == chunks[0]["id"] for ch in chunks)
        assert "".join(ch["choices"][0]["text"] for ch in chunks) == out["choices"][0]["text"]
        assert [ch["choices"][0]["finish_reason"] for ch in chunks][-1] == out["choices"][0]["finish_reason"]
        assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])

        chat = {"messages": [{"role": "user", "content": "sort 3141="}], "max_tokens": NEW, "temperature": 0}
        r = c.post("/v1/chat/completions", json=chat)
        assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": out["choices"][0]["text"]}
        s = c.post("/v1/chat/completions", json={**chat, "stream": True})
        events = [line[6:] for line in s.text.splitlines() if line.startswith("data: ")]
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["object"] == "chat.completion.chunk"
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == out["choices"][0]["text"]


def test_stop_strings_cut_the_text(service):
    from starlette.testclient import TestClient

    with TestClient(create_app(service)) as c:
        body = {"prompt": "sort 3141=", "max_tokens": 12, "temperature": 0}
        full = c.post("/v1/completions", json=body).json()["choices"][0]["text"]
        stop = next(ch for ch in full[2:] if ch.isascii() and ch.isprintable())  # one byte, one token
        out = c.post("/v1/completions", json={**body, "stop": [stop]}).json()["choices"][0]
        streamed = c.post("/v1/completions", json={**body, "stop": stop, "stream": True}).text
    assert (out["text"], out["finish_reason"]) == (full[:full.index(stop)], "stop"), (full, stop, out)
    chunks = [json.loads(line[6:]) for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == out["text"], (full, stop, streamed)


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"prompt": 5}).encode(), 422, "'prompt'"),
    (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 422, "'max_tokens' must be between 1 and 32"),
    (json.dumps({"prompt": "x", "max_tokens": 1.5}).encode(), 422, "'max_tokens' must be an integer"),
    (json.dumps({"prompt": "x", "temperature": -1}).encode(), 422, "'temperature'"),
    (json.dumps({"prompt": "x", "n": 2}).encode(), 422, "'n' is not supported"),
    (json.dumps({"prompt": "x", "stream": "yes"}).encode(), 422, "'stream'"),
    (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "not served here"),
    (json.dumps({"prompt": [1, 999]}).encode(), 422, "token ids"),
    (json.dumps({"prompt": "x" * 1100}).encode(), 400, "context"),
    (json.dumps({"prompt": "x" * (2 << 20)}).encode(), 413, "larger than"),
])
def test_invalid_requests_get_a_clear_4xx(service, body, status, words):
    from starlette.testclient import TestClient

    with TestClient(create_app(service)) as c:
        r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert words in err["message"] and err["type"]


def test_chat_needs_messages(service):
    from starlette.testclient import TestClient

    with TestClient(create_app(service)) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]})
    assert r.status_code == 422 and "messages[0]" in r.json()["error"]["message"]


def test_full_queue_is_429_with_retry_after(service):
    from starlette.testclient import TestClient

    with TestClient(create_app(service, start=False)) as c:  # no model thread: nothing leaves the queue
        for _ in range(service.options.queue_limit):
            service.entry.submit(Request([256, 1, 2], 2))
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_exceeded"
        assert c.get("/health").json()["queue_depth"] == service.options.queue_limit


def test_twice_the_queue_limit_none_lost(service):
    import httpx

    limit = service.options.queue_limit
    gate = threading.Event()
    service.entry.gate = gate  # the model thread waits here: requests pile up until released
    service.start()
    app = create_app(service, start=False)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            tasks = [asyncio.create_task(c.post("/v1/completions", json={"prompt": f"sort {i}=", "max_tokens": 3,
                                                                          "temperature": 0}))
                     for i in range(2 * limit)]
            while sum(t.done() for t in tasks) < limit or service.entry.waiting_total() < limit:
                await asyncio.sleep(0)  # yield to the request tasks (no timing involved)
            gate.set()
            return await asyncio.gather(*tasks)

    responses = asyncio.run(main())
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * limit + [429] * limit
    assert all(r.json()["choices"][0]["finish_reason"] in ("stop", "length") for r in responses
               if r.status_code == 200)


def test_metrics_parse(service):
    from prometheus_client.parser import text_string_to_metric_families
    from starlette.testclient import TestClient

    with TestClient(create_app(service)) as c:
        for _ in range(2):
            assert c.post("/v1/completions", json={"prompt": "sort 12=", "max_tokens": 3}).status_code == 200
        c.post("/v1/completions", content=b"{")
        text = c.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert value[("edgekit_http_responses_total", (("status", "200"),))] == 2
    assert value[("edgekit_http_responses_total", (("status", "400"),))] == 1
    assert sum(v for (n, lab), v in value.items() if n == "edgekit_requests_total") == 2
    assert value[("edgekit_request_seconds_count", (("model", "v3-tiny"),))] == 2
    assert value[("edgekit_generated_tokens_total", (("model", "v3-tiny"),))] >= 2
    assert value[("edgekit_batch_rows_count", (("model", "v3-tiny"),))] >= 1
    assert ("edgekit_queue_depth", (("model", "v3-tiny"),)) in value


def test_drain_ends_every_request_with_a_final_answer(service):
    gate = threading.Event()
    service.entry.gate = gate
    events = []
    reqs = [service.entry.submit(Request([256, 5, 6], 30, sink=events.append)) for _ in range(3)]
    service.start()
    service.drain(0.0)  # the deadline has passed by the time the thread runs
    gate.set()
    service.entry.join(timeout=60)
    assert not service.entry.thread.is_alive()
    assert [r.finish_reason for r in reqs] == ["shutdown"] * 3
    assert sum(e[0] == "done" for e in events) == 3
    with pytest.raises(ShuttingDown):
        service.entry.submit(Request([256, 1], 1))


# ------------------------------------------------------------------------------------------ bundles / CLI


def test_unsigned_bundle_refused_without_allow_unsigned(onnx_v3_tiny, tmp_path, cli):
    from edgekit import bundle

    file = tmp_path / "v3.tar.gz"
    bundle.package(onnx_v3_tiny, "host", file)
    with pytest.raises(EdgekitError, match="--public-key"):
        open_service(file)
    code, out, err = cli("serve", str(file), "--port", "0")
    assert code == 1 and err.startswith("error: ") and "--allow-unsigned" in err and len(err.splitlines()) == 1
    svc = open_service(file, options=Options(allow_unsigned=True))
    try:
        assert svc.name == "v3-tiny" and svc.models[0].sha256
    finally:
        svc.close()


def test_cli_help_and_bad_options(cli):
    code, out, _ = cli("serve", "--help")
    assert code == 0 and "--batching" in out and "--fallback" in out
    code, out, _ = cli("cascade", "calibrate", "--help")
    assert code == 0 and "--rate" in out
    code, _, err = cli("serve", "v3-tiny", "--batching", "greedy")
    assert code == 1 and "unknown --batching 'greedy'" in err
    code, _, err = cli("serve", "v3-tiny", "--fallback", "r1-tiny")
    assert code == 1 and "--policy" in err


def test_server_starts_and_stops(service):
    from edgekit.serve.server import serve

    seen = {}

    def ready(server):
        seen["port"] = server.servers[0].sockets[0].getsockname()[1]
        server.should_exit = True  # a clean stop: the lifespan drains and joins the model thread

    serve(service, "127.0.0.1", 0, ready=ready)
    assert seen["port"] > 0 and service.entry.draining


# ------------------------------------------------------------------------------------------------- cascade


def _policy(tmp_path, signal: str, thr: float, primary="r1-tiny", fallback="v3-tiny"):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"edgekit_cascade_policy": 1, "signal": signal, "threshold": thr, "rate": 0.2,
                                "models": {"primary": {"name": primary}, "fallback": {"name": fallback}}}))
    return path


def test_cascade_routes_below_threshold_to_the_fallback(onnx_r1_tiny, onnx_v3_tiny, tmp_path):
    from starlette.testclient import TestClient

    prompt = "sort 3141="
    body = {"prompt": prompt, "max_tokens": NEW, "temperature": 0}
    probe = open_service(onnx_r1_tiny, options=Options(max_batch=1))
    try:
        r = Request(probe.tokenizer.encode(prompt), NEW)
        probe.entry.submit(r)
        drive(probe.entry)
        margin = r.confidence.margin
        r1_tokens = r.tokens
    finally:
        probe.close()
    for thr, answered_by in ((margin + 1e-6, "v3-tiny"), (margin - 1e-6, "r1-tiny")):
        svc = open_service(onnx_r1_tiny, onnx_v3_tiny, _policy(tmp_path, "margin", thr), Options(max_batch=2))
        try:
            v3 = svc.models[1].runner.generate(svc.tokenizer.encode(prompt), NEW, stop=EOS).tokens
            with TestClient(create_app(svc)) as c:
                out = c.post("/v1/completions", json=body).json()
        finally:
            svc.close()
        assert out["model"] == out["edgekit"]["model"] == answered_by
        assert out["edgekit"]["escalated"] == (answered_by == "v3-tiny")
        want = v3 if answered_by == "v3-tiny" else r1_tokens
        assert out["usage"]["completion_tokens"] == len(want)
        assert out["choices"][0]["text"] == svc.tokenizer.decode([t for t in want if t != EOS])


def test_cascade_drain_finishes_requests_handed_over_while_draining(onnx_r1_tiny, onnx_v3_tiny, tmp_path):
    svc = open_service(onnx_r1_tiny, onnx_v3_tiny, _policy(tmp_path, "margin", 2.0), Options(max_batch=2))
    try:  # margin <= 1 < 2.0: every request is handed to V3, after V3's thread was told to drain
        gate = threading.Event()
        svc.entry.gate = gate
        reqs = [svc.entry.submit(Request([256, *b"sort 31="], 3)) for _ in range(3)]
        svc.start()
        svc.drain(600.0)
        gate.set()
        for m in svc.models:
            m.scheduler.join(timeout=120)
        assert not any(m.scheduler.thread.is_alive() for m in svc.models)
        assert [(r.model, r.finish_reason in ("stop", "length")) for r in reqs] == [("v3-tiny", True)] * 3
    finally:
        svc.close()


def test_cascade_policy_must_match_models(onnx_r1_tiny, onnx_v3_tiny, tmp_path):
    with pytest.raises(EdgekitError, match="calibrated for primary model r1-ref"):
        open_service(onnx_r1_tiny, onnx_v3_tiny, _policy(tmp_path, "margin", 0.0, primary="r1-ref"))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(EdgekitError, match="not an edgekit cascade policy"):
        open_service(onnx_r1_tiny, onnx_v3_tiny, bad)


@pytest.mark.parametrize("signal", ["probe", "margin"])
def test_calibrate_threshold_gives_the_rate(onnx_r1_tiny, onnx_v3_tiny, tmp_path, signal, cli):
    from edgekit import tasks
    from edgekit.serve.calibrate import answer_all, calibrate
    from edgekit.serve.cascade import read_policy
    from runtimes import open_runner

    problems = tasks.sample(tasks.training_problems(seed=5), per_cell=2)  # 30 problems
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in problems))
    out = tmp_path / "policy.json"
    if signal == "probe":
        r = calibrate(str(onnx_r1_tiny), str(onnx_v3_tiny), data, 0.2, out, signal=signal)
    else:  # through the command line
        code, stdout, err = cli("cascade", "calibrate", onnx_r1_tiny, onnx_v3_tiny, "--data", data, "--rate", "0.2",
                                "--out", out, "--signal", signal, "--json")
        assert code == 0, err
        r = json.loads(stdout)
        code, _, err = cli("cascade", "calibrate", onnx_r1_tiny, onnx_v3_tiny, "--data", data, "--out", out)
        assert code == 1 and "already exists" in err
    assert r["achieved_rate"] == pytest.approx(6 / 30) and r["n"] == 30
    policy = read_policy(out)
    assert policy.signal == signal and policy.data["models"]["primary"]["name"] == "r1-tiny"
    with open_runner(onnx_r1_tiny) as runner:  # the written policy, rescoring the data, escalates 6 of 30
        tok = runner.resolved.tokenizer()
        reqs = answer_all(runner, tok, [tok.encode(p.prompt) for p in problems], [len(p.answer) + 1 for p in problems])
    assert sum(policy.score(q) < policy.threshold for q in reqs) == 6
