"""Gunicorn options for this server, derived from the settings.

One worker process, because the model is loaded once and owned by that process's engine thread;
many threads, because each connection (a streaming one for minutes) holds a thread while the
engine generates for all of them together.
"""

from __future__ import annotations

import math
import signal

from app import draining
from app.logging_setup import GunicornLogger
from app.settings import Settings


def gunicorn_options(settings: Settings) -> dict:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return {
        "bind": f"{host}:{settings.port}",
        "workers": 1,
        "worker_class": "gthread",
        "threads": settings.http_threads,
        # The gthread worker's heartbeat does not depend on request length, so generations lasting
        # minutes on a slow CPU are safe; this only catches a worker that hangs entirely.
        "timeout": 300,
        # On SIGTERM running generations get this long to finish before the worker is stopped.
        "graceful_timeout": math.ceil(settings.graceful_timeout),
        "keepalive": 5,
        "preload_app": False,
        # The app writes its own access line (request id, tokens); gunicorn's lines go through the
        # app's log handler so that LOG_FORMAT=json covers them too.
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level,
        "logger_class": GunicornLogger,
        # The control socket (for `gunicornc`) is of no use here, and its default place under $HOME
        # is unwritable for a non-root container user and shared by every server of one user.
        "control_socket_disable": True,
        "post_worker_init": _drain_on_sigterm,
        # Generation requests can be long; never let a slow proxy's body read time out at the default.
        "limit_request_line": 8190,
    }


def _drain_on_sigterm(worker) -> None:
    """Wrap the worker's SIGTERM handler: the app starts draining (app/draining.py), then gunicorn's
    own handler stops the accept loop and waits for open connections up to graceful_timeout."""
    app = worker.wsgi
    gunicorn_handler = signal.getsignal(signal.SIGTERM)

    def handle_sigterm(signum, frame):
        try:
            draining.on_sigterm(app, worker)
        finally:
            gunicorn_handler(signum, frame)

    signal.signal(signal.SIGTERM, handle_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)
