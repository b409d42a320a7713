"""`python -m app`: validate the settings, check the model is on disk, then run gunicorn."""

from __future__ import annotations

import logging
import sys

from gunicorn.app.base import BaseApplication

from app.factory import create_app
from app.gunicorn_conf import gunicorn_options
from app.model_loader import ModelLoadError, check_device_available, check_model_available
from app.settings import Settings, SettingsError, load_settings


class Server(BaseApplication):
    def __init__(self, settings: Settings):
        self.settings = settings
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_options(self.settings).items():
            self.cfg.set(key, value)

    def load(self):
        # Runs in the worker after the fork: the model is loaded there, once.
        return create_app(self.settings)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
        check_device_available(settings)
        check_model_available(settings)
    except (SettingsError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Server(settings).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
