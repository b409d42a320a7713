"""The Flask application factory: settings, engine and blueprints wired together."""

from __future__ import annotations

import logging
import os

import torch
from flask import Flask

from app.api import health, legacy, openai
from app.api.errors import register_error_handlers
from app.engine import Engine, EngineObserver
from app.engine.engine import default_threads
from app.model_loader import ModelLoadError, load_model
from app.settings import Settings, load_settings

log = logging.getLogger(__name__)

# Exit status that makes the gunicorn master stop instead of restarting the worker.
WORKER_BOOT_ERROR = 3


def create_app(settings: Settings | None = None, *, exit_on_load_failure: bool = True,
               observer: EngineObserver | None = None) -> Flask:
    """Build the app and start loading the model in the engine thread; `/health` answers at once."""
    settings = settings or load_settings()
    torch.set_num_threads(settings.torch_threads or default_threads())

    def load():
        try:
            return load_model(settings)
        except ModelLoadError as exc:
            log.critical("%s", exc)
            if exit_on_load_failure:
                logging.shutdown()
                os._exit(WORKER_BOOT_ERROR)
            raise

    engine = Engine(
        load,
        max_batch_size=settings.max_batch_size,
        max_batch_tokens=settings.max_batch_tokens,
        max_queue=settings.max_queue,
        queue_timeout=settings.queue_timeout,
        observer=observer,
    )

    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["settings"] = settings
    app.extensions["engine"] = engine
    register_error_handlers(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(legacy.bp)
    app.register_blueprint(openai.bp)
    engine.start()
    return app
