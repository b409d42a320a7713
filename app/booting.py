"""What the worker serves from its first second: 503 JSON while the real app is being built.

Building the real app (app/factory.py) imports torch and transformers and starts the engine, which
takes seconds; until it returns, a worker that waited for it would leave every connection unanswered
in the listen backlog (health probes time out or see "connection refused"). So the worker gets a
`BootingApp` at once and the real app is built on a native thread meanwhile. Until it is there,
every request is answered here, as the real app answers while its engine loads the model:

- `/health`: 503 `{"status": "loading", "model": ...}` (`"shutting_down"` after SIGTERM);
- every other route: 503 JSON `model_not_ready` with `Retry-After` (`shutting_down` after SIGTERM),
  with an access line and an `X-Request-ID` like any answer.

Then every request goes to the real app, whose `/health` still says "loading" until the engine has
loaded the model. A build that fails ends the worker with gunicorn's boot-error status, so the master
stops instead of starting the worker again and again.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Callable

from flask import Flask, jsonify, request
from gunicorn.arbiter import Arbiter

from app import draining, metrics, request_log
from app.api.errors import error_response, register_error_handlers
from app.settings import Settings

log = logging.getLogger(__name__)

# The original API's routes: their errors carry a FastAPI-style `detail` list too (app/api/errors.py).
LEGACY_PATHS = frozenset({"/generate", "/generate_stream", "/"})
RETRY_AFTER_SECONDS = 5


class BootingApp:
    """The worker's WSGI app: answers 503 until `build()` (run on a native thread) has returned the
    real app, then hands every request to it."""

    def __init__(self, settings: Settings, build: Callable[[], Flask]):
        self._booting = _booting_app(settings)
        self._app: Flask | None = None
        self._draining = False
        self._started = time.monotonic()
        # A native thread (the worker leaves threads unpatched): the imports and the build compute
        # there while the event loop answers.
        self._thread = threading.Thread(target=self._build, args=(build,), name="app-build", daemon=True)
        self._thread.start()

    @property
    def app(self) -> Flask | None:
        """The real app once built."""
        return self._app

    def __call__(self, environ, start_response):
        app = self._app
        return (app or self._booting)(environ, start_response)

    def start_draining(self) -> None:
        """SIGTERM (in the worker's handler): drain the real app, or the booting answers until it is
        built and then the real app too."""
        # Flag first, app second; `_build` publishes in the opposite order, so whichever runs last
        # sees the other's write and the real app is drained whatever the interleaving.
        self._draining = True
        self._booting.extensions[draining.DRAINING_KEY] = True
        app = self._app
        if app is not None:
            draining.on_sigterm(app)

    def _build(self, build: Callable[[], Flask]) -> None:
        try:
            app = build()
        except BaseException:  # SystemExit included: whatever stops the build stops the server
            log.critical("the app could not be built", exc_info=True)
            logging.shutdown()
            sys.stderr.flush()
            os._exit(Arbiter.WORKER_BOOT_ERROR)
        self._app = app
        if self._draining:
            draining.on_sigterm(app)
        log.info("app built in %.1f s; requests go to it from now on", time.monotonic() - self._started)


def _booting_app(settings: Settings) -> Flask:
    """The answers while the real app is built, with the real app's request ids, access lines and
    error shape (these modules import neither torch nor transformers)."""
    app = Flask(__name__, static_folder=None)
    app.url_map.merge_slashes = False
    app.json.sort_keys = False
    register_error_handlers(app)
    request_log.install(app, metrics.Metrics())

    @app.route("/health", methods=["GET"])
    def health():
        status = "shutting_down" if draining.draining(app) else "loading"
        body = {"status": status} if status == "shutting_down" else {"status": status, "model": settings.model_id}
        return jsonify(body), 503

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    @app.route("/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    def any_route(path: str):
        if draining.draining(app):
            message, code = "the server is shutting down; retry on another instance or later", "shutting_down"
        else:
            message, code = "the model is still loading; retry shortly", "model_not_ready"
        detail = ([{"loc": ["body"], "msg": message, "type": code}] if request.path in LEGACY_PATHS else None)
        return error_response(503, message, code=code, retry_after=RETRY_AFTER_SECONDS, detail=detail)

    return app
