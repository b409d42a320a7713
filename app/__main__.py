"""`python -m app`: validate the settings, check the model is on disk, then become the gunicorn master."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys

from app.gunicorn_conf import master_config
from app.logging_setup import configure_logging
from app.model.errors import ModelLoadError
from app.model.preflight import check_device_available, check_model_available
from app.settings import Settings, SettingsError, load_settings


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
        configure_logging(settings.log_format, settings.log_level)  # LOG_FORMAT / LOG_LEVEL from here on
        check_device_available(settings)
        check_model_available(settings)
    except (SettingsError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _allow_open_files(settings)  # the limit, like the process itself, outlives the exec
    sys.stdout.flush()
    sys.stderr.flush()
    # The same process (the container's signals reach it) in a fresh interpreter: app/master.py.
    os.execv(sys.executable, [sys.executable, "-m", "app.master", json.dumps(master_config(settings))])


if __name__ == "__main__":
    sys.exit(main())
