"""The Flask application factory: settings, engine and blueprints wired together."""

from __future__ import annotations

import logging
import os
import threading

import torch
from flask import Flask

from app import auth, draining, metrics, openapi, request_log
from app.api import chat, health, legacy, openai, playground
from app.api.errors import register_error_handlers
from app.engine import Engine, EngineObserver
from app.engine.engine import default_threads
from app.logging_setup import configure_logging, quiet_library_output
from app.model.errors import ModelLoadError
from app.model.fit import plan_fit
from app.model.loader import load_model
from app.settings import Settings, load_settings

log = logging.getLogger(__name__)

# Exit status that makes the gunicorn master stop instead of restarting the worker.
WORKER_BOOT_ERROR = 3
# After the engine thread died, /health reports it this long, then the worker exits and gunicorn
# starts a fresh one (which loads the model again): a broken engine is never left serving errors.
RESTART_AFTER_ENGINE_DEATH_SECONDS = 10


def create_app(settings: Settings | None = None, *, exit_on_load_failure: bool = True,
               observer: EngineObserver | None = None, engine: Engine | None = None) -> Flask:
    """Build the app and start loading the model in the engine thread; `/health` answers at once.

    `observer` replaces the metrics as the engine's observer (the metrics then see no engine events).
    `engine` is an engine someone else built and started (several apps with different settings over
    one loaded model, as the API tests do): its batch limits apply, and this app's metrics (or
    `observer`) become its observer.
    """
    settings = settings or load_settings()
    if not logging.getLogger().handlers:  # not started by `python -m app`, which configures logging
        configure_logging(settings.log_format, settings.log_level)
    if settings.log_format == "json":
        quiet_library_output()
    app_metrics = metrics.Metrics()
    if engine is None:
        engine, settings = _build_engine(settings, observer or app_metrics, exit_on_load_failure)
        engine.start()
    else:
        engine.observer = observer or app_metrics
        settings = settings.model_copy(update={
            "max_batch_size": engine.max_batch_size, "max_batch_tokens": engine.max_batch_tokens,
            "max_queue": engine.max_queue, "queue_timeout": engine.queue_timeout})
    app_metrics.watch(engine)

    app = Flask(__name__, static_folder=None)  # app/static/ is served by the playground, with its headers
    # A doubled slash is answered 404 JSON like any unknown path, not redirected with an HTML page.
    app.url_map.merge_slashes = False
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.json.sort_keys = False
    app.extensions["settings"] = settings
    app.extensions["engine"] = engine
    app.extensions["metrics"] = app_metrics
    register_error_handlers(app)
    # Order matters: every request is timed and logged first, then refused while draining, then
    # checked for an API key.
    request_log.install(app, app_metrics)
    draining.install(app, app_metrics)
    auth.install(app, settings, app_metrics)
    app.register_blueprint(health.bp)
    app.register_blueprint(legacy.bp)
    app.register_blueprint(openai.bp)
    app.register_blueprint(chat.bp)
    app.register_blueprint(metrics.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(playground.bp)
    return app


def _build_engine(settings: Settings, observer: EngineObserver,
                  exit_on_load_failure: bool) -> tuple[Engine, Settings]:
    """The engine that will load the model, and the settings with the batch limits that fit."""
    torch.set_num_threads(settings.torch_threads or default_threads())

    # The fit check reads only the config, so the engine is built with the batch limits that fit; the
    # settings the routes see carry them too. A refusal surfaces like any load failure, below.
    plan, refusal = None, None
    try:
        plan = plan_fit(settings)
        settings = settings.model_copy(
            update={"max_batch_size": plan.max_batch_size, "max_batch_tokens": plan.max_batch_tokens,
                    "quantize": plan.quantize})  # QUANTIZE=auto as it applies here: int8 or none
    except ModelLoadError as exc:
        refusal = exc

    _log_limits(settings)

    def load():
        try:
            if refusal is not None:
                raise refusal
            return load_model(settings, plan)
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
        on_death=_restart_worker_later if exit_on_load_failure else None,
    )
    return engine, settings


def _restart_worker_later() -> None:
    def restart():
        log.critical("the generation engine died; restarting the worker")
        logging.shutdown()
        os._exit(1)

    threading.Timer(RESTART_AFTER_ENGINE_DEATH_SECONDS, restart).start()


def _log_limits(settings: Settings) -> None:
    limits = {
        "max_new_tokens": settings.max_new_tokens,
        "max_num_return_sequences": settings.max_num_return_sequences,
        "max_stop_sequences": settings.max_stop_sequences,
        "max_batch_size": settings.max_batch_size,
        "max_batch_tokens": settings.max_batch_tokens,
        "max_queue": settings.max_queue,
        "queue_timeout": settings.queue_timeout,
        "max_body_bytes": settings.max_body_bytes,
        "max_connections": settings.max_connections,
        "header_timeout": settings.header_timeout,
        "body_timeout": settings.body_timeout,
        "graceful_timeout": settings.graceful_timeout,
    }
    log.info(
        "serving %s (revision %s) on device %s, dtype %s, at %s:%d; limits: %s",
        settings.model_id, settings.model_revision, settings.device, settings.dtype, settings.host, settings.port,
        ", ".join(f"{k.upper()}={v:g}" if isinstance(v, float) else f"{k.upper()}={v}" for k, v in limits.items()),
        extra={"fields": {"model": settings.model_id, "revision": settings.model_revision,
                          "device": settings.device, "dtype": settings.dtype, "limits": limits}},
    )
