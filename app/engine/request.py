"""What the HTTP layer hands the engine, and what it gets back.

An HTTP thread builds a `GenerationRequest`, submits it and receives a `RequestHandle`: a queue of
`Delta` events (one per sequence per step that produced text or finished) ending with a
`Finished` event, or an `EngineError` if the request was refused or failed.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from app.concurrency import Mailbox


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # >= 1 = off
    typical_p: float = 1.0  # >= 1 = off
    min_p: float = 0.0  # keep tokens at least this fraction as likely as the most likely one; 0 = off
    repetition_penalty: float = 1.0  # HF-style, over prompt and output; 1 = off
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    n: int = 1  # sequences that share one prefill
    stop: tuple[str, ...] = ()
    min_new_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off, k = the chosen token's log-probability and the top k alternatives
    prompt_logprobs: bool = False  # log-probabilities of the prompt tokens too (OpenAI `echo` + `logprobs`)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def rows(self) -> int:
        return self.n

    @property
    def max_total_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Delta:
    """New output of one sequence: text that is safe to show, the tokens that produced it, and
    `finish_reason` ("stop", "length" or "cancelled") on the sequence's last delta."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Finished:
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Result:
    completions: list[Completion]
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None


class EngineError(Exception):
    """A request could not be served. `status` is the HTTP status the API layer should answer with."""

    status = 500
    code = "engine_error"
    retry_after: int | None = None


class QueueFullError(EngineError):
    status = 503
    code = "queue_full"
    retry_after = 1


class QueueTimeoutError(EngineError):
    status = 503
    code = "queue_timeout"
    retry_after = 1


class EngineUnavailableError(EngineError):
    status = 503
    code = "engine_unavailable"
    retry_after = 5


class InvalidRequestError(EngineError):
    """A request's parameters cannot be served; only that request is refused."""

    status = 422
    code = "invalid_request"


class GenerationFailedError(EngineError):
    status = 500
    code = "generation_failed"


class RequestHandle:
    """The HTTP side of one submitted request: the engine thread puts events into `events`, the
    connection's greenlet (or, without gevent, its thread) reads them without holding a thread."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.events = Mailbox()
        self.submitted_at = time.monotonic()
        self.tokens_received = 0  # generated tokens read so far, over all sequences (for the access log)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """Ask the engine to drop this request's sequences; they leave the batch at the next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def stream(self, poll_seconds: float | None = None, still_wanted=None) -> Iterator[Delta | Finished]:
        """Yield events until `Finished`; raise the `EngineError` the engine reported.

        `still_wanted`, if given, is called every `poll_seconds` while waiting; when it returns
        False (the client went away) the request is cancelled and the iteration ends.
        """
        next_check = time.monotonic() + (poll_seconds or 0)
        while True:
            try:
                event = self.events.get(timeout=poll_seconds)
            except queue.Empty:
                event = None
            # Checked on a clock, not only when idle: while tokens flow the queue is never empty.
            if still_wanted is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + poll_seconds
                if not still_wanted():
                    self.cancel()
                    return
            if event is None:
                continue
            if isinstance(event, EngineError):
                raise event
            if isinstance(event, Delta):
                self.tokens_received += len(event.token_ids)
            yield event
            if isinstance(event, Finished):
                return

    def result(self, poll_seconds: float | None = None, still_wanted=None) -> Result | None:
        """Collect the whole answer; None if the client went away first."""
        completions = [Completion(index=i) for i in range(self.request.n)]
        for event in self.stream(poll_seconds, still_wanted):
            if isinstance(event, Finished):
                return Result(completions, event.prompt_tokens, event.completion_tokens, event.prompt_logprobs)
            completion = completions[event.index]
            completion.text += event.text
            completion.token_ids.extend(event.token_ids)
            if event.logprobs is not None:
                completion.logprobs = (completion.logprobs or []) + event.logprobs
            if event.finish_reason:
                completion.finish_reason = event.finish_reason
        return None
