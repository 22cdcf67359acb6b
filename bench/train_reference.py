"""Train the shipped reference checkpoints on the synthetic task suite (edgekit.tasks).

    python bench/train_reference.py --force              # the full recipe -> edgekit/checkpoints/{v3-ref,r1-ref}
    python bench/train_reference.py --steps 5 --out DIR  # a tiny run (tests)
    python bench/train_reference.py --teacher edgekit/checkpoints/v3-ref --force   # redo r1-ref only

1. v3-ref, the teacher: a small V3 trained with cross-entropy on the answer tokens (and EOS).
2. r1-ref, the student: R1 (6 layers over 3 shared blocks, gates on layers 1-4), started from the
   teacher's embedding, head and first three blocks, and distilled with the brief's loss,
   0.7 * MSE(student logits, teacher logits) + 0.3 * cross-entropy (both on the answer positions).
   After a warm-up at full depth (gates frozen) two gate terms ramp in: a compute penalty (the mean
   gate score of the gated layers over every real token) and a consistency term (the spread of the
   scores over each prompt). In train() mode R1's gates are per-token hard decisions with a
   straight-through gradient, so the penalty closes a gate where the task loss does not need the
   layer; at inference a call decides once, on the mean score of its tokens, so the prompt (the
   prefill call) is pulled towards one decision in training too.
3. The default skip threshold: R1 is decoded greedily on a validation sample (drawn like training,
   disjoint from the test split) at each threshold of a grid; default_threshold is the one that skips
   the most gated-layer executions while keeping validation accuracy within keep_points of the best
   threshold's. It is saved in r1-ref's config.json, and the whole sweep in its manifest.
4. Both checkpoints are decoded on the held-out test split through the torch runner, from the saved
   files, and the per-task/level accuracy (and R1's skip shares) go into each manifest.json.

Deterministic for a fixed --steps (seeded data and init, deterministic algorithms, one thread):
r1-ref trained from the saved v3-ref is the same as in one run. --budget-seconds stops on wall time
instead, so its step count depends on the machine. One thread by default: on a shared 2-core machine
two intra-op threads wait on each other and a step gets several times slower.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgekit import tasks  # noqa: E402
from edgekit.artifact import staging, write_manifest  # noqa: E402
from edgekit.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from edgekit.models import ModelConfig, build, param_counts  # noqa: E402
from edgekit.tokenizer import PAD, ByteTokenizer  # noqa: E402

SHIPPED = ROOT / "edgekit" / "checkpoints"

# Sequences are at most ~40 tokens: a 32-distance local window covers them, 8 log buckets the rest.
V3_REF = ModelConfig("v3", "v3-ref", d_model=128, n_layers=4, n_heads=8, d_ff=352, max_seq_len=128,
                     local_window=32, n_global_buckets=8, max_distance=128, memory_len=128)
R1_REF = ModelConfig("r1", "r1-ref", d_model=128, n_layers=6, n_heads=8, d_ff=352, max_seq_len=128,
                     local_window=32, n_global_buckets=8, max_distance=128, block_size=16,
                     n_unique_blocks=3, gated_layers=[1, 2, 3, 4], default_threshold=0.5)


@dataclasses.dataclass
class Recipe:
    seed: int = 0
    batch: int = 64
    v3_steps: int = 2500
    r1_steps: int = 1000
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    mse_weight: float = 0.7
    ce_weight: float = 0.3
    compute_weight: float = 0.2  # penalty on the mean gate score of the gated layers
    penalty_start: float = 0.3  # fraction of R1 steps at full depth (gates frozen) before the penalty ramps in
    init_from_teacher: bool = True  # student: embedding, head and blocks 0..2 start as the teacher's
    consistency_weight: float = 0.5  # on the spread of gate scores over each prompt
    train_threshold: float = 0.5  # the hard gate's threshold during training
    hard_weight: float = 2.0  # sampling weight of hard problems (easy and medium: 1)
    val_per_cell: int = 16
    thresholds: tuple[float, ...] = (0.0, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
    keep_points: float = 5.0  # default threshold: within this many accuracy points of the best (val SE ~3)


# ---------------------------------------------------------------------------------------------
# data


def batch_tensors(problems: list[tasks.Problem]) -> tuple[torch.Tensor, ...]:
    """-> input ids [B, T] (PAD after the end), targets [B, T] (-100 off the answer), and bool masks [B, T]:
    real tokens, and the prompt (what generation feeds in its first call, the prefill)."""
    seqs = [(p.prompt_ids(), p.answer_ids()) for p in problems]
    t = max(len(a) + len(b) for a, b in seqs) - 1
    ids = torch.full((len(seqs), t), PAD, dtype=torch.long)
    tgt = torch.full((len(seqs), t), -100, dtype=torch.long)
    real = torch.zeros((len(seqs), t), dtype=torch.bool)
    prefill = torch.zeros((len(seqs), t), dtype=torch.bool)
    for i, (prompt, answer) in enumerate(seqs):
        full = prompt + answer
        ids[i, : len(full) - 1] = torch.tensor(full[:-1])
        real[i, : len(full) - 1] = True
        prefill[i, : len(prompt)] = True
        # position j predicts full[j + 1]: the answer tokens are predicted from len(prompt) - 1 on
        tgt[i, len(prompt) - 1 : len(full) - 1] = torch.tensor(answer)
    return ids, tgt, real, prefill


def batches(recipe: Recipe, seed: int):
    """Each batch is one level (all tasks mixed): similar lengths, so little padding."""
    rng = random.Random(seed)
    weights = {"easy": 1.0, "medium": 1.0, "hard": recipe.hard_weight}
    streams = {lv: tasks.training_problems(seed * 10 + i, levels=(lv,)) for i, lv in enumerate(tasks.LEVELS)}
    while True:
        level = rng.choices(list(weights), list(weights.values()))[0]
        yield batch_tensors(list(itertools.islice(streams[level], recipe.batch)))


# ---------------------------------------------------------------------------------------------
# training


def optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.98))


def lr_at(step: int, total: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, total - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(model, loss_fn, total: int, recipe: Recipe, seed: int, deadline: float, tag: str) -> dict:
    """Run up to `total` steps (or until `deadline`); loss_fn(model, batch, step) -> (loss, logs)."""
    opt = optimizer(model, recipe)
    data = batches(recipe, seed)
    model.train()
    t0, c0, logs, step = time.perf_counter(), time.process_time(), {}, 0
    for step in range(total):
        if time.perf_counter() > deadline:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, recipe)
        loss, logs = loss_fn(model, next(data), step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == total - 1:
            shown = " ".join(f"{k} {v:.4f}" for k, v in logs.items())
            print(f"[{tag}] step {step:5d}  {shown}  {time.perf_counter() - t0:6.1f}s", flush=True)
    else:
        step = total
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - c0, 1), "threads": torch.get_num_threads(),
            "final": {k: round(v, 4) for k, v in logs.items()}}


def ce_loss(logits: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)


def teacher_loss(model, batch, step):
    ids, tgt, _, _ = batch
    logits, _, _ = model(ids)
    loss = ce_loss(logits, tgt)
    return loss, {"ce": loss.item()}


def student_loss_fn(teacher, recipe: Recipe, total: int):
    thresholds = torch.full((R1_REF.n_layers,), recipe.train_threshold)
    full_depth = torch.zeros(R1_REF.n_layers)  # a score (a sigmoid) is always > 0
    start = recipe.penalty_start * total
    ramp = max(1.0, 0.2 * total)

    def loss_fn(model, batch, step):
        ids, tgt, real, prefill = batch
        warm = step < start  # full depth, gates frozen: every block learns before any gate may close
        model.gates.requires_grad_(not warm)
        with torch.no_grad():
            t_logits, _, _ = teacher(ids)
        logits, _, _ = model(ids, None, full_depth if warm else thresholds)
        answer = tgt != -100
        mse = (logits[answer] - t_logits[answer]).pow(2).mean()
        ce = ce_loss(logits, tgt)
        scores = torch.stack(model.gate_scores)  # [G, B, T]
        compute = scores[:, real].mean()
        runs = (scores[:, real] > recipe.train_threshold).float().mean()
        # Inference decides once per call: the prompt's layers run or skip together (on the mean score).
        # Training decides per token, so pull each prompt's scores to their mean: then the two agree.
        m = prefill.to(scores.dtype)  # [B, T]
        mean = (scores * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)  # [G, B, 1]
        spread = ((scores - mean).pow(2) * m).sum() / (m.sum() * scores.shape[0])
        weight = recipe.compute_weight * min(1.0, max(0.0, (step - start) / ramp))
        loss = (recipe.mse_weight * mse + recipe.ce_weight * ce + weight * compute
                + (0.0 if warm else recipe.consistency_weight) * spread)
        return loss, {"mse": mse.item(), "ce": ce.item(), "gate": compute.item(), "ran": runs.item(),
                      "spread": spread.item()}

    return loss_fn


def init_student(student, teacher) -> None:
    """Start the student from the teacher (as DistilBERT does): embedding, final norm, LM head and
    teacher block b for each unique student block b. The gates keep their open initialisation."""
    own = student.state_dict()
    taken = {}
    for k, v in teacher.state_dict().items():
        if k.startswith("blocks.") and int(k.split(".")[1]) >= len(student.blocks):
            continue  # teacher block 3: the student has three unique blocks
        if k in own and own[k].shape == v.shape:
            taken[k] = v
    missing, _ = student.load_state_dict(taken, strict=False)
    assert all(k.startswith("gates.") for k in missing), missing


# ---------------------------------------------------------------------------------------------
# evaluation


def stepper(model, threshold: float | None = None):
    """A step over an in-memory model, as runtimes.torch does it (KV cache, thresholds for R1)."""
    gated = model.cfg.family == "r1"
    thr = torch.full((model.cfg.n_layers,), model.cfg.default_threshold if threshold is None else threshold)
    past = None

    def step(ids: list[int]):
        nonlocal past
        with torch.inference_mode():
            logits, past, executed = model(torch.tensor([ids]), past, thr if gated else None)
        return logits[0, -1].numpy(), executed.numpy() if gated else None

    return step


def pick_threshold(model, recipe: Recipe) -> tuple[float, list[dict]]:
    """Greedy-decode a validation sample at each threshold; keep the most skipping one within keep_points."""
    val = tasks.sample(tasks.training_problems(recipe.seed + 7919), recipe.val_per_cell)
    gated = model.cfg.gated_layers
    sweep = []
    for thr in recipe.thresholds:
        score = tasks.exact_match_accuracy(lambda thr=thr: stepper(model, thr), val)
        row = {"threshold": thr, "accuracy": round(score.accuracy(), 4),
               **{f"accuracy_{lv}": round(score.accuracy(level=lv), 4) for lv in tasks.LEVELS},
               "skipped": round(score.skipped(gated), 4),
               **{f"skipped_{lv}": round(score.skipped(gated, level=lv), 4) for lv in tasks.LEVELS}}
        print(f"[r1-ref] threshold {thr:.2f}: {row}", flush=True)
        sweep.append(row)
    best = max(r["accuracy"] for r in sweep)
    ok = [r for r in sweep if r["accuracy"] >= best - recipe.keep_points / 100]
    chosen = max(ok, key=lambda r: (r["skipped"], -r["threshold"]))
    return chosen["threshold"], sweep


def held_out(directory: Path, per_cell: int) -> dict:
    """Accuracy of a saved checkpoint on the test split, decoded through the torch runner."""
    from runtimes import open_runner

    with open_runner(directory, "torch") as runner:
        score = tasks.exact_match_accuracy(runner.stepper, tasks.test_split(per_cell))
    return score.to_dict(runner.cfg.gated_layers)


def save(model, out: Path, force: bool, per_cell: int, **fields) -> dict:
    with staging(out, force=force) as tmp:
        save_checkpoint(model, tmp)
        ByteTokenizer().save(tmp)
        loaded = load_checkpoint(tmp)  # the file, not the memory, is what ships
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
        t0 = time.perf_counter()
        acc = held_out(tmp, per_cell)
        print(f"[{model.cfg.name}] held-out ({per_cell}/cell, {time.perf_counter() - t0:.1f}s): "
              f"{json.dumps(acc['by_level'])}", flush=True)
        counts = param_counts(model)
        write_manifest(tmp, format="checkpoint", model=model.cfg.name, precision="fp32",
                       params=counts, heldout=acc, heldout_per_cell=per_cell, **fields)
    return acc


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=SHIPPED, help="directory for v3-ref/ and r1-ref/")
    ap.add_argument("--steps", type=int, help="training steps for each model (default: the recipe's)")
    ap.add_argument("--budget-seconds", type=float, help="wall-time budget for training both (40%% V3, 60%% R1)")
    ap.add_argument("--eval-per-cell", type=int, default=tasks.TEST_PER_CELL, help="held-out problems per cell")
    ap.add_argument("--val-per-cell", type=int, help="validation problems per cell for the threshold sweep")
    ap.add_argument("--batch", type=int, help="problems per training batch (default: the recipe's)")
    ap.add_argument("--thresholds", help="comma-separated threshold grid for the default-threshold sweep")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a recipe field, e.g. --set compute_weight=0.1 (recorded in the manifests)")
    ap.add_argument("--teacher", type=Path, help="distil from this v3 checkpoint instead of training one")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine two threads stall each other)")
    ap.add_argument("--force", action="store_true", help="replace existing checkpoints in --out")
    args = ap.parse_args(argv)

    recipe = Recipe()
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, v3_steps=args.steps, r1_steps=args.steps)
    if args.val_per_cell is not None:
        recipe = dataclasses.replace(recipe, val_per_cell=args.val_per_cell)
    if args.batch is not None:
        recipe = dataclasses.replace(recipe, batch=args.batch)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in {f.name for f in dataclasses.fields(Recipe)} or key == "thresholds":
            ap.error(f"--set: unknown recipe field '{key}'")
        recipe = dataclasses.replace(recipe, **{key: type(getattr(recipe, key))(json.loads(value))})
    if args.thresholds:
        recipe = dataclasses.replace(recipe, thresholds=tuple(float(t) for t in args.thresholds.split(",")))
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    try:
        return run(args, recipe)
    finally:  # leave the process as it was (the tests call main() in-process)
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def run(args: argparse.Namespace, recipe: Recipe) -> dict:
    budget = args.budget_seconds or math.inf
    t_start, c_start = time.perf_counter(), time.process_time()
    recipe_dict = {**dataclasses.asdict(recipe), "tasks": tasks.LENGTHS, "test_seed": tasks.TEST_SEED}

    if args.teacher:
        teacher = load_checkpoint(args.teacher)
        v3_log = {"loaded": str(args.teacher)}
    else:
        teacher = build(dataclasses.replace(V3_REF), seed=recipe.seed)
        v3_log = train(teacher, teacher_loss, recipe.v3_steps, recipe, recipe.seed + 1,
                       t_start + 0.4 * budget, "v3-ref")
        save(teacher, args.out / "v3-ref", args.force, args.eval_per_cell, recipe=recipe_dict,
             training=v3_log, objective="cross-entropy on answer tokens")
    teacher.eval().requires_grad_(False)

    student = build(dataclasses.replace(R1_REF, gated_layers=list(R1_REF.gated_layers)), seed=recipe.seed)
    if recipe.init_from_teacher:
        init_student(student, teacher)
    r1_log = train(student, student_loss_fn(teacher, recipe, recipe.r1_steps), recipe.r1_steps, recipe,
                   recipe.seed + 2, t_start + budget, "r1-ref")
    threshold, sweep = pick_threshold(student, recipe)
    student.cfg.default_threshold = threshold
    print(f"[r1-ref] default_threshold = {threshold}", flush=True)
    save(student, args.out / "r1-ref", args.force, args.eval_per_cell, recipe=recipe_dict, training=r1_log,
         teacher=teacher.cfg.name, threshold_sweep=sweep,
         student_init="embedding, final norm, LM head and blocks 0-2 from the teacher" if recipe.init_from_teacher
         else "random",
         objective=f"{recipe.mse_weight} * MSE(student logits, teacher logits) + {recipe.ce_weight} * "
                   f"cross-entropy (answer positions) + {recipe.compute_weight} * mean gate score (real tokens) + "
                   f"{recipe.consistency_weight} * spread of gate scores over each prompt (after warm-up)")
    total = round(time.perf_counter() - t_start, 1)
    cpu = round(time.process_time() - c_start, 1)
    print(f"done in {total}s wall, {cpu}s CPU -> {args.out}", flush=True)
    return {"seconds": total, "cpu_seconds": cpu, "v3": v3_log, "r1": r1_log, "threshold": threshold}


if __name__ == "__main__":
    main()
