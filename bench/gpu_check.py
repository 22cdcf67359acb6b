"""edgekit's CUDA paths on one NVIDIA GPU, in one run (run it on a GPU machine; everything here is measured there).

1. the machine: nvidia-smi, torch, ONNX Runtime's providers, and the profiles/*.toml that `match` picks;
2. its ceilings: device-to-device copy bandwidth (bytes read + written) and dense fp16 / fp32 matrix rates (CUDA
   events, median of 10 after warm-up, random data) -- the measured fields of the device's profile;
3. ONNX Runtime's CUDA provider on edgekit's graphs (issue 14: "check what runs on the CUDA provider"): tiny V3 / R1
   (fp32, int8) and a tiny Hugging Face llama (fused, unfused; fp32, int8) exported here, each run on the CUDA
   provider against the same graph on the CPU provider (validate.run's seeded cases, padded ones included), and
   which provider ORT placed each op type on (its profiler's per-node records);
4. full size on the GPU through the torch runtime (the brief: "on an A100 V3 peaks at ~28 GB and R1 at ~16 GB",
   "R1 at 5K tokens uses ~42% less memory"): `edgekit plan` vs `edgekit profile` for r1-8.5b and v3-13b, fp16,
   a 5,000-token prompt + 16 new tokens: peak CUDA memory, prefill seconds, decode tokens/s;
5. speed on the CUDA provider: a SmolLM2-135M-shaped llama (random weights) exported fused fp32 and fused int8,
   `edgekit profile` on CUDA vs the CPU provider.

    python bench/gpu_check.py [--out DIR] [--budget 480] [--parts machine,ceilings,...]

Each part is skipped (with the reason recorded) when the time budget would not cover it; a failing part records its
error and the run goes on. Writes DIR/gpu_<profile>.json (DIR: bench/results), after every part.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("EDGEKIT_QUIET", "1")

FULL = ("r1-8.5b", "v3-13b")
PROMPT, NEW = 5000, 16
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def cli(*args: str, timeout: float) -> dict:
    """`edgekit ARGS --json` in a fresh process (its GPU memory is its own); the JSON, or the error."""
    t0 = time.time()
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))  # keep a carried onnxruntime
    p = subprocess.run([sys.executable, "-m", "edgekit.cli", *args, "--json"], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT, env={**os.environ, "PYTHONPATH": path})
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-3:], "seconds": round(time.time() - t0, 1)}
    return {**json.loads(p.stdout), "seconds": round(time.time() - t0, 1)}


def machine() -> dict:
    import onnxruntime as ort
    import torch

    from profiles import match

    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
    name = torch.cuda.get_device_name()
    return {"nvidia_smi": smi, "torch": torch.__version__, "torch_cuda": torch.version.cuda, "gpu": name,
            "capability": ".".join(map(str, torch.cuda.get_device_capability())),
            "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
            "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers(),
            "profile": match(name), "cpu_count": os.cpu_count()}


def ceilings() -> dict:
    import torch

    def median_ms(fn) -> float:
        for _ in range(3):
            fn()
        times = []
        for _ in range(10):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        return sorted(times)[len(times) // 2]

    torch.backends.cuda.matmul.allow_tf32 = False
    n = 1 << 30  # 4 GiB of fp32: far beyond the L2
    pair = [torch.rand(n, device="cuda"), torch.empty(n, device="cuda")]
    out = {"copy_gbs": 2 * 4 * n / median_ms(lambda: pair[1].copy_(pair[0])) / 1e6}
    pair.clear()
    m = 8192
    for dtype, key in ((torch.float16, "fp16_tflops"), (torch.float32, "fp32_tflops")):
        pair[:] = [torch.randn(m, m, device="cuda", dtype=dtype) for _ in range(2)]
        out[key] = 2 * m**3 / median_ms(lambda: pair[0] @ pair[1]) / 1e9
    pair.clear()
    torch.cuda.empty_cache()
    return out


def _placement(session_path: str) -> dict:
    """op type -> {provider: node count} from an ONNX Runtime profile (one record per node run)."""
    seen: dict[str, dict[str, set]] = {}
    for ev in json.loads(Path(session_path).read_text()):
        args = ev.get("args") or {}
        if ev.get("cat") == "Node" and "provider" in args and ev.get("name", "").endswith("_kernel_time"):
            seen.setdefault(args.get("op_name", "?"), {}).setdefault(args["provider"], set()).add(ev["name"])
    return {op: {p.replace("ExecutionProvider", ""): len(n) for p, n in by.items()} for op, by in sorted(seen.items())}


def ort_cuda(work: Path, provider: str = "cuda") -> list[dict]:
    """Each tiny graph on the CUDA provider vs the CPU provider: agreement and where ORT placed each op."""
    import onnxruntime as ort
    from hf_tiny import save_model, write_tokenizer

    from edgekit import api, validate
    from runtimes import open_runner
    from runtimes.onnxruntime import PROVIDERS

    hf = work / "hf-llama"
    save_model(hf, "llama")
    write_tokenizer(hf)
    rows = []
    for target, int8, fuse in (("v3-tiny", False, True), ("v3-tiny", True, True), ("r1-tiny", False, True),
                               ("r1-tiny", True, True), (hf, False, True), (hf, True, True), (hf, False, False),
                               (hf, True, False)):
        name = f"{'llama-tiny' if target == hf else target}{'-int8' if int8 else ''}{'' if fuse else '-unfused'}"
        row = {"graph": name}
        try:
            art = work / name
            api.export(target, "onnx", art, int8=int8, fuse=fuse, force=True)
            with open_runner(art, "onnxruntime") as cpu, open_runner(art, "onnxruntime", provider=provider) as gpu:
                res = validate.run(cpu, gpu, cpu.spec)
                row.update(providers_active=gpu.describe()["providers_active"],
                           max_relative_diff=res["max_relative_diff"], logit_cosine_min=res["logit_cosine_min"],
                           argmax_agreement=res["argmax_agreement"],
                           skip_patterns_equal=all(c.get("executed") == c.get("executed_candidate")
                                                   for c in res["cases"]))
            so = ort.SessionOptions()
            so.enable_profiling, so.profile_file_prefix = True, str(work / f"prof-{name}")
            sess = ort.InferenceSession(str(art / "model.onnx"), so,
                                        providers=[PROVIDERS[provider], "CPUExecutionProvider"])
            with open_runner(art, "onnxruntime") as cpu:
                spec = cpu.spec
            for case in validate.cases(spec):
                feeds = spec.dummy(*case["shape"], seed=1, thresholds=case["thresholds"], pads=case["pads"])
                try:
                    sess.run(None, feeds)
                except Exception as e:  # noqa: BLE001 -- recorded: the CUDA provider refusing a shape is a finding
                    row.setdefault("refused", []).append(f"{case['shape']}: {str(e).splitlines()[0][:200]}")
            row["placement"] = _placement(sess.end_profiling())
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "placement"}), flush=True)
    return rows


def full_size(profile: str | None, budget_end: float) -> list[dict]:
    rows = []
    for model in FULL:
        left = budget_end - time.time()
        if left < 90:
            rows.append({"model": model, "skipped": f"time budget ({left:.0f} s left)"})
            continue
        plan = cli("plan", model, "--device", profile or "h100-sxm", "--precision", "fp16", "--context",
                   str(PROMPT + NEW), timeout=120)
        prof = cli("profile", model, "--runtime", "torch", "--device", "cuda", "--dtype", "fp16", "--prompt-len",
                   str(PROMPT), "--new-tokens", str(NEW), "--warmup", "1", "--runs", "2", timeout=left - 30)
        rows.append({"model": model, "plan": plan, "profile": prof})
        print(json.dumps({"model": model, "plan_keys": list(plan)[:8], "profile_error": prof.get("error"),
                          "seconds": prof.get("seconds")}), flush=True)
    return rows


def ort_speed(work: Path, budget_end: float, provider: str = "cuda", layers: int | None = None) -> dict:
    import transformers
    from hf_tiny import write_tokenizer

    from edgekit import api

    d = work / "smollm2-shape"
    cfg = {**SMOLLM2, **({"num_hidden_layers": layers} if layers else {})}
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**cfg))
    model.save_pretrained(d, safe_serialization=True)
    write_tokenizer(d)
    out = {}
    for name, int8 in (("fp32", False), ("int8", True)):
        if budget_end - time.time() < 120:
            out[name] = {"skipped": "time budget"}
            continue
        art = work / f"smollm2-{name}"
        t0 = time.time()
        gates = {"min_cosine": 0.0, "max_ppl_increase": 10.0} if int8 else {}  # random weights: speed only
        api.export(d, "onnx", art, int8=int8, force=True, **gates)
        out[name] = {"export_s": round(time.time() - t0, 1)}
        for prov in dict.fromkeys((provider, "cpu")):
            out[name][prov] = cli("profile", str(art), "--provider", prov, "--prompt-len", "128",
                                      "--new-tokens", "64", "--warmup", "1", "--runs", "3", "--no-energy",
                                      timeout=max(30, budget_end - time.time()))
        decode = {p: (v.get("error") or v["latency"]["decode_tokens_per_s"]) if isinstance(v, dict) else v
                  for p, v in out[name].items()}
        print(json.dumps({name: decode}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole run")
    ap.add_argument("--parts", default="machine,ceilings,full_size,ort_cuda,ort_speed")
    ap.add_argument("--dry-cpu", action="store_true", help="check this script on a CPU machine: the CPU provider "
                    "stands in for CUDA, a 2-layer model for the speed part")
    a = ap.parse_args()
    end = time.time() + a.budget
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "edgekit-gpu-check"
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": a.budget}
    parts = a.parts.split(",")
    for part in parts:
        t0 = time.time()
        try:
            if part == "machine":
                report[part] = machine()
            elif part == "ceilings":
                report[part] = ceilings()
            elif part == "ort_cuda":
                report[part] = ort_cuda(work, "cpu" if a.dry_cpu else "cuda")
            elif part == "full_size":
                report[part] = full_size(report.get("machine", {}).get("profile"), end)
            elif part == "ort_speed":
                report[part] = ort_speed(work, end, "cpu" if a.dry_cpu else "cuda", 2 if a.dry_cpu else None)
        except Exception:  # noqa: BLE001 -- one part failing must not lose the others
            report[part] = {"error": traceback.format_exc()[-1500:]}
        report.setdefault("seconds", {})[part] = round(time.time() - t0, 1)
        name = (report.get("machine") or {}).get("profile") or "unknown"
        (a.out / f"gpu_{name}.json").write_text(json.dumps(report, indent=1, default=str))
        print(f"== {part}: {report['seconds'][part]} s", json.dumps(report[part], default=str)[:1500], flush=True)


if __name__ == "__main__":
    main()
