"""The generation engine: one thread that owns the model and batches every request continuously."""

from app.engine.observer import EngineObserver
from app.engine.request import (
    Completion,
    Delta,
    EngineError,
    Finished,
    GenerationRequest,
    RequestHandle,
    Result,
    SamplingParams,
    TokenLogprob,
)

__all__ = [
    "Completion", "Delta", "Engine", "EngineError", "EngineObserver", "Finished", "GenerationRequest",
    "RequestHandle", "Result", "SamplingParams", "TokenLogprob",
]


def __getattr__(name: str):
    # `Engine` (torch) is imported on first use: the gunicorn master imports this package for its
    # request types and must not load torch before it forks the worker.
    if name == "Engine":
        from app.engine.engine import Engine

        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
