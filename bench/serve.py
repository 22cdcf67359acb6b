"""Issue 17 benchmark: `edgekit serve` under load on loopback, and the R1 -> V3 cascade.

1. Load: `edgekit serve` in a subprocess (uvicorn, ONNX Runtime, --threads 1) for each batching policy;
   an asyncio httpx client keeps C requests in flight (C = 1, 4, 16, 64) over seeded held-out task prompts
   (mixed lengths, greedy, max_tokens 16, answers end at EOS), bounded in requests and seconds per cell:
   requests/s, tokens/s, p50/p99 latency, mean rows per decode step (from /metrics). The two policies run
   cell by cell in alternation, so a drifting load hits both.
2. Overflow: 2x the queue limit at once against a small queue: every request must get 200 or 429.
3. Cascade on v3-ref / r1-ref: `cascade calibrate` on 480 training-distribution problems (never held out),
   then the held-out split (960): R1 answers each request alone (timed), V3 too; per signal the accuracy
   and mean cost (R1 alone = 1; an escalated request costs R1's prefill (signals decided there) or all of
   R1 (mean_logprob) plus V3's measured time) against the escalation rate, and the calibrated 20 % policy.

Writes bench/results/serve.json and serve.png.

    .venv/bin/python bench/serve.py [--work /tmp/ek-serve] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("EDGEKIT_QUIET", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from accuracy import machine  # noqa: E402  (bench/ is on sys.path: the one machine record)

from edgekit import tasks  # noqa: E402

MODELS = ("r1-ref", "v3-ref")


def artifacts(work: Path) -> dict[str, Path]:
    from edgekit import api

    out = {}
    for name in MODELS:
        path = work / name
        if not (path / "manifest.json").is_file() or "attention_mask" not in (path / "manifest.json").read_text():
            print(f"exporting {name} -> {path}", flush=True)
            api.export(name, "onnx", path, force=True)
        out[name] = path
    return out


# ------------------------------------------------------------------------------------------------- load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact: Path, batching: str, max_batch: int, queue_limit: int, extra=()):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgekit.cli", "serve", str(artifact), "--port", str(self.port), "--batching",
             batching, "--max-batch", str(max_batch), "--queue-limit", str(queue_limit), "--threads", "1",
             "--timeout", "120", *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, seconds: float = 120) -> None:
        import httpx

        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not come up")

    def metrics(self) -> dict:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def stop(self) -> int:
        self.proc.terminate()  # SIGTERM: drain, then exit
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


def rows_per_step(before: dict, after: dict) -> float | None:
    def total(m, suffix):
        return sum(v for (n, _), v in m.items() if n == f"edgekit_batch_rows_{suffix}")

    steps = total(after, "count") - total(before, "count")
    return round((total(after, "sum") - total(before, "sum")) / steps, 2) if steps else None


async def load(url: str, prompts: list[str], concurrency: int, requests: int, seconds: float,
               max_tokens: int) -> dict:
    import httpx

    latencies, tokens, statuses = [], 0, {}
    next_i = 0
    deadline = time.perf_counter() + seconds

    async def worker(client):
        nonlocal next_i, tokens
        while next_i < requests and time.perf_counter() < deadline:
            i, next_i = next_i, next_i + 1
            t = time.perf_counter()
            r = await client.post(url + "/v1/completions", json={"prompt": prompts[i % len(prompts)],
                                                                 "max_tokens": max_tokens, "temperature": 0})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                latencies.append(time.perf_counter() - t)
                tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "statuses": statuses, "wall_s": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def load_test(artifact: Path, levels: list[int], per_level: int, seconds: float, max_batch: int) -> list[dict]:
    prompts = [p.prompt for p in tasks.test_split(per_cell=8)]
    np.random.default_rng(0).shuffle(prompts)
    servers = {b: Server(artifact, b, max_batch, queue_limit=256) for b in ("fixed", "dynamic")}
    rows = []
    try:
        for s in servers.values():
            s.wait()
        for s in servers.values():  # warm-up
            asyncio.run(load(s.url, prompts, 4, 16, 30, 16))
        for c in levels:
            for b, s in servers.items():
                before = s.metrics()
                r = asyncio.run(load(s.url, prompts, c, max(per_level, 4 * c), seconds, 16))
                r.update(model=artifact.name, batching=b, rows_per_step=rows_per_step(before, s.metrics()))
                print(json.dumps(r), flush=True)
                rows.append(r)
    finally:
        for s in servers.values():
            s.stop()
    return rows


def closed_loop(artifact: Path, levels: list[int], requests: int, max_batch: int, rounds: int) -> list[dict]:
    """The scheduler alone (no HTTP, no client in the way): C requests outstanding, a finished one replaced at
    once, over the same prompts; both policies alternate round by round; medians over rounds."""
    from edgekit.serve import Request, Scheduler
    from runtimes import open_runner

    prompts = [p.prompt_ids() for p in tasks.test_split(per_cell=8)]
    np.random.default_rng(0).shuffle(prompts)
    rows = []
    with open_runner(artifact, threads=1) as runner:
        eos = runner.resolved.tokenizer().eos_id
        for c in levels:
            runs: dict[str, list] = {"fixed": [], "dynamic": []}
            for _ in range(rounds):
                for policy in runs:
                    s = Scheduler(runner, policy, max_batch, queue_limit=c + 1, eos=eos)
                    done, sent, live, steps, rowsum = [], 0, [], 0, 0
                    t0 = time.perf_counter()
                    while len(done) < requests:
                        while len(live) < c and sent < requests:
                            r = s.submit(Request(prompts[sent % len(prompts)], 16))
                            r.t0, sent = time.perf_counter(), sent + 1
                            live.append(r)
                        s.step()
                        steps, rowsum = steps + 1, rowsum + len(s.batch.rows)
                        for r in [r for r in live if r.finish_reason]:
                            r.ms = 1000 * (time.perf_counter() - r.t0)
                            live.remove(r)
                            done.append(r)
                    wall = time.perf_counter() - t0
                    lat = [r.ms for r in done]
                    runs[policy].append({"tokens_per_s": sum(len(r.tokens) for r in done) / wall,
                                         "p50_ms": float(np.percentile(lat, 50)),
                                         "p99_ms": float(np.percentile(lat, 99)), "rows_per_step": rowsum / steps})
            for policy, rs in runs.items():
                row = {k: round(float(np.median([r[k] for r in rs])), 2) for k in rs[0]}
                rows.append({"model": artifact.name, "concurrency": c, "batching": policy, **row})
                print("closed loop", json.dumps(rows[-1]), flush=True)
    return rows


def overflow(artifact: Path, queue_limit: int = 16, max_batch: int = 4) -> dict:
    """2x the queue limit at once, plus what the batch holds: every request must end in 200 or 429."""
    import httpx

    s = Server(artifact, "dynamic", max_batch, queue_limit)
    s.wait()
    n = 2 * queue_limit

    async def burst():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n + 4)) as c:
            rs = await asyncio.gather(*(c.post(s.url + "/v1/completions", json={"prompt": f"sort {i:05d}=",
                                                                                 "max_tokens": 16, "temperature": 0})
                                        for i in range(n)), return_exceptions=True)
        return rs

    try:
        t = time.perf_counter()
        rs = asyncio.run(burst())
        wall = time.perf_counter() - t
    finally:
        code = s.stop()
    statuses: dict = {}
    for r in rs:
        key = type(r).__name__ if isinstance(r, Exception) else r.status_code
        statuses[key] = statuses.get(key, 0) + 1
    retry = [int(r.headers["Retry-After"]) for r in rs if not isinstance(r, Exception) and r.status_code == 429]
    return {"queue_limit": queue_limit, "max_batch": max_batch, "sent": n, "statuses": statuses,
            "all_200_or_429": set(statuses) <= {200, 429}, "wall_s": round(wall, 2),
            "retry_after_s": sorted(set(retry)), "server_exit_code": code}


# ------------------------------------------------------------------------------------------------ cascade


def run_each(runner, tok, problems, max_tokens=None, solo=True) -> tuple[list, list[float]]:
    """Each problem alone (batch 1), timed: the requests (with their confidence records) and seconds."""
    from edgekit.serve import Request, Scheduler

    reqs, secs = [], []
    for p in problems:
        s = Scheduler(runner, "dynamic", 1, eos=tok.eos_id, solo_prefill=solo)
        r = Request(p.prompt_ids(), max_tokens or len(p.answer_ids()))
        t = time.perf_counter()
        s.submit(r)
        while not s.idle():
            s.step()
        secs.append(time.perf_counter() - t)
        reqs.append(r)
    return reqs, secs


def cascade(arts: dict[str, Path], work: Path, per_cell: int, calib_per_cell: int) -> dict:
    from edgekit.serve.calibrate import calibrate
    from edgekit.serve.cascade import SIGNALS, read_policy
    from runtimes import open_runner

    calib = tasks.sample(tasks.training_problems(seed=17017), per_cell=calib_per_cell)
    data = work / "cascade_calibration.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer}) + "\n" for p in calib))
    policies = {}
    for sig in SIGNALS:
        out = work / f"policy-{sig}.json"
        r = calibrate(str(arts["r1-ref"]), str(arts["v3-ref"]), data, 0.2, out, signal=sig, threads=1, force=True)
        print("calibrated", json.dumps(r), flush=True)
        policies[sig] = (read_policy(out), r)
    held = tasks.test_split(per_cell=per_cell)
    runs = {}
    for name in MODELS:
        with open_runner(arts[name], threads=1) as runner:
            tok = runner.resolved.tokenizer()
            reqs, secs = run_each(runner, tok, held)
            pre = run_each(runner, tok, held, max_tokens=1)[1] if name == "r1-ref" else None
        ok = np.array([r.tokens == p.answer_ids() for r, p in zip(reqs, held)])
        runs[name] = {"reqs": reqs, "secs": np.array(secs), "prefill": None if pre is None else np.array(pre),
                      "ok": ok}
        print(name, "held-out accuracy", ok.mean(), "mean ms", 1000 * np.mean(secs), flush=True)
    r1, v3 = runs["r1-ref"], runs["v3-ref"]
    unit = r1["secs"].mean()
    gap = v3["ok"].mean() - r1["ok"].mean()
    out = {"heldout_n": len(held), "calibration_n": len(calib), "r1_accuracy": float(r1["ok"].mean()),
           "v3_accuracy": float(v3["ok"].mean()), "r1_ms": round(1000 * unit, 3),
           "r1_prefill_ms": round(1000 * r1["prefill"].mean(), 3), "v3_ms": round(1000 * v3["secs"].mean(), 3),
           "v3_cost": round(float(v3["secs"].mean() / unit), 3), "signals": {}}
    for sig, (pol, cal) in policies.items():
        scores = np.array([pol.score(r) for r in r1["reqs"]])
        before_v3 = r1["prefill"] if pol.stage == "first" else r1["secs"]
        esc_cost = (before_v3 + v3["secs"]) / unit
        curve = []
        order = np.argsort(scores, kind="stable")
        for rate in np.linspace(0, 1, 21):
            esc = np.zeros(len(held), bool)
            esc[order[:int(round(rate * len(held)))]] = True
            curve.append(point(esc, r1, v3, esc_cost, unit, gap, rate))
        at = scores < pol.threshold  # the calibrated threshold, applied to held-out requests
        out["signals"][sig] = {"stage": pol.stage, "calibrated": {**point(at, r1, v3, esc_cost, unit, gap, 0.2),
                                                                  "threshold": pol.threshold,
                                                                  "on_calibration_data": cal},
                               "curve": curve}
    return out


def point(esc, r1, v3, esc_cost, unit, gap, rate) -> dict:
    acc = float(np.where(esc, v3["ok"], r1["ok"]).mean())
    cost = float(np.where(esc, esc_cost, r1["secs"] / unit).mean())
    return {"target_rate": round(float(rate), 3), "rate": round(float(esc.mean()), 4), "accuracy": round(acc, 4),
            "gap_recovered": round((acc - r1["ok"].mean()) / gap, 3) if gap else None, "mean_cost": round(cost, 3)}


# --------------------------------------------------------------------------------------------------- plot


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, key, title in ((a, "closed_loop", "scheduler in-process"), (b, "load", "HTTP on loopback")):
        for model, color in zip(MODELS, ("C0", "C1")):
            for batching, style in (("fixed", "o--"), ("dynamic", "s-")):
                rows = [r for r in res.get(key, []) if r["batching"] == batching and r["model"] == model]
                ax.plot([r["concurrency"] for r in rows], [r["tokens_per_s"] for r in rows], style, color=color,
                        label=f"{model} {batching}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("generated tokens/s")
        ax.set_title(title)
        ax.legend(fontsize=8)
    cas = res["cascade"]
    for sig, d in cas["signals"].items():
        c.plot([p["rate"] for p in d["curve"]], [p["accuracy"] for p in d["curve"]], label=sig)
        cal = d["calibrated"]
        c.plot([cal["rate"]], [cal["accuracy"]], "k*")
    c.axhline(cas["r1_accuracy"], color="gray", ls=":", label="R1 alone")
    c.axhline(cas["v3_accuracy"], color="gray", ls="--", label="V3 alone")
    c.axvline(0.2, color="red", lw=0.6)
    c.set_xlabel("escalation rate (held-out)")
    c.set_ylabel("accuracy")
    c.set_title("R1 -> V3 cascade (* = calibrated 20 % threshold)")
    c.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/ek-serve"))
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--quick", action="store_true", help="smoke test: few requests, a small held-out sample")
    ap.add_argument("--skip", action="append", default=[], choices=["load", "closed_loop", "overflow", "cascade"])
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    arts = artifacts(args.work)
    res: dict = {"machine_before": machine(), "settings": {
        "threads": 1, "max_batch": 16, "max_tokens": 16, "runtime": "onnxruntime cpu"}}
    if "load" not in args.skip:
        levels = [1, 4] if args.quick else [1, 4, 16, 64]
        res["load"], res["dynamic_over_fixed"] = [], {}
        for name in MODELS:
            rows = load_test(arts[name], levels, 16 if args.quick else 192, 20 if args.quick else 60, 16)
            res["load"] += rows
            by = {(r["batching"], r["concurrency"]): r for r in rows}
            c = 16 if ("dynamic", 16) in by else max(levels)
            res["dynamic_over_fixed"][name] = {"concurrency": c, "throughput": round(
                by["dynamic", c]["tokens_per_s"] / by["fixed", c]["tokens_per_s"], 3),
                "p99_ratio": round(by["dynamic", c]["p99_ms"] / by["fixed", c]["p99_ms"], 3)}
    if "closed_loop" not in args.skip:
        res["closed_loop"], res["closed_loop_dynamic_over_fixed"] = [], {}
        for name in MODELS:
            rows = closed_loop(arts[name], [1, 4] if args.quick else [1, 4, 16, 64], 32 if args.quick else 192,
                               16, 1 if args.quick else 3)
            res["closed_loop"] += rows
            by = {(r["batching"], r["concurrency"]): r for r in rows}
            c = 16 if ("dynamic", 16) in by else 4
            dyn, fix = by["dynamic", c], by["fixed", c]
            res["closed_loop_dynamic_over_fixed"][name] = {
                "concurrency": c, "throughput": round(dyn["tokens_per_s"] / fix["tokens_per_s"], 3),
                "p99_ratio": round(dyn["p99_ms"] / fix["p99_ms"], 3)}
    if "overflow" not in args.skip:
        res["overflow"] = overflow(arts["r1-ref"])
        print("overflow", json.dumps(res["overflow"]), flush=True)
    if "cascade" not in args.skip:
        res["cascade"] = cascade(arts, args.work, 2 if args.quick else tasks.TEST_PER_CELL,
                                 2 if args.quick else 32)
    res["machine_after"] = machine()
    out = args.work if args.quick else args.out  # a smoke test leaves bench/results alone
    (out / "serve.json").write_text(json.dumps(res, indent=1) + "\n")
    if "load" in res and "cascade" in res:
        plot(res, out / "serve.png")
    return res


if __name__ == "__main__":
    main()
