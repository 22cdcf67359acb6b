"""The one runner lifecycle every engine shares (STYLE.md, Polygraphy):

    activate (the expensive part: load, build a session/engine) -> infer ... -> deactivate

The base class does the state and input checks; an engine fills in the *_impl methods. Feeds and
outputs are numpy arrays named as in exporters.spec.DecoderSpec, so any two runners can be compared
on identical seeded inputs. `stepper()` adds the KV-cache loop that generation and profiling use.
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.generation import Step
from edgekit.resolve import Resolved
from exporters.spec import DecoderSpec


class Runner:
    name = "base"

    def __init__(self, resolved: Resolved, **options):
        self.resolved = resolved
        self.cfg = resolved.cfg
        self.spec = DecoderSpec(self.cfg)
        self.options = options
        self.is_active = False

    # lifecycle ---------------------------------------------------------------------------------
    def activate(self) -> Runner:
        if self.is_active:
            raise EdgekitError(f"{self.name} runner is already active")
        self.activate_impl()
        self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # inference ---------------------------------------------------------------------------------
    def input_metadata(self) -> dict[str, tuple[str, tuple]]:
        """name -> (dtype, shape with symbolic axis names)."""
        axes = self.spec.dynamic_axes()
        cfg = self.cfg
        meta = {"input_ids": ("int64", ("batch", "seq"))}
        if self.spec.gated:
            meta["thresholds"] = ("float32", (cfg.n_layers,))
        for n in self.spec.past_names():
            meta[n] = ("float32", ("batch", cfg.n_heads, axes[n][2], cfg.head_dim))
        return meta

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.is_active:
            raise EdgekitError(f"{self.name} runner is not active", "use it as a context manager")
        expected = set(self.spec.input_names)
        missing, extra = sorted(expected - set(feeds)), sorted(set(feeds) - expected)
        if missing or extra:
            raise EdgekitError(f"{self.name}: wrong inputs: missing {missing[:4]}, unexpected {extra[:4]}")
        if feeds["input_ids"].ndim != 2:
            raise EdgekitError(f"input_ids must be [batch, seq], got shape {feeds['input_ids'].shape}")
        return self.infer_impl(feeds)

    def stepper(self, thresholds=None, batch: int = 1) -> Step:
        """A generation step with its own KV cache: first call prefill, later calls decode."""
        cache = self.spec.dummy(batch, 1, 0, thresholds=thresholds)
        del cache["input_ids"]

        def step(ids: list[int]):
            feeds = {**cache, "input_ids": np.asarray([ids] * batch, dtype=np.int64)}
            out = self.infer(feeds)
            for past, present in zip(self.spec.past_names(), self.spec.present_names()):
                cache[past] = out[present]
            return out["logits"][0, -1], out.get("executed")

        return step

    # to fill in ---------------------------------------------------------------------------------
    def activate_impl(self) -> None:
        raise NotImplementedError

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass
