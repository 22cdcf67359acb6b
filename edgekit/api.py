"""The Python API the CLI calls. Each function takes plain values and returns plain data."""

from __future__ import annotations

from pathlib import Path

from edgekit.errors import EdgekitError


def list_models() -> list[dict]:
    from edgekit.models import PRESETS, build, param_counts

    rows = []
    for name, cfg in PRESETS.items():
        counts = param_counts(build(cfg, device="meta"))
        rows.append({"name": name, "family": cfg.family, "params_total": counts["total"],
                     "params_unique": counts["unique"], "layers": cfg.n_layers, "d_model": cfg.d_model,
                     "context": cfg.max_seq_len})
    return rows


def model_info(target: str | Path) -> dict:
    from edgekit.models import build, param_counts
    from edgekit.resolve import resolve

    res = resolve(target)
    model = build(res.cfg, device="meta")
    counts = param_counts(model)
    breakdown = {"embedding": model.embed.weight.numel(),
                 "lm_head": 0 if model.lm_head is None else model.lm_head.weight.numel(),
                 "per_block": sum(p.numel() for p in model.blocks[0].parameters()),
                 "unique_blocks": len(model.blocks),
                 "gates": sum(p.numel() for n, p in model.named_parameters() if n.startswith("gates."))}
    return {"name": res.name, "kind": res.kind, "path": str(res.path or ""), "config": res.cfg.to_dict(),
            "params": counts, "breakdown": breakdown,
            **({"manifest": {k: v for k, v in res.manifest.items() if k != "files"}} if res.manifest else {})}


def generate(target: str | Path, prompt: str, max_new_tokens: int = 16, threshold: float | None = None,
             temperature: float = 0.0, top_k: int = 0, seed: int = 0, runtime: str | None = None,
             **runner_options) -> dict:
    from edgekit.generation import generate as run_generation
    from edgekit.tokenizer import ByteTokenizer
    from runtimes import open_runner

    if max_new_tokens < 1:
        raise EdgekitError("--max-new-tokens must be at least 1")
    tok = ByteTokenizer()
    runner = open_runner(target, runtime, **runner_options)
    if threshold is not None and not runner.spec.gated:
        raise EdgekitError(f"--threshold applies to R1 models; {runner.cfg.name} is {runner.cfg.family.upper()}")
    ids = tok.encode(prompt)
    if len(ids) + max_new_tokens > runner.cfg.max_seq_len:
        raise EdgekitError(f"prompt + new tokens ({len(ids) + max_new_tokens}) exceed the context "
                           f"({runner.cfg.max_seq_len})", "shorten the prompt or --max-new-tokens")
    with runner:
        g = run_generation(runner.stepper(threshold), ids, max_new_tokens, temperature, top_k, seed,
                           stop=tok.eos_id)
    return {"model": runner.cfg.name, "runtime": runner.name, "prompt": prompt, "text": tok.decode(g.tokens),
            "tokens": g.tokens, "layer_slots": g.layer_slots, "layer_runs": g.layer_runs, "skipped": g.skipped}
