"""bench/real_model.py's llama.cpp worker; runs inside .venv-llamacpp (see bench/requirements-llamacpp.txt).

    .venv-llamacpp/bin/python bench/peer_llamacpp.py MODEL.gguf 1,2

JSON lines on stdin/stdout (bench/real_model.py's `serve`). One llama_cpp.Llama per thread count (n_threads =
n_threads_batch = that count) for prefill/decode timing, and one with logits_all=True for perplexity: it
evaluates each window's token ids as given (no BOS added) and reads the logits of every position.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import serve, windows_nll  # noqa: E402  (stdlib + numpy only at import)

CTX = 512


def main() -> None:
    import llama_cpp

    path = sys.argv[1]
    threads = [int(x) for x in sys.argv[2].split(",")]
    t = time.perf_counter()
    llms = {n: llama_cpp.Llama(model_path=path, n_ctx=CTX, n_batch=CTX, n_ubatch=CTX, n_threads=n,
                               n_threads_batch=n, logits_all=False, verbose=False, seed=0)
            for n in threads}
    load = time.perf_counter() - t
    scorer = None

    def last_token(llm) -> int:
        # without logits_all, llama-cpp-python no longer copies logits into llm.scores: read the context's
        # output row (the batch's last token) in place
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))))

    def speed(threads, prompt, decode):
        llm = llms[threads]
        llm.reset()
        c, t = time.process_time(), time.perf_counter()
        llm.eval(prompt)
        res = {"prefill_s": time.perf_counter() - t, "prefill_cpu_s": time.process_time() - c}
        toks, steps = [last_token(llm)], []
        c = time.process_time()
        for _ in range(decode):
            t = time.perf_counter()
            llm.eval([toks[-1]])
            toks.append(last_token(llm))
            steps.append(time.perf_counter() - t)
        res.update(decode_step_s=steps, decode_cpu_s=time.process_time() - c, tokens=toks[:decode])
        return res

    def ppl(windows):
        nonlocal scorer
        n = max(len(w) for w in windows)
        if scorer is None:
            scorer = llama_cpp.Llama(model_path=path, n_ctx=max(CTX, n), n_batch=max(CTX, n), n_ubatch=max(CTX, n),
                                     n_threads=max(threads), n_threads_batch=max(threads), logits_all=True,
                                     verbose=False, seed=0)
        def logits_of(w):
            scorer.reset()
            scorer.eval(w)
            return np.array(scorer.scores[:len(w)], np.float32)

        return windows_nll(logits_of, windows)

    serve({"info": lambda: {"load_s": load, "versions": {"llama-cpp-python": llama_cpp.__version__}},
           "speed": speed, "ppl": ppl})


if __name__ == "__main__":
    main()
