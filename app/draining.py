"""Graceful shutdown: on SIGTERM stop taking requests, let running generations finish, then exit.

How the worker stops on SIGTERM (app/http_worker.py): the master closes its copy of the listening
socket and sends SIGTERM to the worker; the worker accepts and answers what is already in the
socket's backlog (so a client that connected just before gets an answer, never a reset), closes the
socket (from then on the kernel refuses new connections, which clients retry elsewhere), answers a
request arriving on a kept-alive connection in the next 2 s with `Connection: close`, and waits
for the requests running (at most GRACEFUL_TIMEOUT); the master exits 0 once the worker is gone.
What this module adds (`on_sigterm`, called from the worker's SIGTERM handler, see
app/gunicorn_conf.py):

- The app starts draining: `/health` answers 503 "shutting_down" (load balancers stop sending) and
  every other route but `/metrics` answers 503 JSON, so nothing new starts.
- Shortly before the limit the engine stops: generations still running end with a 503 error (an
  error event on a stream) instead of being cut off by SIGKILL mid-response.
"""

from __future__ import annotations

import logging
import threading

from flask import Flask, current_app, request

from app.api.errors import error_response
from app.metrics import Metrics

log = logging.getLogger(__name__)

DRAINING_KEY = "draining"

# Endpoints still served while draining: health says "shutting_down" itself; metrics show the drain.
SERVED_WHILE_DRAINING = frozenset({"health.health", "metrics.metrics"})


def draining(app: Flask | None = None) -> bool:
    return bool((app or current_app).extensions.get(DRAINING_KEY))


def install(app: Flask, metrics: Metrics) -> None:
    @app.before_request
    def _refuse_while_draining():
        if draining() and request.endpoint not in SERVED_WHILE_DRAINING:
            metrics.refused("shutting_down")
            return error_response(503, "the server is shutting down; retry on another instance or later",
                                  code="shutting_down", retry_after=5)
        return None


def stop_margin(graceful_timeout: float) -> float:
    """How long before the limit running generations are ended, so their answers can still be sent."""
    return min(2.0, graceful_timeout / 2)


def on_sigterm(app: Flask) -> None:
    """Start draining `app` (called in the worker's SIGTERM handler, before gunicorn's own)."""
    if draining(app):
        return
    app.extensions[DRAINING_KEY] = True
    settings = app.extensions["settings"]
    engine = app.extensions["engine"]
    log.info(
        "SIGTERM: no new requests; %d running and %d waiting get up to %g s (GRACEFUL_TIMEOUT) to finish",
        engine.batch_size, engine.queue_size, settings.graceful_timeout,
    )
    timer = threading.Timer(settings.graceful_timeout - stop_margin(settings.graceful_timeout),
                            _stop_engine, (engine,))
    timer.daemon = True
    timer.start()


def _stop_engine(engine) -> None:
    if engine.batch_size or engine.queue_size:
        log.warning("GRACEFUL_TIMEOUT is nearly over: ending %d running and %d waiting generation(s)",
                    engine.batch_size, engine.queue_size)
    engine.stop()

