"""`GET /health`: 503 while the model loads (or after the engine died), 200 when it can serve."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from flask import Blueprint, current_app, jsonify
from pydantic import BaseModel, Field

from app.openapi import Body, documented

bp = Blueprint("health", __name__)


class HealthResponse(BaseModel):
    """`GET /health`: 200 with the model's details when it can serve, 503 with the reason otherwise.
    Fields that do not apply to a status are left out."""

    status: str = Field(description='"ok" (200); "loading", "failed" or "shutting_down" (503)')
    model: str | None = Field(None, description="id of the model served (or being loaded)")
    revision: str | None = None
    device: str | None = Field(None, description='e.g. "cpu", "cuda:0"')
    dtype: str | None = Field(None, description='e.g. "float32", "bfloat16"')
    quantization: str | None = Field(None, description='"int8" when linear layers hold int8 weights, else "none"')
    context_length: int | None = Field(None, description="most tokens (prompt + generated) of one sequence")
    load_seconds: float | None = Field(None, description="seconds the model took to load")
    queue_size: int | None = Field(None, description="requests waiting for a place in the batch")
    batch_size: int | None = Field(None, description="sequences being generated")
    max_batch_size: int | None = Field(None, description="batch limit in force (MAX_BATCH_SIZE, or lower if memory is short)")
    max_batch_tokens: int | None = Field(None, description="token budget of the batch in force (MAX_BATCH_TOKENS, or lower)")
    versions: dict[str, str] | None = Field(None, description="Python and the main packages")
    error: str | None = Field(None, description="why the engine stopped (status failed)")


def _answer(body: HealthResponse, status: int = 200):
    return jsonify(body.model_dump(exclude_none=True)), status

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
@documented(
    "Health and readiness", "operations", public=True,
    description="200 when the model is loaded and requests are served; 503 while it loads, after the engine "
    "failed, or once the server is shutting down. Needs no API key.",
    responses={200: Body("ready", HealthResponse), 503: Body("not ready", HealthResponse)},
)
def health():
    engine = current_app.extensions["engine"]
    settings = current_app.extensions["settings"]
    if current_app.extensions.get("draining"):
        return _answer(HealthResponse(status="shutting_down"), 503)
    if not engine.ready:
        status = "loading" if engine.state == "loading" else "failed"
        return _answer(HealthResponse(status=status, model=settings.model_id, error=engine.failure or None), 503)
    loaded = engine.loaded
    return _answer(HealthResponse(
        status="ok",
        model=loaded.model_id,
        revision=loaded.revision,
        device=str(loaded.device),
        dtype=loaded.dtype_name,
        quantization=settings.quantize,  # "int8": linear layers hold int8 weights (app/model/int8.py)
        context_length=loaded.context_length,
        load_seconds=round(loaded.load_seconds, 3),
        queue_size=engine.queue_size,
        batch_size=engine.batch_size,
        # The batch limits in force: the configured ones, or lower when the model left less memory.
        max_batch_size=engine.max_batch_size,
        max_batch_tokens=engine.max_batch_tokens,
        versions=_versions(),
    ))
