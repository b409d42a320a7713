"""Gunicorn options for this server, derived from the settings (by `python -m app`, app/__main__.py), and
the hooks the gunicorn master adds to them (app/master.py).

One worker process, because the model is loaded once and owned by that process's engine thread.
The worker is gevent's (app/http_worker.py): each connection is a greenlet, so a client that is
idle, slow or streaming for minutes holds no thread, and MAX_CONNECTIONS bounds only memory and
file descriptors.
"""

from __future__ import annotations

import math
import signal
from typing import TYPE_CHECKING

from app.logging_setup import GunicornLogger

if TYPE_CHECKING:  # the master imports this module, and never pydantic's settings
    from app.settings import Settings


def master_config(settings: Settings) -> dict:
    """What the gunicorn master needs of the settings, as plain values: it receives them as JSON."""
    return {"options": gunicorn_options(settings), "log_format": settings.log_format,
            "log_level": settings.log_level, "header_timeout": settings.header_timeout}


def gunicorn_options(settings: Settings) -> dict:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return {
        "bind": f"{host}:{settings.port}",
        "workers": 1,
        "worker_class": "app.http_worker.Worker",
        # Beyond this many open connections new ones wait in the listen backlog (never in a thread).
        "worker_connections": settings.max_connections,
        # The worker's heartbeat comes from its event loop, not from requests, so generations lasting
        # minutes on a slow CPU are safe; this only catches a worker that hangs entirely.
        "timeout": 300,
        # On SIGTERM running generations get this long to finish before the worker is stopped.
        "graceful_timeout": math.ceil(settings.graceful_timeout),
        # Keep-alive on; how long an idle kept-alive connection stays open is HEADER_TIMEOUT (the worker
        # bounds the wait for each request's headers with it).
        "keepalive": 5,
        "preload_app": False,
        # The app writes its own access line (request id, tokens); gunicorn's lines go through the
        # app's log handler so that LOG_FORMAT=json covers them too.
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level,
        # The control socket (for `gunicornc`) is of no use here, and its default place under $HOME
        # is unwritable for a non-root container user and shared by every server of one user.
        "control_socket_disable": True,
        # Generation requests can be long; never let a slow proxy's body read time out at the default.
        "limit_request_line": 8190,
    }


def _drain_on_sigterm(worker) -> None:
    """Wrap the worker's SIGTERM handler: the app starts draining (app/draining.py; the app still
    being built drains once it is, app/booting.py), then gunicorn's own handler tells the worker to
    stop listening and wait for its connections (app/http_worker.py)."""
    app = worker.wsgi  # app.booting.BootingApp
    gunicorn_handler = signal.getsignal(signal.SIGTERM)

    def handle_sigterm(signum, frame):
        try:
            app.start_draining()
        finally:
            gunicorn_handler(signum, frame)

    signal.signal(signal.SIGTERM, handle_sigterm)
    signal.siginterrupt(signal.SIGTERM, False)


# Not plain values, so set by the master itself (app/master.py), not sent to it.
HOOKS = {"logger_class": GunicornLogger, "post_worker_init": _drain_on_sigterm}
