"""Hooks through which the engine reports what it does (the metrics module implements them).

The default does nothing, so the engine runs the same with or without metrics.
"""

from __future__ import annotations


class EngineObserver:
    def queued(self) -> None:
        """A request entered the waiting queue."""

    def refused(self, reason: str) -> None:
        """A request was turned away: "queue_full" or "queue_timeout"."""

    def admitted(self, waited_seconds: float) -> None:
        """A request left the queue for the batch after waiting this long."""

    def prefilled(self, requests: int, prompt_tokens: int, seconds: float) -> None:
        """New requests' prompts ran through the model together."""

    def first_token(self, seconds_since_submit: float) -> None:
        """A request's first token was chosen (time to first token)."""

    def decoded(self, rows: int, seconds: float) -> None:
        """One decoding step produced a token for each of `rows` sequences (inter-token latency)."""

    def cancelled(self) -> None:
        """A request was dropped because its client went away."""

    def finished(self, outcome: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        """A request ended: "finished", "cancelled" or "failed"; `seconds` since it was submitted."""
