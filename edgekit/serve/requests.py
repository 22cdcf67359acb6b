"""OpenAI-compatible request bodies -> checked values, and the response / chunk / error shapes.

Only what edgekit can honour is accepted: one choice (n = 1), no echo or logprobs; a field of the wrong
type or out of range is a 422 naming the field, a body that is not a JSON object a 400.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 422, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Parsed:
    chat: bool
    prompt_text: str | None
    prompt_ids: list[int] | None
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    model: str | None = None


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})", 400) from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", 400)
    return body


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}",
                         param=name)
    if not math.isfinite(v) or v < low or v > high:
        raise BadRequest(f"'{name}' must be between {low:g} and {high:g}, got {v}", param=name)
    return v


def parse_request(body: dict, chat: bool, max_tokens_cap: int) -> Parsed:
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects", param="messages")
        parts = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise BadRequest(f"messages[{i}] must be {{\"role\": system|user|assistant, \"content\": string}}",
                                 param=f"messages[{i}]")
            parts.append(m["content"])
        prompt_text, prompt_ids = "\n".join(parts), None
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if isinstance(p, str):
            prompt_text, prompt_ids = p, None
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            prompt_text, prompt_ids = None, list(p)
        else:
            raise BadRequest("'prompt' must be a string or a list of token ids (one prompt per request)",
                             param="prompt")
    for unsupported, allowed in (("n", (None, 1)), ("best_of", (None, 1)), ("echo", (None, False)),
                                 ("logprobs", (None, False)), ("suffix", (None,))):
        if not any(body.get(unsupported) is a or (type(body.get(unsupported)) is type(a) and body.get(unsupported) == a)
                   for a in allowed):
            raise BadRequest(f"'{unsupported}' is not supported by edgekit serve (allowed: "
                             f"{', '.join(json.dumps(a) for a in allowed)})", param=unsupported)
    name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(body, name, 16, 1, max_tokens_cap, integer=True)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a non-empty string or a list of at most 4 of them", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", param="stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string", param="model")
    return Parsed(chat, prompt_text, prompt_ids, max_tokens,
                  float(_number(body, "temperature", 1.0, 0.0, 2.0)), float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
                  _number(body, "top_k", 0, 0, 1 << 30, integer=True),
                  _number(body, "seed", None, 0, 2**63 - 1, integer=True), stop, stream, model)


def stop_checker(decode, stops: list[str]):
    """tokens -> how many tokens to keep when the text contains a stop string (None: go on)."""
    if not stops:
        return None

    def check(tokens: list[int]) -> int | None:
        text = decode(tokens)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if not hits:
            return None
        cut = min(hits)
        keep = 0
        while keep < len(tokens) and len(decode(tokens[:keep + 1])) <= cut:
            keep += 1
        return keep

    return check


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` not yet safe to stream: from a stop string on, the start of one at the end,
    or a partial character (the model thread may not have cut the tokens yet when the stream reads them)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    if hits:
        return len(text) - min(hits)
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def completion(rid: str, model: str, chat: bool, text: str, reason: str, prompt_tokens: int, tokens: int,
               extra: dict) -> dict:
    choice = {"index": 0, "finish_reason": reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                      "total_tokens": prompt_tokens + tokens}, "edgekit": extra}


def chunk(rid: str, model: str, chat: bool, text: str | None, reason: str | None, first: bool = False) -> dict:
    choice: dict = {"index": 0, "finish_reason": reason}
    if chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice.update(text=text or "", logprobs=None)
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}
