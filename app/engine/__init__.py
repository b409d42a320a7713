"""The generation engine: one thread that owns the model and batches every request continuously."""

from app.engine.engine import Engine
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
