"""What every generation route shares: reading the body, encoding the prompt, checking it fits,
waiting for the engine while watching the client's connection, and server-sent events."""

from __future__ import annotations

import json
import select
import socket
import threading
from typing import Iterable, Iterator

from flask import Response, current_app, request, stream_with_context

from app import request_log
from app.api.errors import ApiError
from app.engine import Engine, EngineError, GenerationRequest, RequestHandle

# How often a waiting HTTP thread looks whether its client is still there.
POLL_SECONDS = 0.25

_encode_lock = threading.Lock()


def engine() -> Engine:
    return current_app.extensions["engine"]


def settings():
    return current_app.extensions["settings"]


def loaded_model():
    """The loaded model, or a 503 while it loads or after the engine died."""
    eng = engine()
    if not eng.ready:
        raise ApiError(503, eng.unavailable_reason, code="model_not_ready", retry_after=5)
    return eng.loaded


def json_body() -> dict:
    """The request's JSON object, whatever Content-Type the client sent (old clients send none).

    Raw line breaks and tabs inside strings are tolerated (`strict=False`): old shell scripts paste
    wrapped `base64` output straight into a JSON string."""
    raw = request.get_data(cache=True)
    try:
        body = json.loads(raw, strict=False)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def encode(text: str) -> list[int]:
    """Token ids of a prompt; an empty prompt starts from the beginning-of-text token."""
    tokenizer = loaded_model().tokenizer
    with _encode_lock:  # a fast tokenizer must not be entered by two threads at once
        ids = tokenizer(text).input_ids
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return ids


def decode(ids) -> str:
    tokenizer = loaded_model().tokenizer
    return tokenizer.decode(ids, skip_special_tokens=True)


def check_fits(prompt_tokens: int, new_tokens: int, param: str, n: int = 1, status: int = 422) -> None:
    """Refuse, never truncate, a prompt and length that the model or the server cannot hold."""
    context = loaded_model().context_length
    if prompt_tokens + new_tokens > context:
        raise ApiError(
            status,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{prompt_tokens + new_tokens} tokens ({prompt_tokens} in the prompt, {new_tokens} to generate). "
            f"Shorten the prompt or lower {param}.",
            param=param, code="context_length_exceeded",
        )
    limit = settings().max_new_tokens
    if new_tokens > limit:
        raise ApiError(
            status,
            f"{param} asks for {new_tokens} new tokens; this server allows at most {limit} (MAX_NEW_TOKENS)",
            param=param, code="too_many_tokens",
        )
    budget = settings().max_batch_tokens
    if n * (prompt_tokens + new_tokens) > budget:
        raise ApiError(
            status,
            f"{n} sequence(s) of {prompt_tokens + new_tokens} tokens need {n * (prompt_tokens + new_tokens)} tokens "
            f"of batch space; this server allows {budget} (MAX_BATCH_TOKENS)",
            param=param, code="too_many_tokens",
        )


def client_connected() -> bool:
    """False once the client closed its connection (gunicorn gives us the socket to look at)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return True
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except (OSError, ValueError):
        return False


def submit(generation: GenerationRequest) -> RequestHandle:
    handle = engine().submit(generation)
    request_log.track(handle)  # its token counts go into the request's access line
    return handle


def run_to_completion(generation: GenerationRequest):
    """Submit and wait for the whole result; cancel it if the client goes away meanwhile."""
    handle = submit(generation)
    try:
        result = handle.result(POLL_SECONDS, client_connected)
    except BaseException:
        handle.cancel()
        raise
    if result is None:
        raise ApiError(499, "client closed the connection", code="client_closed")
    return result


def event_stream(handle: RequestHandle) -> Iterator:
    """The engine's events for `handle`; cancels the request when the client disconnects or the
    response is closed early (gunicorn closes the generator on a broken pipe)."""
    try:
        yield from handle.stream(POLL_SECONDS, client_connected)
    finally:
        handle.cancel()


def sse_response(events: Iterable[dict | str]) -> Response:
    """Server-sent events: each item becomes one `data:` line (a str is sent as is, e.g. "[DONE]")."""

    def lines():
        try:
            for event in events:
                payload = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
                yield f"data: {payload}\n\n"
        except EngineError as exc:
            error = {"error": {"message": str(exc), "type": "server_error", "param": None, "code": exc.code}}
            yield f"data: {json.dumps(error)}\n\n"

    response = Response(stream_with_context(lines()), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response
