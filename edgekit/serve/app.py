"""The ASGI app (Starlette): OpenAI-compatible completions over a Service, health and Prometheus metrics.

    POST /v1/completions, /v1/chat/completions   stream=true: server-sent events, OpenAI's chunks, `data: [DONE]`
    GET  /v1/models, /health, /metrics

The asyncio side only parses, admits and waits: a request is handed to the model thread through the
scheduler's bounded waiting list, and its tokens come back through `loop.call_soon_threadsafe`.
A full list is 429 with Retry-After; a draining server 503; every admitted request gets one final answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json

from edgekit.serve.requests import (
    BadRequest,
    chunk,
    completion,
    error_body,
    held_back,
    parse_body,
    parse_request,
    stop_checker,
)
from edgekit.serve.scheduler import QueueFull, Request, ShuttingDown

_ids = itertools.count(1)
MAX_BODY = 1 << 20  # bytes of one request body
FAILED = {"timeout": (504, "the request timed out", "timeout"),
          "shutdown": (503, "the server is shutting down", "server_shutdown"),
          "cancelled": (499, "the request was cancelled", "cancelled"),
          "error": (500, "inference failed", "server_error")}


def create_app(service, start: bool = True):
    """The Starlette app over an opened Service; its lifespan starts the model threads (start=True) and
    drains them at shutdown."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    metrics = service.metrics

    def error(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None, headers=None):
        metrics.http(status)
        return JSONResponse(error_body(message, kind, param, code), status_code=status, headers=headers)

    async def health(request):
        draining = any(m.scheduler.draining for m in service.models)
        return JSONResponse({"status": "draining" if draining else "ok", **service.describe(),
                             "queue_depth": service.entry.waiting_total()}, status_code=503 if draining else 200)

    async def metrics_route(request):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": m.name, "object": "model", "owned_by": "edgekit"}
                                                        for m in service.models]})

    def build(parsed) -> Request:
        tok = service.tokenizer
        ids = parsed.prompt_ids if parsed.prompt_ids is not None else tok.encode(parsed.prompt_text)
        vocab = service.models[0].runner.cfg.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise BadRequest(f"'prompt' token ids must be in [0, {vocab})", param="prompt")
        room = service.context - len(ids)
        if room < 1:
            raise BadRequest(f"the prompt has {len(ids)} tokens; the model's context is {service.context}",
                             400, "prompt", "context_length_exceeded")
        hold = service.policy is not None and service.policy.stage == "end"
        return Request(ids, min(parsed.max_tokens, room), parsed.temperature, parsed.top_k, parsed.top_p,
                       parsed.seed, stop_checker(tok.decode, parsed.stop), service.options.timeout, hold=hold)

    async def read_body(request) -> bytes:
        """The body, at most MAX_BODY bytes (a bigger one is refused before it is all read: memory stays bounded)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY:
            raise BadRequest(f"the request body is larger than {MAX_BODY} bytes", 413)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > MAX_BODY:
                raise BadRequest(f"the request body is larger than {MAX_BODY} bytes", 413)
        return bytes(body)

    async def complete(request, chat: bool):
        try:
            parsed = parse_request(parse_body(await read_body(request)), chat, service.options.max_tokens)
            if parsed.model is not None and parsed.model not in [m.name for m in service.models]:
                return error(404, f"model '{parsed.model}' is not served here (serving "
                             f"{', '.join(m.name for m in service.models)})", param="model", code="model_not_found")
            req = build(parsed)
        except BadRequest as e:
            return error(e.status, str(e), e.kind, e.param)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.sink = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        try:
            service.entry.submit(req)
        except QueueFull as e:
            return error(429, f"the server is busy ({service.options.queue_limit} requests waiting); retry after "
                         f"{e.retry_after} s", "rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)})
        except ShuttingDown:
            return error(503, "the server is shutting down", "server_shutdown")
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(_ids)}"
        if parsed.stream:
            return stream(req, events, rid, chat, parsed.stop)
        try:
            while (ev := await events.get())[0] != "done":
                pass
        finally:
            req.cancelled = True  # no-op once done; a client gone mid-wait frees its batch row
        reason = ev[1]
        if reason in FAILED:
            status, message, code = FAILED[reason]
            return error(status, message, code)
        metrics.http(200)
        text = service.tokenizer.decode([t for t in list(req.tokens) if t != service.tokenizer.eos_id])
        return JSONResponse(completion(rid, req.model, chat, text, reason, len(req.prompt), len(req.tokens),
                                       extra(req)))

    def extra(req) -> dict:
        return {"model": req.model, "escalated": service.policy is not None and req.model != service.name,
                "score": req.score}

    def stream(req, events, rid, chat, stops):
        from sse_starlette.sse import EventSourceResponse

        async def gen():
            sent, first = "", True
            try:
                while True:
                    kind, value = await events.get()
                    if kind == "done":
                        break
                    text = service.tokenizer.decode([t for t in list(req.tokens) if t != service.tokenizer.eos_id])
                    safe = text[:len(text) - held_back(text, stops)]
                    if len(safe) > len(sent) and safe.startswith(sent):
                        yield {"data": json.dumps(chunk(rid, req.model, chat, safe[len(sent):], None, first))}
                        sent, first = safe, False
                if value in FAILED:
                    status, message, code = FAILED[value]
                    metrics.http(status)
                    yield {"data": json.dumps(error_body(message, code, None, str(status)))}
                else:
                    metrics.http(200)
                    text = service.tokenizer.decode([t for t in list(req.tokens) if t != service.tokenizer.eos_id])
                    rest = text[len(sent):] if text.startswith(sent) else ""
                    yield {"data": json.dumps(chunk(rid, req.model, chat, rest, value, first))}
                yield {"data": "[DONE]"}
            finally:
                req.cancelled = True

        return EventSourceResponse(gen(), ping=15)

    async def completions(request):
        return await complete(request, chat=False)

    async def chat_completions(request):
        return await complete(request, chat=True)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if start:
            service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.close)

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/models", models), Route("/health", health),
                             Route("/metrics", metrics_route)], lifespan=lifespan)
