"""The scheduler: one model thread doing continuous batching over one runner.

Requests wait in a bounded list (`submit` raises QueueFull beyond `queue_limit`: HTTP 429 with
Retry-After). Between decode steps the model thread lets waiting requests join and finished rows leave
(edgekit.serve.batch). Two policies:

    dynamic   the oldest waiting request anchors the pick; the other waiting requests join in order of
              how close their prompt length is to the anchor's, while the batch stays within `max_batch`
              rows and `token_budget` (rows x padded cache length after the joiners' prefill); rows join
              a running batch at every step
    fixed     static batching, as generate() on a batch does it: arrival order, up to `max_batch` requests;
              the batch runs to completion before the next starts, a finished row keeping its slot (fed
              its last token, outputs dropped) until the batch's longest request is done

A graph without an attention mask cannot hide padding, so then only prompts of the running length join
(equal-length batches; the test and the bench say which graphs they use).

Every request ends exactly once, with `finish_reason` "stop" (EOS or a stop string), "length"
(max_tokens or the context), "timeout", "cancelled" (client gone) or "shutdown" (drain deadline passed),
through its `sink(event)` callable: ("token", id) for each token unless held, then ("done", reason).
`step()` is one scheduling iteration, so tests drive the scheduler without a thread.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edgekit.serve.batch import Batch
from edgekit.serve.sampling import Confidence, choose, observe

POLICIES = ("dynamic", "fixed")
_ids = itertools.count(1)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


@dataclass(eq=False)
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: Callable[[list[int]], int | None] | None = None  # tokens -> how many to keep when a stop string hit
    timeout: float | None = None  # seconds from submission
    sink: Callable[[tuple], None] | None = None
    hold: bool = False  # tokens are not streamed until the request finishes (a cascade deciding at the end)
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    confidence: Confidence = field(default_factory=Confidence)
    model: str | None = None  # which model answered
    score: float | None = None  # the cascade's confidence score (edgekit.serve.cascade), once decided
    step: int = 0  # the scheduler's decode-step count when it was queued
    cancelled: bool = False
    submitted: float = 0.0
    deadline: float = math.inf
    last: int = -1
    rng: np.random.Generator | None = None

    def emit(self, event: tuple) -> None:
        if self.sink is not None:
            self.sink(event)

    def reset(self) -> None:
        """Back to a fresh request (a cascade hands it to the fallback model)."""
        self.tokens, self.finish_reason, self.confidence, self.last = [], None, Confidence(), -1
        self.rng = None


class Scheduler:
    def __init__(self, runner, policy: str = "dynamic", max_batch: int = 8, token_budget: int | None = None,
                 queue_limit: int = 64, thresholds=None, eos: int | None = None, metrics=None,
                 decide: Callable[[Request, str], bool] | None = None, name: str | None = None,
                 clock: Callable[[], float] = time.monotonic, solo_prefill: bool = False):
        if policy not in POLICIES:
            raise ValueError(f"unknown batching policy {policy!r}")
        self.runner, self.policy, self.max_batch = runner, policy, max_batch
        self.context = runner.cfg.max_seq_len
        self.token_budget = token_budget or max_batch * self.context
        self.queue_limit, self.eos, self.metrics, self.clock = queue_limit, eos, metrics, clock
        self.name = name or runner.cfg.name
        self.decide = decide  # (request, "first" | "end") -> True: hand it to the fallback (edgekit.serve.cascade)
        # prefill each joining request in its own call: R1's gate flags of the prefill are then that request's
        # own (a cascade routes on them), not those of whichever requests joined with it
        self.solo_prefill = solo_prefill
        # dynamic: rows join a running batch once `join_rows` slots are free or the oldest waiting request has
        # waited `join_wait` decode steps (fewer prefill calls interrupting the running rows)
        self.join_rows, self.join_wait, self.steps = max(1, max_batch // 4), 4, 0
        self.fallback: Scheduler | None = None
        self.upstream: Scheduler | None = None  # a cascade's primary, which hands requests over to this one
        self.stopped = False
        self.batch = Batch(runner, thresholds)
        gated = getattr(runner.cfg, "gated_layers", None) or []
        self.gated = list(gated) if self.batch.spec.gated else []
        self.waiting: list[Request] = []
        self.ghosts: set[int] = set()  # fixed: finished rows still in the batch (id of the request)
        self.joining: list[Request] = []
        self.cond = threading.Condition()
        self.gate: threading.Event | None = None  # tests hold the model thread here between iterations
        self.draining, self.drain_deadline = False, math.inf
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.service_s = 1.0  # moving average of a request's time in the scheduler, for Retry-After

    # the front end's side ------------------------------------------------------------------------------
    def submit(self, req: Request, force: bool = False) -> Request:
        """Queue a request; QueueFull when `queue_limit` are waiting (not with force: a cascade's hand-over)."""
        with self.cond:
            if self.draining and not force:
                raise ShuttingDown()
            if not force and self.waiting_total() >= self.queue_limit:
                raise QueueFull(self.retry_after())
            req.submitted = self.clock()
            req.deadline = req.submitted + req.timeout if req.timeout else math.inf
            req.model, req.step = self.name, self.steps
            self.waiting.append(req)
            self._gauge()
            self.cond.notify()
        return req

    def waiting_total(self) -> int:
        """Waiting here and in the fallback (a cascade admits against both)."""
        return len(self.waiting) + (len(self.fallback.waiting) if self.fallback else 0)

    def retry_after(self) -> int:
        per_slot = self.service_s / max(1, self.max_batch)
        return max(1, math.ceil(per_slot * max(1, self.waiting_total())))

    def cancel(self, req: Request) -> None:
        with self.cond:
            req.cancelled = True
            self.cond.notify()

    # the model thread --------------------------------------------------------------------------------------
    def start(self) -> Scheduler:
        self.thread = threading.Thread(target=self._loop, name=f"edgekit-serve-{self.name}", daemon=True)
        self.thread.start()
        return self

    def drain(self, timeout: float) -> None:
        """Stop accepting; finish what is admitted until `timeout` s from now, then end the rest ("shutdown")."""
        with self.cond:
            self.draining, self.drain_deadline = True, self.clock() + timeout
            self.cond.notify()

    def join(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def idle(self) -> bool:
        return not self.waiting and not self.batch.rows

    def _done(self) -> bool:
        """Draining, nothing left, and nothing more can be handed over (a cascade's primary has stopped)."""
        return self.draining and self.idle() and (self.upstream is None or self.upstream.stopped)

    def _loop(self) -> None:
        try:
            self._run()
        finally:
            self.stopped = True
            if self.fallback is not None:  # the fallback may stop once nothing more can reach it
                with self.fallback.cond:
                    self.fallback.cond.notify()

    def _run(self) -> None:
        try:
            while True:
                if self.gate is not None:
                    self.gate.wait()
                with self.cond:
                    while self.idle() and not self._done() and not (self.draining and self.upstream is None):
                        self.cond.wait()
                    if self._done():
                        return
                self.step()
                if self.draining and not self.idle() and self.clock() >= self.drain_deadline:
                    self._end_all("shutdown")
        except BaseException as e:  # a failed inference ends every request (500) and refuses new ones (503)
            import logging

            logging.getLogger("edgekit.serve").error("model thread of %s failed: %s", self.name, e)
            self.error = e
            with self.cond:
                self.draining = True
            self._end_all("error")

    def _end_all(self, reason: str) -> None:
        with self.cond:
            waiting, self.waiting = self.waiting, []
        for r in waiting + self.joining + list(self.batch.rows):
            self._finish(r, reason)
        self.batch.remove({id(r) for r in self.batch.rows})
        self.ghosts.clear()
        self._gauge()

    def step(self) -> None:
        """One iteration: expire, admit (prefill), one decode step, retire finished rows."""
        now = self.clock()
        with self.cond:
            expired = [r for r in self.waiting if r.cancelled or now >= r.deadline]
            self.waiting = [r for r in self.waiting if not (r.cancelled or now >= r.deadline)]
            joiners = self._pick()
            self._gauge()
        for r in expired:
            self._finish(r, "cancelled" if r.cancelled else "timeout")
        done = [r for r in self.batch.rows if id(r) not in self.ghosts and (r.cancelled or now >= r.deadline)]
        for r in done:
            self._finish(r, "cancelled" if r.cancelled else "timeout")
        self._retire(done)
        self.joining = joiners  # neither waiting nor in the batch while their prefill runs
        for group in ([[r] for r in joiners] if self.solo_prefill else [joiners] if joiners else []):
            out = self.batch.prefill(group, [r.prompt for r in group])
            self._accept(group, out, first=True)
        self.joining = []
        if self.ghosts:  # a finished row never runs past the context (live rows stop before it)
            full = {id(r) for r, n in zip(self.batch.rows, self.batch.mask.sum(1)) if id(r) in self.ghosts
                    and n + 1 > self.context}
            self.batch.remove(full)
            self.ghosts -= full
        if self.batch.rows:
            rows = list(self.batch.rows)
            self.steps += 1
            self._observe_batch(len(rows))
            self._accept(rows, self.batch.decode([r.last for r in rows]), first=False)

    def _pick(self) -> list[Request]:
        """Joining requests under the policy (the caller holds the lock)."""
        room = self.max_batch - len(self.batch.rows)
        if not self.waiting or room <= 0 or (self.policy == "fixed" and self.batch.rows):
            return []
        pool = self.waiting
        if not self.batch.can_pad:  # no mask: only rows of one length batch together
            need = self.batch.past_len if self.batch.rows else len(pool[0].prompt)
            pool = [r for r in pool if len(r.prompt) == need]
            if not pool:
                return []
        anchor = pool[0]
        if self.batch.rows and (len(self.batch.rows) + 1) * max(self.batch.past_len, len(anchor.prompt)) \
                > self.token_budget:
            return []  # the running batch has no room for the oldest request yet
        if self.batch.rows and room < self.join_rows and self.steps - anchor.step < self.join_wait:
            return []  # a prefill call stalls every running row: gather a few joiners (or wait a few steps)
        if self.policy == "fixed":
            pool = pool[1:]
        else:
            pool = sorted(pool[1:], key=lambda r: abs(len(r.prompt) - len(anchor.prompt)))
        chosen = [anchor]
        for r in pool:
            if len(chosen) >= room:
                break
            if self.policy == "dynamic":
                longest = max(self.batch.past_len, *(len(c.prompt) for c in chosen), len(r.prompt))
                if (len(self.batch.rows) + len(chosen) + 1) * longest > self.token_budget:
                    continue
            chosen.append(r)
        ids = {id(r) for r in chosen}
        self.waiting = [r for r in self.waiting if id(r) not in ids]
        return chosen

    def _accept(self, rows: list[Request], out, first: bool) -> None:
        leaving = []
        live = 0
        for i, r in enumerate(rows):
            if id(r) in self.ghosts:
                continue
            live += 1
            if first:
                r.rng = np.random.default_rng(r.seed)
            if out.executed is not None and self.gated:
                r.confidence.executed.append(float(out.executed[i][self.gated].mean()))
            tok = choose(out.logits[i], r.temperature, r.top_k, r.top_p, r.rng)
            observe(r.confidence, out.logits[i], tok)
            r.tokens.append(tok)
            r.last = tok
            if first and self.decide is not None and self.fallback is not None and self.decide(r, "first"):
                leaving.append(r)
                self._hand_over(r)
                continue
            if not r.hold:
                r.emit(("token", tok))
            reason = self._stopped(r)
            if reason:
                if self.decide is not None and self.fallback is not None and self.decide(r, "end"):
                    self._hand_over(r)
                else:
                    self._finish(r, reason)
                leaving.append(r)
        if self.metrics:
            self.metrics.tokens(self.name, live)
            if out.executed is not None and self.gated:  # per call: the layer ran (for any row) or not
                self.metrics.gates(self.name, len(self.gated), int((~out.executed[0][self.gated]).sum()))
        self._retire(leaving)

    def _retire(self, leaving: list[Request]) -> None:
        """Finished rows leave the batch; under `fixed` they stay (ghosts) until every row has finished."""
        if self.policy == "fixed":
            self.ghosts |= {id(r) for r in leaving}
            if self.ghosts >= {id(r) for r in self.batch.rows}:
                self.batch.remove(set(self.ghosts))
                self.ghosts.clear()
        else:
            self.batch.remove({id(r) for r in leaving})

    def _stopped(self, r: Request) -> str | None:
        if self.eos is not None and r.last == self.eos:
            return "stop"
        if r.stop is not None:
            keep = r.stop(r.tokens)
            if keep is not None:
                del r.tokens[keep:]
                return "stop"
        if len(r.tokens) >= r.max_tokens or len(r.prompt) + len(r.tokens) >= self.context:
            return "length"
        return None

    def _hand_over(self, r: Request) -> None:
        if self.metrics:
            self.metrics.escalated(self.name)
        r.reset()
        try:
            self.fallback.submit(r, force=True)
        except ShuttingDown:
            self._finish(r, "shutdown")

    def _finish(self, r: Request, reason: str) -> None:
        if r.finish_reason is not None:
            return
        r.finish_reason = reason
        elapsed = self.clock() - r.submitted
        if reason in ("stop", "length"):
            self.service_s = 0.8 * self.service_s + 0.2 * elapsed
        if r.hold and reason in ("stop", "length"):
            for t in r.tokens:
                r.emit(("token", t))
        if self.metrics:
            self.metrics.finished(self.name, reason, elapsed)
        r.emit(("done", reason))

    def _observe_batch(self, rows: int) -> None:
        if self.metrics:
            self.metrics.batch(self.name, rows)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue(self.name, len(self.waiting))
