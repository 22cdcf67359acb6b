"""Issue 9 benchmark: edgekit vs optimum (optimum-cli + ONNX Runtime dynamic int8), side by side.

1. A tiny Qwen2 built in code (seeded random weights, safetensors + tokenizer.json):
   `optimum-cli export onnx --task text-generation-with-past` and `optimum-cli onnxruntime quantize
   --avx512_vnni` (optimum's documented dynamic-int8 path) vs `edgekit export --format onnx` and `--int8`.
   File size, ONNX Runtime CPU prefill latency and decode tokens/s (batch 1, 1 thread, all four graphs
   timed round-robin, medians; wall time and the thread's CPU time), fidelity vs transformers fp32
   (logit cosine, argmax agreement, greedy tokens identical).
2. A tiny DeepSeek-V3 with many routed experts (top-2): optimum's export (the TorchScript tracer,
   `torch.onnx.export(..., dynamo=False)`) bakes the routing of its dummy input and leaves out every
   expert that input did not reach; we count the experts present in its graph and measure its error on
   other inputs, next to edgekit's validated export (dense expert forward, every expert checked). The
   raw tracer on transformers 5.x's expert loop is shown too.

optimum pins transformers < 4.58, so it lives in its own venv (never in the project's .venv); this
script drives it in a subprocess and does everything else (edgekit, timing, fidelity) in the main venv:

    python3.11 -m venv .venv-optimum && .venv-optimum/bin/pip install -r bench/requirements-optimum.txt
    .venv/bin/python bench/optimum_compare.py [--work /tmp/edgekit-optimum] [--rounds 15] [--fresh]

Writes bench/results/optimum_compare.json and optimum_compare.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import OrtLM  # noqa: E402  (stdlib + numpy only at import)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CREATE = ("python3.11 -m venv .venv-optimum && .venv-optimum/bin/pip install -r bench/requirements-optimum.txt")

# tiny Qwen2: big enough that weights, not per-op overhead, are a visible part of a decode step
QWEN2 = dict(vocab_size=1024, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0, eos_token_id=1)
# tiny DeepSeek-V3: MLA + MoE, top-2, one shared expert (the tests' config; run with 64 and with 16 routed experts)
DSV3 = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            first_k_dense_replace=0, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=64,
            num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256, bos_token_id=0,
            eos_token_id=1)
WORDS = ["<s>", "</s>", "<unk>", *"the a edge kit model runs on every device fast small big int8 onnx graph".split()]
PROMPT, DECODE = 64, 32  # timing: prefill tokens, decode steps
FID_PREFIX, FID_LEN, FID_SEEDS = 32, 48, 4  # fidelity: prefill 32 then decode 16 teacher-forced tokens, 4 inputs
GREEDY_PROMPTS, GREEDY_NEW = 4, 32


def die(msg: str, code: int = 2):
    print(msg, file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------- optimum venv

def optimum_env(venv: Path) -> dict:
    """Versions in the optimum venv, or exit with one line saying how to create it."""
    py = venv / "bin" / "python"
    if not py.is_file() or not (venv / "bin" / "optimum-cli").is_file():
        die(f"optimum venv not found at {venv}: create it with `{CREATE}` (then rerun)")
    code = ("import json, importlib.metadata as m; import optimum.exporters.onnx, onnxruntime; "
            "print(json.dumps({p: m.version(p) for p in ('optimum', 'optimum-onnx', 'transformers', 'torch', "
            "'onnxruntime', 'onnx', 'tokenizers')}))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        die(f"optimum venv at {venv} is broken ({last}): recreate it with `rm -rf {venv} && {CREATE}`")
    return json.loads(r.stdout.strip().splitlines()[-1])


def optimum_cli(venv: Path, args: list[str], log: Path) -> dict:
    """Run optimum-cli offline; keep its output in `log` and the lines that matter in the result."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore"}
    t = time.time()
    r = subprocess.run([str(venv / "bin" / "optimum-cli"), *args], capture_output=True, text=True, env=env)
    text = r.stdout + r.stderr
    log.write_text(text)
    keys = ("max diff", "atol", "validat", "error", "warn", "exceed", "success", "saved", "exception")
    lines = [ln.strip() for ln in text.splitlines() if any(k in ln.lower() for k in keys)
             and "Location 'file" not in ln and "TracerWarning" not in ln]
    return {"command": "optimum-cli " + " ".join(args), "returncode": r.returncode,
            "seconds": round(time.time() - t, 1), "notable_output": lines[-25:], "log": str(log)}


# ---------------------------------------------------------------- models

def tokenizer_json(d: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(d / "tokenizer.json"))


def build_hf(d: Path, arch: str, n_experts: int = 64) -> Path:
    """Seeded random model saved as a Hugging Face directory (as tests/edgekit/test_hf.py builds them)."""
    import torch
    import transformers

    if (d / "model.safetensors").is_file():
        return d
    torch.manual_seed({"qwen2": 0, "deepseek_v3": 2}[arch])
    cfg = (transformers.Qwen2Config(**QWEN2) if arch == "qwen2" else
           transformers.DeepseekV3Config(**{**DSV3, "n_routed_experts": n_experts}))
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger than the init's std 0.02, so logits are not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.save_pretrained(d, safe_serialization=True)
    tokenizer_json(d)
    return d


def reference(d: Path):
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, use_safetensors=True,
                                                             attn_implementation="eager").eval()


def edgekit_export(d: Path, out: Path, int8: bool = False) -> dict:
    from edgekit import api

    t = time.time()
    reused = (out / "manifest.json").is_file()
    if not reused:
        api.export(d, "onnx", out, int8=int8, force=True)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"seconds": None if reused else round(time.time() - t, 1), "reused": reused,
            "command": f"edgekit export {d} --format onnx{' --int8' if int8 else ''} --out {out}",
            "validation": manifest.get("validation"), "dir": str(out)}


def onnx_file(d: Path) -> Path:
    files = sorted(d.glob("*.onnx"))
    if len(files) != 1:
        raise SystemExit(f"expected one .onnx file in {d}, found {[f.name for f in files]}")
    return files[0]


def model_bytes(path: Path) -> int:
    """The .onnx file plus the external data files it references."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    proto = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in _get_all_tensors(proto) for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def node_counts(path: Path) -> dict:
    """Nodes in the file, and after ONNX Runtime's CPU graph optimizations (what a decode step executes)."""
    import tempfile

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # not the "hardware specific optimizations" warning: the file is only counted
    with tempfile.TemporaryDirectory() as t:
        so.optimized_model_filepath = str(Path(t) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        optimized = len(onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node)
    return {"file": len(onnx.load(str(path), load_external_data=False).graph.node), "after_ort_optimization": optimized}


# ---------------------------------------------------------------- ONNX Runtime, each graph through its own I/O
# (real_model.OrtLM: one runner for edgekit's, optimum's and ORT-GenAI's decoder graphs)

def timing(lm: OrtLM, vocab: int) -> dict:
    """Prefill of PROMPT tokens, then the median decode step on that cache, batch 1: wall seconds and the
    calling thread's CPU seconds (with 1 intra-op thread ONNX Runtime computes on the calling thread, so CPU
    time is the work done, and wall - CPU is time spent descheduled by other jobs on a shared machine)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(2, vocab, (1, PROMPT + DECODE), dtype=np.int64)
    t, c = time.perf_counter(), time.thread_time()
    _, cache = lm.run(ids[:, :PROMPT], lm.empty())
    out = {"prefill": time.perf_counter() - t, "prefill_cpu": time.thread_time() - c}
    wall, cpu = [], []
    for i in range(PROMPT, PROMPT + DECODE):
        t, c = time.perf_counter(), time.thread_time()
        _, cache = lm.run(ids[:, i:i + 1], cache)
        wall.append(time.perf_counter() - t)
        cpu.append(time.thread_time() - c)
    out.update(decode=float(np.median(wall)), decode_cpu=float(np.median(cpu)))
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)


def ref_logits(ref, seq: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref(torch.from_numpy(seq[None])).logits[0].float().numpy()


def ref_greedy(ref, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding (KV cache, no EOS stop: random weights emit EOS anywhere)."""
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, eos_token_id=None, pad_token_id=None)
    return out[0, len(prompt):].tolist()


def fidelity(ref, lm: OrtLM, vocab: int, greedy_ref: list[list[int]], prompts: list[list[int]]) -> dict:
    cos, agree, worst = [], [], 0.0
    for s in range(FID_SEEDS):
        seq = np.random.default_rng(1000 + s).integers(2, vocab, FID_LEN, dtype=np.int64)
        want, got = ref_logits(ref, seq), lm.teacher_forced(seq, FID_PREFIX)
        cos.append(cosine_rows(want, got))
        agree.append(want.argmax(-1) == got.argmax(-1))
        worst = max(worst, float(np.abs(want.astype(np.float64) - got).max()))
    cos, agree = np.concatenate(cos), np.concatenate(agree)
    greedy = [lm.greedy(p, GREEDY_NEW) for p in prompts]
    first_diff = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), None) for g, r in zip(greedy, greedy_ref)]
    return {"logit_cosine_mean": float(cos.mean()), "logit_cosine_min": float(cos.min()),
            "argmax_agreement": float(agree.mean()), "max_abs_diff": worst, "positions": int(cos.size),
            "greedy_identical": sum(d is None for d in first_diff), "greedy_sequences": len(prompts),
            "greedy_first_divergence": first_diff}


# ---------------------------------------------------------------- DeepSeek-V3: which experts a graph kept

def expert_weights(d: Path) -> dict:
    """(layer, expert) -> [gate, up, down] weight arrays, and the shared experts' (a check of the matcher)."""
    from safetensors.numpy import load_file

    w = load_file(str(d / "model.safetensors"))
    out = {}
    for name, arr in w.items():
        parts = name.split(".")
        if ".mlp.experts." in name and name.endswith("_proj.weight"):
            out.setdefault((int(parts[2]), int(parts[5])), []).append(arr)
        elif ".mlp.shared_experts." in name and name.endswith("_proj.weight"):
            out.setdefault((int(parts[2]), "shared"), []).append(arr)
    return out


def experts_in_graph(path: Path, experts: dict, n: int) -> dict:
    """An expert counts as present when each of its weight matrices is an initializer of the graph (as is or
    transposed; exact bytes). A traced graph has no tensor at all for an expert its dummy input never reached."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    seen = set()

    def add(a):
        seen.add(hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest())

    def parts(m):  # the matrix, and its halves along each axis (a fused gate|up matrix)
        yield m
        for axis in (0, 1):
            if m.shape[axis] % 2 == 0:
                yield from np.split(m, 2, axis=axis)

    graphs = [proto.graph, *(a.g for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)]
    for g in graphs:
        for t in g.initializer:
            arr = numpy_helper.to_array(t)
            if arr.dtype != np.float32 or arr.ndim not in (2, 3):
                continue
            for m in (arr if arr.ndim == 3 else [arr]):  # stacked experts [E, in, out]: per slice
                for part in parts(m):
                    add(part)
                    add(part.T)

    def present(mats):
        return all(hashlib.sha1(np.ascontiguousarray(m).tobytes()).hexdigest() in seen or
                   hashlib.sha1(np.ascontiguousarray(m.T).tobytes()).hexdigest() in seen for m in mats)

    layers = sorted({k[0] for k in experts})
    kept = {layer: sorted(e for (lay, e), mats in experts.items() if lay == layer and e != "shared" and present(mats))
            for layer in layers}
    return {"routed_experts_per_layer": n, "kept_per_layer": {str(k): len(v) for k, v in kept.items()},
            "dropped": {str(k): sorted(set(range(n)) - set(v)) for k, v in kept.items()},
            "shared_expert_found": all(present(experts[(layer, "shared")]) for layer in layers),
            "_kept": kept}


def routing(ref, seq: np.ndarray) -> list[np.ndarray]:
    """Per MoE layer, the experts transformers routes each token to ([S, top_k])."""
    import torch

    got = []
    hooks = [layer.mlp.experts.register_forward_pre_hook(lambda _m, args: got.append(args[1].clone()))
             for layer in ref.model.layers if hasattr(layer.mlp, "experts")]
    try:
        with torch.no_grad():
            ref(torch.from_numpy(seq[None]))
    finally:
        for h in hooks:
            h.remove()
    return [g.reshape(len(seq), -1).numpy() for g in got]


def moe_error(ref, run_logits, kept: dict | None, n_inputs: int = 8, length: int = 32) -> dict:
    """Logit error on seeded inputs other than any dummy; with `kept` (experts in the graph), split by
    position: before vs from the first token that transformers routes to a missing expert (attention
    carries the error to every later position)."""
    before, after, cos, agree, worst, hit_tokens, failed = [], [], [], [], 0.0, 0, []
    for s in range(n_inputs):
        seq = np.random.default_rng(500 + s).integers(2, DSV3["vocab_size"], length, dtype=np.int64)
        want = ref_logits(ref, seq)
        try:
            got = run_logits(seq)
        except Exception as e:  # a traced graph may index past what it baked
            failed.append(f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
            continue
        diff = np.abs(want.astype(np.float64) - got).max(-1)
        worst = max(worst, float(diff.max()))
        cos.append(cosine_rows(want, got))
        agree.append(want.argmax(-1) == got.argmax(-1))
        if kept is not None:
            miss = np.zeros(length, bool)
            for layer, idx in enumerate(routing(ref, seq)):
                miss |= ~np.isin(idx, kept[layer]).all(-1)
            hit_tokens += int(miss.sum())
            first = int(miss.argmax()) if miss.any() else length
            before.append(diff[:first])
            after.append(diff[first:])
    out = {"inputs": n_inputs, "tokens_per_input": length, "inputs_failed": len(failed)}
    if failed:
        out["first_failure"] = failed[0]
    if not cos:
        return out
    cos, agree = np.concatenate(cos), np.concatenate(agree)
    out.update(max_abs_diff=worst, logit_cosine_mean=float(cos.mean()), logit_cosine_min=float(cos.min()),
               argmax_agreement=float(agree.mean()))
    if kept is not None:
        b, a = np.concatenate(before), np.concatenate(after)
        out.update(tokens_routed_to_a_missing_expert=hit_tokens,
                   positions_before_first_missing_expert=int(b.size),
                   max_abs_diff_before=float(b.max()) if b.size else None,
                   positions_from_first_missing_expert=int(a.size),
                   max_abs_diff_from=float(a.max()) if a.size else None)
    return out


def raw_tracer_export(d: Path, path: Path, dummy_len: int = 8) -> dict:
    """torch.onnx.export(..., dynamo=False) of transformers 5.x's DeepSeek-V3 (logits only, no cache), with its
    eager expert loop (the default grouped_mm path uses torch.histc, which this exporter cannot export)."""
    import torch
    import transformers

    ref = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, use_safetensors=True,
                                                            attn_implementation="eager",
                                                            experts_implementation="eager").eval()

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            # an explicit mask: without one transformers looks for packed sequences with torch.diff,
            # which the TorchScript exporter cannot export
            return self.m(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits

    dummy = torch.from_numpy(np.random.default_rng(42).integers(2, DSV3["vocab_size"], (1, dummy_len), dtype=np.int64))
    hit = [np.unique(r).size for r in routing(ref, dummy[0].numpy())]
    t = time.time()
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Logits(ref), (dummy,), str(path), dynamo=False, opset_version=17,
                              input_names=["input_ids"], output_names=["logits"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})
    except Exception as e:
        return {"exported": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    return {"exported": True, "seconds": round(time.time() - t, 1), "dummy_input_shape": [1, dummy_len],
            "experts_hit_by_dummy_per_layer": hit}


def moe_section(w: Path, n: int, venv: Path) -> dict:
    """Tiny DeepSeek-V3 with n routed experts: edgekit's export, optimum's, the raw TorchScript tracer's;
    experts present in each graph and the logit error on inputs other than the export's dummy."""
    import onnxruntime as ort

    print(f"deepseek_v3 with {n} experts: exports ...", flush=True)
    ddir = build_hf(w / f"dsv3-{n}", "deepseek_v3", n)
    ds = {"edgekit": edgekit_export(ddir, w / f"edgekit-dsv3-{n}-fp32")}
    opt_ds = w / f"optimum-dsv3-{n}-fp32"
    if not list(opt_ds.glob("*.onnx")):
        ds["optimum"] = optimum_cli(venv, ["export", "onnx", "--model", str(ddir), "--task",
                                    "text-generation-with-past", str(opt_ds)], w / f"optimum-dsv3-{n}-fp32.log")
    else:
        ds["optimum"] = {"note": f"reused {opt_ds}"}
    raw_path = w / f"tracer-dsv3-{n}" / "model.onnx"
    raw_path.parent.mkdir(exist_ok=True)
    ds["raw_tracer"] = raw_tracer_export(ddir, raw_path)

    ref = reference(ddir)
    experts = expert_weights(ddir)
    print(f"deepseek_v3 with {n} experts: experts in each graph, error on other inputs ...", flush=True)
    prompts = [[0, *np.random.default_rng(80 + i).integers(2, DSV3["vocab_size"], 6).tolist()] for i in range(4)]
    greedy_ref = [ref_greedy(ref, p, GREEDY_NEW) for p in prompts]

    def greedy_identical(lm):
        try:
            return sum(lm.greedy(p, GREEDY_NEW) == g for p, g in zip(prompts, greedy_ref))
        except Exception as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"

    edge = OrtLM(onnx_file(w / f"edgekit-dsv3-{n}-fp32"))
    found = experts_in_graph(edge.path, experts, n)
    ds["edgekit"].update(experts_in_graph={k: v for k, v in found.items() if k != "_kept"},
                         error_on_other_inputs=moe_error(ref, lambda s: edge.teacher_forced(s, len(s)), found["_kept"]),
                         greedy_identical=greedy_identical(edge), greedy_sequences=len(prompts))
    if list(opt_ds.glob("*.onnx")):
        opt = OrtLM(onnx_file(opt_ds))
        found = experts_in_graph(opt.path, experts, n)
        ds["optimum"].update(experts_in_graph={k: v for k, v in found.items() if k != "_kept"}, io=opt.io_names(),
                             error_on_other_inputs=moe_error(ref, lambda s: opt.teacher_forced(s, len(s)),
                                                             found["_kept"]),
                             greedy_identical=greedy_identical(opt), greedy_sequences=len(prompts))
    if ds["raw_tracer"]["exported"]:
        so = ort.SessionOptions()
        so.log_severity_level = 4  # its failures are reported below, not logged in red
        sess = ort.InferenceSession(str(raw_path), so, providers=["CPUExecutionProvider"])

        def run(seq):
            return sess.run(["logits"], {"input_ids": seq[None]})[0][0]

        ds["raw_tracer"]["experts_in_graph"] = ("all weights (the stacked [E, ...] tensors); the loop over hit "
                                                "experts is unrolled to the dummy's count, and indexes them")
        ds["raw_tracer"]["error_on_other_inputs"] = moe_error(ref, run, None)
        ds["raw_tracer"]["error_on_inputs_of_its_dummy_shape"] = moe_error(
            ref, run, None, length=ds["raw_tracer"]["dummy_input_shape"][1])
    return ds


# ---------------------------------------------------------------- main

def versions_main() -> dict:
    import importlib.metadata as m

    out = {p: m.version(p) for p in ("torch", "transformers", "onnxruntime", "onnx", "onnxscript", "numpy")}
    try:
        out["edgekit_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                               text=True).stdout.strip()
    except OSError:
        pass
    return out


def cpu_name() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-optimum"))
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--optimum-venv", type=Path, default=ROOT / ".venv-optimum")
    ap.add_argument("--fresh", action="store_true", help="delete --work first (re-export everything)")
    args = ap.parse_args()
    opt_versions = optimum_env(args.optimum_venv)
    os.environ.setdefault("EDGEKIT_QUIET", "1")
    sys.path.insert(0, str(ROOT))
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    t_start = time.time()

    import torch

    torch.set_num_threads(1)
    result = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
              "versions": {"main_venv": versions_main(), "optimum_venv": opt_versions},
              "settings": {"threads": 1, "batch": 1, "prompt_tokens": PROMPT, "decode_steps": DECODE,
                           "rounds": args.rounds, "fidelity": f"{FID_SEEDS} seeded sequences of {FID_LEN} tokens: "
                           f"prefill {FID_PREFIX}, then {FID_LEN - FID_PREFIX} decode steps on the graph's own cache",
                           "greedy": f"{GREEDY_PROMPTS} prompts x {GREEDY_NEW} new tokens vs transformers generate"},
              "models": {"qwen2": QWEN2, "deepseek_v3": DSV3}}

    # ---- Qwen2: four graphs
    qdir = build_hf(w / "qwen2", "qwen2")
    print("exporting qwen2 (edgekit fp32, int8; optimum fp32, int8) ...", flush=True)
    exports = {"edgekit fp32": edgekit_export(qdir, w / "edgekit-qwen2-fp32"),
               "edgekit int8": edgekit_export(qdir, w / "edgekit-qwen2-int8", int8=True)}
    opt_fp32, opt_int8 = w / "optimum-qwen2-fp32", w / "optimum-qwen2-int8"
    for name, d in (("optimum fp32", opt_fp32), ("optimum int8", opt_int8)):
        exports[name] = {"reused": str(d)}
    if not list(opt_fp32.glob("*.onnx")):
        exports["optimum fp32"] = optimum_cli(args.optimum_venv, ["export", "onnx", "--model", str(qdir), "--task",
                                              "text-generation-with-past", str(opt_fp32)], w / "optimum-qwen2-fp32.log")
        if exports["optimum fp32"]["returncode"]:
            die(f"optimum-cli export of qwen2 failed, see {w / 'optimum-qwen2-fp32.log'}")
    if not list(opt_int8.glob("*.onnx")):
        exports["optimum int8"] = optimum_cli(args.optimum_venv, ["onnxruntime", "quantize", "--onnx_model",
                                              str(opt_fp32), "--avx512_vnni", "-o", str(opt_int8)],
                                              w / "optimum-qwen2-int8.log")
        if exports["optimum int8"]["returncode"]:
            die(f"optimum-cli onnxruntime quantize failed, see {w / 'optimum-qwen2-int8.log'}")
    paths = {"edgekit fp32": onnx_file(w / "edgekit-qwen2-fp32"), "edgekit int8": onnx_file(w / "edgekit-qwen2-int8"),
             "optimum fp32": onnx_file(opt_fp32), "optimum int8": onnx_file(opt_int8)}
    lms = {k: OrtLM(p) for k, p in paths.items()}
    q = {"exports": exports, "files": {k: str(p) for k, p in paths.items()},
         "io": {k: lm.io_names() for k, lm in lms.items()},
         "size_bytes": {k: model_bytes(p) for k, p in paths.items()},
         "graph_nodes": {k: node_counts(p) for k, p in paths.items()}}

    print("fidelity vs transformers fp32 ...", flush=True)
    ref = reference(qdir)
    prompts = [[0, *np.random.default_rng(70 + i).integers(2, QWEN2["vocab_size"], 6 + 2 * i).tolist()]
               for i in range(GREEDY_PROMPTS)]
    greedy_ref = [ref_greedy(ref, p, GREEDY_NEW) for p in prompts]
    q["fidelity_vs_transformers_fp32"] = {k: fidelity(ref, lm, QWEN2["vocab_size"], greedy_ref, prompts)
                                         for k, lm in lms.items()}

    print(f"timing, {args.rounds} rounds round-robin ...", flush=True)
    samples = {k: {"prefill": [], "prefill_cpu": [], "decode": [], "decode_cpu": []} for k in lms}
    for lm in lms.values():  # warm-up
        timing(lm, QWEN2["vocab_size"])
    for _ in range(args.rounds):
        for k, lm in lms.items():
            for m, v in timing(lm, QWEN2["vocab_size"]).items():
                samples[k][m].append(v)
    lat = {}
    for k, v in samples.items():
        med = {m: float(np.median(x)) for m, x in v.items()}
        lat[k] = {"prefill_ms": 1e3 * med["prefill"], "prefill_cpu_ms": 1e3 * med["prefill_cpu"],
                  "prefill_ms_spread": [1e3 * min(v["prefill"]), 1e3 * max(v["prefill"])],
                  "decode_ms": 1e3 * med["decode"], "decode_cpu_ms": 1e3 * med["decode_cpu"],
                  "decode_ms_spread": [1e3 * min(v["decode"]), 1e3 * max(v["decode"])],
                  "decode_tokens_per_s": 1 / med["decode"], "decode_tokens_per_cpu_s": 1 / med["decode_cpu"]}
    q["latency"] = lat
    q["samples_s"] = samples
    size = q["size_bytes"]
    def ratio(prec, m):
        return round(lat[f"edgekit {prec}"][m] / lat[f"optimum {prec}"][m], 3)

    q["ratios_edgekit_over_optimum"] = {
        prec: {"size": round(size[f"edgekit {prec}"] / size[f"optimum {prec}"], 3),
               "decode_tokens_per_s": ratio(prec, "decode_tokens_per_s"),
               "decode_tokens_per_cpu_s": ratio(prec, "decode_tokens_per_cpu_s"),
               "prefill_latency": ratio(prec, "prefill_ms"), "prefill_cpu": ratio(prec, "prefill_cpu_ms")}
        for prec in ("fp32", "int8")}
    q["int8_over_fp32"] = {t: {"size": round(size[f"{t} int8"] / size[f"{t} fp32"], 3),
                               "decode_speedup": round(lat[f"{t} fp32"]["decode_ms"] /
                                                       lat[f"{t} int8"]["decode_ms"], 3),
                               "decode_speedup_cpu": round(lat[f"{t} fp32"]["decode_cpu_ms"] /
                                                           lat[f"{t} int8"]["decode_cpu_ms"], 3)}
                           for t in ("edgekit", "optimum")}
    result["qwen2"] = q
    del lms

    # ---- DeepSeek-V3, top-2: many experts (64), and the tests' 16
    result["deepseek_v3"] = {f"{n}_experts": moe_section(w, n, args.optimum_venv) for n in (64, 16)}

    result["load_average"] = {"start": [round(x, 2) for x in load_start],
                              "end": [round(x, 2) for x in os.getloadavg()]}
    result["wall_seconds"] = round(time.time() - t_start, 1)
    out = HERE / "results" / "optimum_compare.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, HERE / "results" / "optimum_compare.png")
    summary = {"ratios_edgekit_over_optimum": q["ratios_edgekit_over_optimum"], "int8_over_fp32": q["int8_over_fp32"],
               "dsv3_optimum_kept": {k: v.get("optimum", {}).get("experts_in_graph", {}).get("kept_per_layer")
                                     for k, v in result["deepseek_v3"].items()},
               "load_average": result["load_average"]}
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = result["qwen2"]
    keys = ["optimum fp32", "edgekit fp32", "optimum int8", "edgekit int8"]
    colors = ["C1", "C0", "C1", "C0"]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    lat = q["latency"]
    panels = [(lambda k: q["size_bytes"][k] / 1e6, None, "file size (MB)"),
              (lambda k: lat[k]["decode_tokens_per_cpu_s"], lambda k: lat[k]["decode_tokens_per_s"],
               "decode tokens/s (batch 1, 1 thread)\nbars: per CPU second, dots: per wall second"),
              (lambda k: lat[k]["prefill_cpu_ms"], lambda k: lat[k]["prefill_ms"],
               f"prefill {PROMPT} tokens (ms)\nbars: CPU time, dots: wall time")]
    for ax, (f, g, title) in zip(axes, panels):
        ax.bar(range(4), [f(k) for k in keys], color=colors)
        if g:
            ax.plot(range(4), [g(k) for k in keys], "ko", ms=5)
        ax.set_xticks(range(4), [k.replace(" ", "\n") for k in keys])
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("tiny Qwen2, ONNX Runtime CPU")
    ax = axes[3]
    for j, n in enumerate(("16", "64")):
        ds = result["deepseek_v3"][f"{n}_experts"]
        for i, (name, color) in enumerate((("optimum", "C1"), ("edgekit", "C0"))):
            err = ds.get(name, {}).get("error_on_other_inputs") or {}
            ax.bar(3 * j + i, 100 * err.get("argmax_agreement", 0), color=color, label=name if j == 0 else None)
    ax.set_xticks([0.5, 3.5], ["16 experts", "64 experts"])
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.legend(loc="upper center", ncol=2, fontsize=8)
    ax.set_title("DeepSeek-V3 top-2: argmax agreement with\ntransformers on other inputs (%)", fontsize=10)
    raw = result["deepseek_v3"]["64_experts"]["raw_tracer"].get("error_on_other_inputs")
    if raw:
        ax.set_xlabel(f"raw TorchScript tracer (64 experts): run-time error on {raw['inputs_failed']}/"
                      f"{raw['inputs']} inputs", fontsize=8, color="C3")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
