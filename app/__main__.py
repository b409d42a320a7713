"""`python -m app`: validate the settings, check the model is on disk, then run gunicorn."""

from __future__ import annotations

import logging
import os
import resource
import sys

from gunicorn.app.base import BaseApplication

from app.gunicorn_conf import gunicorn_options
from app.logging_setup import configure_logging
from app.model.errors import ModelLoadError
from app.model.preflight import check_device_available, check_model_available
from app.settings import Settings, SettingsError, load_settings


class Server(BaseApplication):
    def __init__(self, settings: Settings):
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.settings).items():
            self.cfg.set(key, value)

    def load(self):
        # Runs in the worker after the fork: the model is loaded there, once. Returns at once: the real
        # app is built on a native thread while the worker already answers 503 (app/booting.py).
        from app.booting import BootingApp

        return BootingApp(self.settings, self._build)

    def _build(self):
        # Imported here so that the master never imports torch (its memory would stay resident in a
        # process that serves nothing).
        from app.factory import create_app

        return create_app(self.settings)


# Descriptors beyond the connections: the listening socket, the model's files, logs, the heartbeat.
SPARE_FILES = 256


def _allow_open_files(settings: Settings) -> None:
    """Raise the soft limit on open files (often 1024) so that MAX_CONNECTIONS connections fit; the
    worker inherits it. Where the hard limit is lower, say what will happen instead of failing later."""
    wanted = settings.max_connections + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        logging.getLogger(__name__).warning(
            "MAX_CONNECTIONS=%d needs %d open files but this process may open only %d (its hard limit); "
            "connections beyond about %d wait in the backlog. Raise the limit (docker run --ulimit nofile=%d) "
            "or lower MAX_CONNECTIONS", settings.max_connections, wanted, target, target - SPARE_FILES, wanted)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        configure_logging(settings)  # LOG_FORMAT / LOG_LEVEL from here on, gunicorn's lines included
        check_device_available(settings)
        check_model_available(settings)
    except (SettingsError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _allow_open_files(settings)
    try:
        Server(settings).run()
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
    sys.exit(main())
