"""`GET /health`: 503 while the model loads (or after the engine died), 200 when it can serve."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from flask import Blueprint, current_app, jsonify

bp = Blueprint("health", __name__)

_PACKAGES = ("torch", "transformers", "huggingface-hub", "tokenizers", "flask", "gunicorn")


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


@bp.get("/health")
def health():
    engine = current_app.extensions["engine"]
    settings = current_app.extensions["settings"]
    if current_app.extensions.get("draining"):
        return jsonify({"status": "shutting_down"}), 503
    if not engine.ready:
        status = "loading" if engine.state == "loading" else "failed"
        body = {"status": status, "model": settings.model_id}
        if engine.failure:
            body["error"] = engine.failure
        return jsonify(body), 503
    loaded = engine.loaded
    return jsonify({
        "status": "ok",
        "model": loaded.model_id,
        "revision": loaded.revision,
        "device": str(loaded.device),
        "dtype": loaded.dtype_name,
        "quantization": settings.quantize,  # "int8": linear layers hold int8 weights (app/quantization.py)
        "context_length": loaded.context_length,
        "load_seconds": round(loaded.load_seconds, 3),
        "queue_size": engine.queue_size,
        "batch_size": engine.batch_size,
        # The batch limits in force: the configured ones, or lower when the model left less memory.
        "max_batch_size": engine.max_batch_size,
        "max_batch_tokens": engine.max_batch_tokens,
        "versions": _versions(),
    })
