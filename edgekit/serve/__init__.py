"""`edgekit serve`: continuous batching over any runner, an OpenAI-compatible HTTP front end, and the
R1 -> V3 cascade.

    batch       per-row numpy KV caches; rows join (left-padded) and leave between decode steps
    sampling    greedy / temperature / top-k / top-p choice and the confidence record of each request
    scheduler   one model thread: bounded waiting list, dynamic or fixed batching, timeouts, stop, hand-over
    cascade     confidence signals, the policy file, the probe, the threshold for a target rate
    calibrate   `edgekit cascade calibrate`: run both models over data, write the policy
    metrics     Prometheus collectors of one server
    service     loading (artifacts, verified bundles) and the schedulers of one or two models
    requests    OpenAI request checking and response shapes
    app         the Starlette app; server: uvicorn with a graceful drain

Starlette, uvicorn, sse-starlette and prometheus-client are the `serve` extra, imported where used.
"""

from edgekit.serve.scheduler import POLICIES, QueueFull, Request, Scheduler
from edgekit.serve.service import Options, Service, open_service

__all__ = ["Scheduler", "Request", "QueueFull", "POLICIES", "Options", "Service", "open_service"]
