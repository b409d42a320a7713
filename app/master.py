"""The gunicorn master: `python -m app` (app/__main__.py) becomes this once the settings are valid.

It supervises the one worker for the server's whole life and serves nothing, so it runs in a fresh
interpreter (the same process: `exec`) that holds gunicorn and the worker class only; the settings'
modules (pydantic), torch and transformers are imported by the worker, after the fork. Measured: the
master's resident memory 45 -> 30 MB.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from gunicorn.app.base import BaseApplication

from app.gunicorn_conf import HOOKS
from app.logging_setup import configure_logging


class Server(BaseApplication):
    def __init__(self, config: dict):
        self.config = config  # app/http_worker.py reads its header_timeout
        super().__init__()

    def load_config(self) -> None:
        for key, value in {**self.config["options"], **HOOKS}.items():
            self.cfg.set(key, value)

    def load(self):
        # Runs in the worker after the fork: the model is loaded there, once. Returns at once: the real
        # app is built on a native thread while the worker already answers 503 (app/booting.py).
        from app.booting import BootingApp
        from app.settings import load_settings

        settings = load_settings()  # the environment `python -m app` has already validated
        return BootingApp(settings, lambda: _build(settings))


def _build(settings):
    from app.factory import create_app  # on the build thread: importing torch takes seconds

    return create_app(settings)


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])  # app.gunicorn_conf.master_config
    configure_logging(config["log_format"], config["log_level"])
    try:
        Server(config).run()
        code = 0
    except SystemExit as exc:  # how gunicorn ends both the master and, after its fork, the worker
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    # Everything is finished; skip the interpreter's teardown of torch and co, which takes seconds
    # and would hold up a restart.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
