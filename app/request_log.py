"""Per-request bookkeeping: the request id, the access line and the HTTP metrics.

Each request gets an id, the client's `X-Request-ID` when it sent a sensible one, else a new one;
it is returned in the `X-Request-ID` response header and tagged on every log line written while
the request is served. When the response has been sent to the end (a stream included), one access
line is written: id, client, method, path, status, tokens in and out, and duration.

Token counts come from the engine requests the route submitted (`track`, called by
`app.api.generation.submit`), read when the response ends, so a stream cut short counts what was
sent. They are kept in the WSGI environ, not on `flask.g`: a streamed body runs after the request's
app context is gone, with a fresh `g`, while the environ stays the same dict to the last byte.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, has_request_context, request

from app.engine import RequestHandle
from app.logging_setup import REQUEST_ID_KEY
from app.metrics import Metrics

log = logging.getLogger("app.access")

_HANDLES_KEY = "app.generations"
_STARTED_KEY = "app.started"

# A client's id is kept only if it is short and plain (it ends up in logs and headers).
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def track(handle: RequestHandle) -> None:
    """Count this engine request's prompt and generated tokens in the current request's access line."""
    if has_request_context():
        request.environ.setdefault(_HANDLES_KEY, []).append(handle)


def request_id() -> str:
    return request.environ.get(REQUEST_ID_KEY, "")


def install(app: Flask, metrics: Metrics) -> None:
    """Register the hooks; call before any other `before_request` so every request is timed and logged."""

    @app.before_request
    def _start():
        environ = request.environ
        environ[_STARTED_KEY] = time.perf_counter()
        sent = request.headers.get("X-Request-ID", "")
        environ[REQUEST_ID_KEY] = sent if _CLIENT_ID.fullmatch(sent) else uuid.uuid4().hex

    @app.after_request
    def _finish(response: Response) -> Response:
        environ = request.environ
        rid = environ.get(REQUEST_ID_KEY) or uuid.uuid4().hex
        response.headers["X-Request-ID"] = rid
        # The route template, not the raw path: /v1/models/<path:model_id> is one label, not one per id.
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method, path, client = request.method, request.path, request.remote_addr or "-"
        started = environ.get(_STARTED_KEY, time.perf_counter())

        def closed():
            seconds = time.perf_counter() - started
            status = response.status_code
            metrics.http_request(method, route, status, seconds)
            handles = environ.get(_HANDLES_KEY)
            prompt = sum(h.request.prompt_tokens for h in handles) if handles else None
            completion = sum(h.tokens_received for h in handles) if handles else None
            log.info(
                "%s %s %s %d in=%s out=%s %.3fs id=%s", client, method, path, status,
                "-" if prompt is None else prompt, "-" if completion is None else completion, seconds, rid,
                extra={"request_id": rid, "fields": {
                    "client": client, "method": method, "path": path, "route": route, "status": status,
                    "prompt_tokens": prompt, "completion_tokens": completion,
                    "duration_s": round(seconds, 4), "user_agent": environ.get("HTTP_USER_AGENT"),
                }},
            )

        response.call_on_close(closed)
        return response
