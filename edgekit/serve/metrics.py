"""Prometheus metrics of one server (its own registry, so two servers in one process never collide).

    edgekit_http_responses_total{status}         completion responses by HTTP status (200, 429, 4xx, 5xx)
    edgekit_requests_total{model,reason}         admitted requests by how they ended (stop, length, timeout, ...)
    edgekit_queue_depth{model}                   requests waiting for a batch slot
    edgekit_batch_rows{model}                    histogram: rows per decode step
    edgekit_generated_tokens_total{model}        tokens generated (tokens/s = rate() of it)
    edgekit_request_seconds{model}               histogram: submission to last token
    edgekit_gated_layer_slots_total{model}       R1: gated-layer executions decided, per model call
    edgekit_gated_layers_skipped_total{model}    R1: of those, skipped
    edgekit_skipped_fraction{model}              R1: skipped / slots so far
    edgekit_escalated_total{model}               cascade: requests handed to the fallback model
"""

from __future__ import annotations

import threading


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.responses = Counter("edgekit_http_responses", "Completion responses by HTTP status.", ["status"],
                                 registry=r)
        self.requests = Counter("edgekit_requests", "Admitted requests by how they ended.", ["model", "reason"],
                                registry=r)
        self.queue_depth = Gauge("edgekit_queue_depth", "Requests waiting for a batch slot.", ["model"], registry=r)
        self.batch_rows = Histogram("edgekit_batch_rows", "Rows per decode step.", ["model"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.generated = Counter("edgekit_generated_tokens", "Tokens generated.", ["model"], registry=r)
        self.latency = Histogram("edgekit_request_seconds", "Submission to last token.", ["model"], registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.slots = Counter("edgekit_gated_layer_slots", "Gated-layer executions decided.", ["model"], registry=r)
        self.skipped = Counter("edgekit_gated_layers_skipped", "Gated-layer executions skipped.", ["model"],
                               registry=r)
        self.skipped_fraction = Gauge("edgekit_skipped_fraction", "Skipped share of gated-layer executions.",
                                      ["model"], registry=r)
        self.escalations = Counter("edgekit_escalated", "Requests handed to the fallback model.", ["model"],
                                   registry=r)
        self._lock = threading.Lock()
        self._gates: dict[str, list[int]] = {}

    def http(self, status: int) -> None:
        self.responses.labels(str(status)).inc()

    def finished(self, model: str, reason: str, seconds: float) -> None:
        self.requests.labels(model, reason).inc()
        if reason in ("stop", "length"):
            self.latency.labels(model).observe(seconds)

    def queue(self, model: str, depth: int) -> None:
        self.queue_depth.labels(model).set(depth)

    def batch(self, model: str, rows: int) -> None:
        self.batch_rows.labels(model).observe(rows)

    def tokens(self, model: str, n: int) -> None:
        self.generated.labels(model).inc(n)

    def gates(self, model: str, slots: int, skipped: int) -> None:
        self.slots.labels(model).inc(slots)
        self.skipped.labels(model).inc(skipped)
        with self._lock:
            total = self._gates.setdefault(model, [0, 0])
            total[0] += slots
            total[1] += skipped
            self.skipped_fraction.labels(model).set(total[1] / total[0] if total[0] else 0.0)

    def escalated(self, model: str) -> None:
        self.escalations.labels(model).inc()

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
