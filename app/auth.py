"""API keys and CORS.

With API_KEY and/or API_KEY_FILE set, every route but the health check (and the static API docs
page, which holds no data and asks for the key itself) needs `Authorization: Bearer <key>` (what
the OpenAI clients send) or `X-API-Key: <key>`. The presented key is compared with every accepted
key in constant time, so neither timing nor the number of keys tells how close a guess was.
A refused request gets 401 with the usual JSON error and `WWW-Authenticate: Bearer`.

CORS is off (browsers on other origins cannot read responses) unless CORS_ORIGINS is set.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

from flask import Flask, request
from flask_cors import CORS

from app.api.errors import error_response
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger(__name__)


def is_public(view) -> bool:
    """Anyone may call the view: its `@documented(public=True)` says so (app/openapi.py). These are the
    health check (orchestrators probe it without credentials) and the docs and playground pages with
    their files (no data in them; each page asks for the key). A view without it needs a key."""
    operation = getattr(view, "openapi", None)
    return operation is not None and operation.public


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def presented_keys() -> list[str]:
    """The keys the client sent: a Bearer token and/or an X-API-Key header."""
    keys = []
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    api_key = request.headers.get("X-API-Key", "").strip()
    if api_key:
        keys.append(api_key)
    return keys


def install(app: Flask, settings: Settings, metrics: Metrics) -> None:
    if settings.cors_origins:
        CORS(
            app,
            origins=settings.cors_origin_list,
            allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )

    accepted = [key.encode() for key in settings.api_keys]
    if not accepted:
        # In a container HOST is 0.0.0.0, but the port may be published on the loopback address only.
        reachable_on = settings.published_address or settings.host
        if not is_loopback(reachable_on):
            log.warning(
                "no API key is set and the server listens on %s: anyone who can reach port %d can use it; "
                "set API_KEY or API_KEY_FILE", reachable_on, settings.port,
            )
        return
    log.info("API keys required on every route but /health (%d key(s) accepted)", len(accepted))

    def matches(candidate: str) -> bool:
        presented = candidate.encode("utf-8", "surrogateescape")
        found = False
        for key in accepted:  # every key is compared, whether or not an earlier one matched
            found |= hmac.compare_digest(presented, key)
        return found

    @app.before_request
    def _require_key():
        # A browser's CORS preflight never carries credentials; it runs no route, so let it through.
        # So is a request for no route or a method a route lacks: it gets its 404 or 405 and nothing else.
        if request.method == "OPTIONS" or request.routing_exception or is_public(app.view_functions[request.endpoint]):
            return None
        candidates = presented_keys()
        if any([matches(candidate) for candidate in candidates]):
            return None
        metrics.refused("unauthorized")
        if candidates:
            message, code, challenge = "invalid API key", "invalid_api_key", 'Bearer error="invalid_token"'
        else:
            message = "missing API key: send the header `Authorization: Bearer <key>` or `X-API-Key: <key>`"
            code, challenge = "missing_api_key", "Bearer"
        response = error_response(401, message, code=code)
        response.headers["WWW-Authenticate"] = challenge
        return response
