"""What `edgekit serve` serves: one model (or a cascade of two) behind schedulers, with a tokenizer and metrics.

A target is an artifact / checkpoint / preset (edgekit.resolve), an installed bundle directory (its
signature and every file's hash checked by edgekit.bundle.read_installed) or a bundle file (verified and
installed into a private temporary directory by edgekit.bundle.install). Bundles need --public-key or
--allow-unsigned, as `edgekit run` does; their settings (runtime, threads, threshold) apply.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from edgekit.errors import EdgekitError
from edgekit.serve.metrics import Metrics
from edgekit.serve.scheduler import POLICIES, Scheduler


@dataclass
class Options:
    batching: str = "dynamic"
    max_batch: int = 8
    token_budget: int | None = None
    queue_limit: int = 64
    timeout: float | None = 60.0  # seconds per request; None: none
    max_tokens: int = 256  # the server's cap on a request's max_tokens
    threads: int | None = None
    threshold: float | None = None
    runtime: str | None = None
    public_key: str | Path | None = None
    allow_unsigned: bool = False
    drain_s: float = 10.0

    def check(self) -> None:
        if self.batching not in POLICIES:
            raise EdgekitError(f"unknown --batching {self.batching!r}", f"use one of {', '.join(POLICIES)}")
        for name, value, low in (("--max-batch", self.max_batch, 1), ("--queue-limit", self.queue_limit, 1),
                                 ("--max-tokens", self.max_tokens, 1), ("--token-budget", self.token_budget, 1)):
            if value is not None and value < low:
                raise EdgekitError(f"{name} must be at least {low}, got {value}", f"pass {name} {low} or more")
        if self.timeout is not None and not self.timeout > 0:
            raise EdgekitError(f"--timeout must be more than 0 seconds, got {self.timeout}", "pass --timeout 30")


@dataclass
class Model:
    name: str
    runner: object
    tokenizer: object
    scheduler: Scheduler
    source: str
    sha256: str | None = None


def _is_bundle_dir(path: Path) -> bool:
    from edgekit.bundle.format import BUNDLE_JSON

    return path.is_dir() and (path / BUNDLE_JSON).is_file()


def open_model(target: str | Path, options: Options, stack: contextlib.ExitStack) -> tuple[object, dict]:
    """A runner (not active) for `target`, and the settings that came with it (a bundle's)."""
    from edgekit import bundle
    from runtimes import open_runner

    path = Path(target)
    settings: dict = {}
    if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
        bundle.keys.require_key(path, options.public_key, options.allow_unsigned)
        dest = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgekit-serve-"))) / "bundle"
        r = bundle.install(path, dest, public_key=options.public_key, allow_unsigned=options.allow_unsigned)
        settings, path = r["settings"], dest
    elif _is_bundle_dir(path):
        settings = bundle.read_installed(path, options.public_key, options.allow_unsigned)["settings"]
    runner_options = {"threads": options.threads or settings.get("threads")}
    runner = open_runner(path if path.exists() else target, options.runtime or settings.get("runtime"),
                         **{k: v for k, v in runner_options.items() if v})
    return runner, settings


def model_hash(runner) -> str | None:
    files = (runner.resolved.manifest or {}).get("files") or {}
    model_file = runner.resolved.manifest.get("model_file", "model.onnx") if files else None
    entry = files.get(model_file) or files.get("model.safetensors") if files else None
    return entry.get("sha256") if entry else None


@dataclass
class Service:
    models: list[Model]
    metrics: Metrics
    options: Options
    policy: object = None
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def entry(self) -> Scheduler:
        return self.models[0].scheduler

    @property
    def tokenizer(self):
        return self.models[0].tokenizer

    @property
    def name(self) -> str:
        return self.models[0].name

    @property
    def context(self) -> int:
        return min(m.runner.cfg.max_seq_len for m in self.models)

    def start(self) -> Service:
        for m in self.models:
            m.scheduler.start()
        return self

    def drain(self, timeout: float | None = None) -> None:
        """Stop accepting; let admitted requests finish for `timeout` s, then end the rest with a final response."""
        t = self.options.drain_s if timeout is None else timeout
        for m in self.models:
            m.scheduler.drain(t)

    def close(self) -> None:
        self.drain(0.0)
        for m in self.models:
            m.scheduler.join(timeout=60)
        self.stack.close()

    def describe(self) -> dict:
        return {"models": [{"name": m.name, "source": m.source, "sha256": m.sha256, "runtime": m.runner.name}
                           for m in self.models],
                "batching": self.options.batching, "max_batch": self.options.max_batch,
                "queue_limit": self.options.queue_limit,
                "cascade": None if self.policy is None else {k: self.policy.data.get(k)
                                                             for k in ("signal", "threshold", "rate")}}


def open_service(target: str | Path, fallback: str | Path | None = None, policy: str | Path | None = None,
                 options: Options | None = None) -> Service:
    """Load, verify and activate the model(s); the schedulers are built but not started (Service.start)."""
    from edgekit.serve.cascade import check_models, read_policy

    options = options or Options()
    options.check()
    if (fallback is None) != (policy is None):
        raise EdgekitError("a cascade needs both --fallback and --policy",
                           "pass --fallback V3 --policy POLICY.json (from 'edgekit cascade calibrate'), or neither")
    pol = read_policy(policy) if policy is not None else None
    metrics = Metrics()
    svc = Service([], metrics, options, pol)
    try:
        for t in [target] + ([fallback] if fallback is not None else []):
            runner, settings = open_model(t, options, svc.stack)
            svc.stack.enter_context(runner)
            threshold = options.threshold if options.threshold is not None else settings.get("threshold")
            if threshold is not None and not runner.spec.gated:
                threshold = None
            tok = runner.resolved.tokenizer()
            sched = Scheduler(runner, options.batching, options.max_batch, options.token_budget,
                              options.queue_limit, threshold, eos=tok.eos_id, metrics=metrics)
            svc.models.append(Model(runner.cfg.name, runner, tok, sched, str(t), model_hash(runner)))
        if pol is not None:
            primary, fb = svc.models
            check_models(pol, primary.name, fb.name)
            if primary.tokenizer.vocab_size != fb.tokenizer.vocab_size if hasattr(primary.tokenizer, "vocab_size") \
                    else type(primary.tokenizer) is not type(fb.tokenizer):
                raise EdgekitError(f"{primary.name} and {fb.name} use different tokenizers",
                                   "a cascade needs two models with the same tokenizer")
            primary.scheduler.decide, primary.scheduler.fallback = pol.decide, fb.scheduler
            fb.scheduler.upstream = primary.scheduler
            primary.scheduler.solo_prefill = True  # the probe reads the request's own prefill gate flags
    except BaseException:
        svc.stack.close()
        raise
    return svc
