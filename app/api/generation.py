"""What every generation route shares: reading the body, encoding the prompt, the server's limits
and model as the protocol models see them, and waiting for the engine while watching the client's
connection."""

from __future__ import annotations

import functools
import json
import socket
from typing import Iterator

from flask import current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from app import request_log
from app.api.errors import ApiError
from app.api.protocol import RequestRefused, Serving
from app.concurrency import deadline, off_loop, original_select
from app.engine import Engine, GenerationRequest, RequestHandle

# How often a waiting request looks whether its client is still there.
POLL_SECONDS = 0.25

# Prompts longer than this are tokenized on a native thread of the worker's pool, so the event loop
# goes on serving other connections (a 2 MB prompt takes seconds); shorter ones take well under a
# millisecond and are tokenized in place.
INLINE_ENCODE_CHARS = 8192


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
    wrapped `base64` output straight into a JSON string. The body must arrive within BODY_TIMEOUT."""
    timeout = settings().body_timeout
    with deadline(timeout, lambda: ApiError(
            408, f"the request body did not arrive within {timeout:g} s (BODY_TIMEOUT)", code="body_timeout")):
        raw = request.get_data(cache=True)
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        # A chunked body announces no length: werkzeug stops reading at the limit, so look for more.
        if request.content_length is None and len(raw) >= limit and request.environ["wsgi.input"].read(1):
            raise RequestEntityTooLarge()
    try:
        body = json.loads(raw, strict=False)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body is not valid JSON: it is nested too deeply",
                       code="invalid_json") from None
    except ValueError as exc:  # an integer literal longer than Python converts (4,300 digits)
        raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def encode(text: str, param: str | None = None) -> list[int]:
    """Token ids of a prompt; an empty prompt starts from the beginning-of-text token.

    A prompt that cannot fit the context whatever its tokens is refused by its length alone, before
    it is tokenized. No lock: the tokenizer is never reconfigured after loading (no truncation or
    padding is ever set), and its encoding only reads it, so concurrent requests tokenize in parallel.
    """
    loaded = loaded_model()
    tokenizer = loaded.tokenizer
    longest = longest_token_chars(tokenizer)
    if longest and len(text) > loaded.context_length * longest:
        fewest = -(-len(text) // longest)
        raise RequestRefused(
            f"the prompt has {len(text)} characters, so at least {fewest} tokens; this model's maximum context "
            f"length is {loaded.context_length} tokens. Shorten the prompt.", param, "context_length_exceeded")
    if len(text) > INLINE_ENCODE_CHARS:
        ids = off_loop(_token_ids, tokenizer, text)
    else:
        ids = _token_ids(tokenizer, text)
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return ids


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids


@functools.lru_cache(maxsize=8)
def longest_token_chars(tokenizer) -> int | None:
    """The most characters one token can stand for, when that bounds a text's token count from below;
    None when it does not.

    It does for a byte-level tokenizer without a normalizer (GPT-2, GPT-Neo, GPT-J): every byte of
    the text ends up in exactly one token and no token holds more bytes than its vocabulary entry has
    characters (special tokens included), so a text of c characters has at least c / longest tokens.
    A normalizer or a pre-tokenizer that drops characters (whitespace splitting) would break that.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None or type(backend.pre_tokenizer).__name__ != "ByteLevel":
        return None
    return max((len(token) for token in tokenizer.get_vocab()), default=0) or None


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
        # The unpatched select: a zero-timeout look at the socket, not a wait on the event loop.
        readable, _, _ = original_select([sock], [], [], 0)
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
