"""Logging for the whole process: one format (LOG_FORMAT=text|json), one level (LOG_LEVEL), one stream.

The app's loggers, gunicorn's own lines (through `GunicornLogger`) and the per-request access lines
all go through the root logger's single handler on stderr, so `LOG_FORMAT=json` gives one JSON
object per line for every line the server writes.

Structured fields travel in `extra={"fields": {...}}`: the text format shows only the message (which
already says everything), the JSON format adds the fields as keys.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys

from gunicorn import glogging

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Where the request id lives while a request is served (set by app/request_log.py).
REQUEST_ID_KEY = "app.request_id"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, request_id, fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        entry.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class RequestIdFilter(logging.Filter):
    """Tags every record written while a request is served with that request's id."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Flask is looked up, not imported: the gunicorn master logs too, and it serves no request, so
        # it need not hold Flask's modules (8 MB) in memory.
        flask = sys.modules.get("flask")
        if flask is not None and not hasattr(record, "request_id") and flask.has_request_context():
            record.request_id = flask.request.environ.get(REQUEST_ID_KEY)
        return True


def configure_logging(log_format: str, log_level: str) -> None:
    """Replace the root logger's handlers with one stderr handler in LOG_FORMAT and LOG_LEVEL."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(log_level.upper())


def quiet_library_output() -> None:
    """For LOG_FORMAT=json, in the process that loads the model: send transformers' own log lines through
    the root handler and drop the progress bars (they draw with carriage returns on stderr, which no log
    collector can parse)."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()


class GunicornLogger(glogging.Logger):
    """Gunicorn's logger, writing through the root handler instead of its own (so JSON applies too).

    Gunicorn's access log stays off: the app writes a richer access line itself.
    """

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in list(log.handlers):
                if getattr(handler, "_gunicorn", False):
                    log.removeHandler(handler)
            log.propagate = True
