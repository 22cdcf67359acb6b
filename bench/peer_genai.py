"""bench/real_model.py's ONNX Runtime GenAI worker; runs inside .venv-genai (see bench/requirements-genai.txt).

    .venv-genai/bin/python bench/peer_genai.py MODEL_DIR 1,2

JSON lines on stdin/stdout (bench/real_model.py's `serve`):
- speed: GenAI's own Generator API, greedy: append_tokens(prompt) is the prefill; each generate_next_token()
  after the first runs one decode step on the cache (the first only picks the token from the prefill's
  logits), so the decode step time is the median over calls 2..N+1.
- ppl: the Generator API returns only the last position's logits, so the perplexity windows run the builder's
  ONNX graph directly with onnxruntime (the same session library GenAI uses), fed as genai_config.json says:
  input_ids, attention_mask, an empty past_key_values.%d.key/value cache.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import OrtLM, serve, windows_nll  # noqa: E402  (stdlib + numpy only at import)


def main() -> None:
    import onnxruntime as ort
    import onnxruntime_genai as og

    model_dir = Path(sys.argv[1])
    threads = [int(x) for x in sys.argv[2].split(",")]
    cfg = json.loads((model_dir / "genai_config.json").read_text())
    dec = cfg["model"]["decoder"]
    if dec["inputs"].get("past_key_names") != "past_key_values.%d.key":
        raise SystemExit(f"unexpected GenAI I/O names: {dec['inputs']}")
    t = time.perf_counter()
    models = {}
    for n in threads:
        c = og.Config(str(model_dir))
        c.clear_providers()  # the CPU provider
        c.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": n,
                                                                          "inter_op_num_threads": 1}}}}))
        models[n] = og.Model(c)
    load = time.perf_counter() - t
    graph = OrtLM(model_dir / dec["filename"], max(threads), head_size=dec["head_size"])

    def speed(threads, prompt, decode):
        model = models[threads]
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + decode + 1)
        gen = og.Generator(model, params)
        c = time.process_time()
        t = time.perf_counter()
        gen.append_tokens(np.array([prompt], np.int32))
        res = {"prefill_s": time.perf_counter() - t, "prefill_cpu_s": time.process_time() - c}
        calls = []
        c = time.process_time()
        for _ in range(decode + 1):
            t = time.perf_counter()
            gen.generate_next_token()
            calls.append(time.perf_counter() - t)
        seq = list(gen.get_sequence(0))
        res.update(decode_step_s=calls[1:], decode_cpu_s=time.process_time() - c, first_call_s=calls[0],
                   tokens=[int(x) for x in seq[len(prompt):len(prompt) + decode]])
        return res

    def ppl(windows):
        return windows_nll(graph.window_logits, windows)

    import importlib.metadata as m

    versions = {p: m.version(p) for p in ("onnxruntime-genai", "onnxruntime")}
    serve({"info": lambda: {"load_s": load, "versions": versions, "ort": ort.__version__},
           "speed": speed, "ppl": ppl})


if __name__ == "__main__":
    main()
