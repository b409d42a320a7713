"""What every generation route shares: reading the body, encoding the prompt, the server's limits
and model as the protocol models see them, and waiting for the engine while watching the client's
connection."""

from __future__ import annotations

import json
import select
import socket
import threading
from typing import Iterator

from flask import current_app, request

from app import request_log
from app.api.errors import ApiError
from app.api.protocol import Serving
from app.engine import Engine, GenerationRequest, RequestHandle

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


def serving() -> Serving:
    """What the protocol models need to turn a request into engine requests."""
    loaded = loaded_model()
    return Serving(settings(), loaded.context_length, loaded.model.config.get_text_config().vocab_size,
                   encode, loaded.tokenizer)


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
