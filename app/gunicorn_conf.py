"""Gunicorn options for this server, derived from the settings.

One worker process, because the model is loaded once and owned by that process's engine thread;
many threads, because each connection (a streaming one for minutes) holds a thread while the
engine generates for all of them together.
"""

from __future__ import annotations

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
        "graceful_timeout": int(settings.graceful_timeout),
        "keepalive": 5,
        "preload_app": False,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
        # Generation requests can be long; never let a slow proxy's body read time out at the default.
        "limit_request_line": 8190,
    }
