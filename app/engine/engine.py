"""The engine thread: owns the model and runs the continuous-batching loop.

HTTP threads call `submit` and read their `RequestHandle`; nothing else touches the model.
Each turn of the loop (`run_once`) lets the scheduler expire waiting requests and admit the next
group of them (prefilled together, their first tokens sent at once), then decodes one token for every
row: a burst of requests is prefilled a group per turn, between decoding steps. Finished and
cancelled rows leave the batch at once. A failure fails only the requests that took part in it.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from typing import Callable

import torch

from app.allocator import release_free_memory
from app.engine import profiling
from app.engine.batch import Batch, ChunkedPrefill
from app.engine.observer import EngineObserver
from app.engine.profiling import section
from app.engine.request import (
    Delta,
    EngineUnavailableError,
    Finished,
    GenerationFailedError,
    InvalidRequestError,
    RequestHandle,
)
from app.engine.scheduler import Scheduler
from app.engine.step import Row, step

log = logging.getLogger(__name__)

# How long the idle engine thread sleeps before it looks again whether it should stop.
IDLE_WAIT_SECONDS = 0.5
# A prompt longer than LONG_PROMPT_TOKENS that arrives while rows are decoding is prefilled
# PREFILL_CHUNK_TOKENS per turn, between decoding steps: the running streams wait one short chunk
# per token, not a whole 900-token prompt. Shorter prompts are prefilled in groups (below); alone in
# the engine, a prompt is prefilled at once (nobody waits on it).
LONG_PROMPT_TOKENS = 256
PREFILL_CHUNK_TOKENS = 64
# Each turn admits waiting requests of at most PREFILL_GROUP_TOKENS prompt tokens together (at least
# one request), prefilled at once, and then decodes a step. In a burst, the first requests wait for one
# group, not for the whole burst; the running streams keep their pace; and since the groups start
# decoding a step apart, they finish apart, so the requests that follow them arrive spread out, not
# as one more burst. Measured with scripts/bench.py (GPT-2 small, 2 cores, 16 streams of 32-token
# prompts, 2 requests each), median time to first token in float32:
# - all groups one after another: 0.56-0.59 s; a group of 64 tokens per turn: 0.39-0.44 s (prompts
#   padded, earlier releases);
# - 128 tokens per turn, prompts packed (app/engine/prefill.py): 0.17-0.37 s and 235 tokens/s, against
#   0.29-0.34 s and 227 with 96 (five runs each);
# - skipping the decoding step while more requests wait than run: 0.37-0.41 s against 0.21-0.33 s
#   (the burst's groups then finish together, and the next requests arrive as one more burst).
# It stays near 0.3 s: the middle request of a burst of 16 has its first token only once eight
# prompts are prefilled, about 0.25 s of these cores' float32 products.
PREFILL_GROUP_TOKENS = 128


class _RequestProgress:
    """Engine-side bookkeeping of one admitted request across its rows."""

    __slots__ = ("open_rows", "completion_tokens", "prompt_logprobs", "first_token_seen")

    def __init__(self, rows: int):
        self.open_rows = rows
        self.completion_tokens = 0
        self.prompt_logprobs = None
        self.first_token_seen = False


class Engine:
    def __init__(
        self,
        load: Callable[[], "object"],
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_queue: int,
        queue_timeout: float,
        observer: EngineObserver | None = None,
        on_death: Callable[[], None] | None = None,
    ):
        self._load = load
        self.observer = observer or EngineObserver()
        self.scheduler = Scheduler(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                                   max_queue=max_queue, queue_timeout=queue_timeout, observer=self.observer)
        self._on_death = on_death  # called once the thread has died, after every request was told
        self.loaded = None  # LoadedModel once ready
        self.state = "loading"  # loading -> ready -> (failed | stopped)
        self.failure: str | None = None
        self._progress: dict[RequestHandle, _RequestProgress] = {}
        self._batch: Batch | None = None
        self._rows: list[Row] = []  # the batch's rows, in its row order
        self._chunked: collections.deque[ChunkedPrefill] = collections.deque()  # long prompts, oldest first
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ---- limits (the scheduler's) ---------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self.scheduler.max_batch_size

    @property
    def max_batch_tokens(self) -> int:
        return self.scheduler.max_batch_tokens

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @property
    def queue_timeout(self) -> float:
        return self.scheduler.queue_timeout

    # ---- HTTP-thread side -----------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self.state == "ready" and (self._thread.is_alive() or self._thread.ident is None)

    @property
    def unavailable_reason(self) -> str:
        """Why `submit` would refuse now (meaningful while not `ready`)."""
        if self.state == "loading":
            return "the model is still loading; retry shortly"
        if self.state == "failed" or not self.ready:
            return f"the generation engine has stopped: {self.failure or 'unknown error'}"
        return "the server is shutting down"

    @property
    def queue_size(self) -> int:
        return len(self.scheduler)

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    @property
    def idle(self) -> bool:
        """Nothing decodes, prefills or waits."""
        return not self._rows and not self._chunked and not len(self.scheduler)

    def submit(self, request) -> RequestHandle:
        """Queue a request, or refuse it at once when the engine cannot take it."""
        if not self.ready:
            raise EngineUnavailableError(self.unavailable_reason)
        handle = RequestHandle(request)
        self.scheduler.submit(handle)
        return handle

    def stop(self) -> None:
        self.scheduler.stop()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ---- engine thread --------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model (in the engine thread, or inline for a caller that drives `run_once`)."""
        self.loaded = self._load()
        self.state = "ready"

    def _run(self) -> None:
        try:
            self.load()
            with torch.inference_mode():
                while not self.scheduler.stopping:
                    busy = self._batch is not None or self._chunked
                    if not busy and not self.scheduler.wait_for_work(IDLE_WAIT_SECONDS):
                        continue
                    self.run_once()
            self._fail_everything(EngineUnavailableError("the server is shutting down"))
            self.state = "stopped"
        except BaseException as exc:  # the thread must report any death, whatever killed it
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.exception("generation engine stopped")
            self._fail_everything(EngineUnavailableError(f"the generation engine has stopped: {self.failure}"))
            if self._on_death is not None:
                self._on_death()
            raise

    def run_once(self) -> None:
        """One turn: expire waiting requests and admit a group of them, one chunk of a long prompt,
        then one decoding step for the batch."""
        self.scheduler.expire()
        self._admit(self.scheduler.take(PREFILL_GROUP_TOKENS))
        self._advance_chunked()
        if self._batch is not None:
            self._decode_step()
        self._report_running()

    def _report_running(self) -> None:
        rows = self._rows + [row for prefill in self._chunked for row in prefill.rows]
        self.scheduler.set_running(len(rows), max((r.max_total_tokens for r in rows), default=0))

    def _admit(self, handles: list[RequestHandle]) -> None:
        if not handles:
            return
        now = time.monotonic()
        accepted = []
        for handle in handles:
            reason = self._refusal(handle.request)
            if reason is not None:
                self.observer.finished("failed", handle.request.prompt_tokens, 0, now - handle.submitted_at)
                handle.events.put(InvalidRequestError(reason))
                continue
            self.observer.admitted(now - handle.submitted_at)
            if self._batch is not None and handle.request.prompt_tokens > LONG_PROMPT_TOKENS:
                self._progress[handle] = _RequestProgress(handle.request.n)
                rows = [Row.start(handle, i, self.loaded.tokenizer) for i in range(handle.request.n)]
                want = handle.request.logprobs if handle.request.prompt_logprobs else None
                self._chunked.append(ChunkedPrefill(rows, want))
                continue
            accepted.append(handle)
        if len(accepted) == 1:
            self._prefill(accepted)
        elif accepted and not self._prefill(accepted, report_failure=False):
            # Something in the group failed: prefill each alone, so that only the culprit fails.
            for handle in accepted:
                self._prefill([handle])

    def _refusal(self, request) -> str | None:
        """Why this one request cannot be served (its neighbours must not fail with it), or None."""
        params = request.sampling
        for name in ("temperature", "top_p", "typical_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            if not math.isfinite(getattr(params, name)):
                return f"{name} must be a finite number"
        if params.repetition_penalty <= 0:
            return "repetition_penalty must be greater than 0"
        if not request.prompt_ids:
            return "the prompt has no tokens"
        vocab = self._vocab_size
        if any(not 0 <= token < vocab for token in request.prompt_ids):
            return f"the prompt holds token ids outside the vocabulary (0 to {vocab - 1})"
        return None

    def _prefill(self, handles: list[RequestHandle], report_failure: bool = True) -> bool:
        """Prefill `handles` together and let their rows join the batch; False if it failed (the
        requests are then failed, or left untouched for a retry when not `report_failure`)."""
        tokenizer = self.loaded.tokenizer
        rows = []
        for handle in handles:
            self._progress[handle] = _RequestProgress(handle.request.n)
            rows.extend(Row.start(handle, index, tokenizer) for index in range(handle.request.n))
        started = time.perf_counter()
        try:
            group, logits, prompt_logprobs = Batch.prefill(
                self.loaded.model, rows, self._vocab_size,
                [h.request.logprobs if h.request.prompt_logprobs else None for h in handles],
            )
            deltas = self._first_tokens(handles, rows, group, logits, prompt_logprobs, started)
        except Exception as exc:  # only the new requests were involved: fail them, keep serving
            if report_failure:
                log.exception("prefill failed for %d request(s)", len(handles))
                self._fail(handles, exc)
            else:
                for handle in handles:
                    del self._progress[handle]
            return False
        self._join(rows, group, deltas)
        return True

    def _advance_chunked(self) -> None:
        """Run the next chunk of the oldest long prompt; its rows join the batch once it is done."""
        if not self._chunked:
            return
        prefill = self._chunked[0]
        if prefill.handle.cancelled:  # the client went away: stop spending chunks on it
            self._chunked.popleft()
            self._deliver(prefill.rows, [Delta(row.index, "", [], None, "cancelled") for row in prefill.rows])
            return
        started = time.perf_counter()
        try:
            prefilled = prefill.advance(self.loaded.model, PREFILL_CHUNK_TOKENS, self._vocab_size)
            if prefilled is None:
                return
            self._chunked.popleft()
            group, logits = prefilled
            deltas = self._first_tokens([prefill.handle], prefill.rows, group, logits, [prefill.prompt_logprobs],
                                        started)
        except Exception as exc:  # only this request was involved
            log.exception("prefill failed for 1 request")
            if self._chunked and self._chunked[0] is prefill:
                self._chunked.popleft()
            self._fail([prefill.handle], exc)
            return
        self._join(prefill.rows, group, deltas)

    def _first_tokens(self, handles, rows, group, logits, prompt_logprobs, started) -> list[Delta]:
        for handle, logprobs in zip(handles, prompt_logprobs):
            self._progress[handle].prompt_logprobs = logprobs
        deltas = step(logits, group, rows, self.loaded.tokenizer.eos_token_id)
        self.observer.prefilled(len(handles), sum(h.request.prompt_tokens for h in handles),
                                time.perf_counter() - started)
        return deltas

    def _join(self, rows: list[Row], group: Batch, deltas: list[Delta]) -> None:
        """The new rows that go on join the batch, then every new row's first token is delivered:
        a client never holds a token of a row that /health does not count yet."""
        joining = group.filter([i for i, delta in enumerate(deltas) if not delta.finish_reason], rows)
        self._rows = self._rows + joining
        self._batch = Batch.concatenate([self._batch, group], self._rows)
        self._deliver(rows, deltas)  # a row it drops (its request gone) leaves at the next step

    def _decode_step(self) -> None:
        batch, rows = self._batch, self._rows
        started = time.perf_counter()
        with profiling.step(len(rows)):
            try:
                with section("forward"):
                    logits = batch.forward(self.loaded.model)
                deltas = step(logits, batch, rows, self.loaded.tokenizer.eos_token_id)
            except Exception as exc:  # every running request took part in the failed step
                log.exception("decoding step failed for a batch of %d rows", len(rows))
                self._batch, self._rows = None, []
                self._fail(list(dict.fromkeys(row.handle for row in rows)), exc)
                return
            with section("bookkeeping"):
                self._rows = batch.filter(self._deliver(rows, deltas), rows)
                if not self._rows:  # no reference to the batch left, so its storage is free: hand it back
                    self._batch = batch = None
                    release_free_memory()
        self.observer.decoded(len(rows), time.perf_counter() - started)

    @property
    def _vocab_size(self) -> int:
        return self.loaded.model.config.get_text_config().vocab_size

    def _deliver(self, rows: list[Row], deltas: list[Delta]) -> list[int]:
        """Hand each row's delta to its request; return the positions of the rows still running."""
        keep = []
        now = time.monotonic()
        for position, (row, delta) in enumerate(zip(rows, deltas)):
            progress = self._progress.get(row.handle)
            if progress is None:  # the request already failed or was finished elsewhere
                continue
            if delta.token_ids and not progress.first_token_seen:
                progress.first_token_seen = True
                self.observer.first_token(now - row.handle.submitted_at)
            progress.completion_tokens += len(delta.token_ids)
            if delta.finish_reason:
                self._finish_row(row, progress, delta)
            else:
                row.handle.events.put(delta)
                keep.append(position)
        return keep

    def _finish_row(self, row: Row, progress: _RequestProgress, delta: Delta) -> None:
        handle = row.handle
        handle.events.put(delta)
        progress.open_rows -= 1
        if progress.open_rows == 0:
            del self._progress[handle]
            outcome = "cancelled" if handle.cancelled else "finished"
            if outcome == "cancelled":
                self.observer.cancelled()
            self.observer.finished(outcome, handle.request.prompt_tokens, progress.completion_tokens,
                                   time.monotonic() - handle.submitted_at)
            handle.events.put(Finished(handle.request.prompt_tokens, progress.completion_tokens,
                                       progress.prompt_logprobs))

    def _fail(self, handles: list[RequestHandle], exc: Exception) -> None:
        reason = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
        for handle in handles:
            if self._progress.pop(handle, None) is not None or self.scheduler.remove(handle):
                self.observer.finished("failed", handle.request.prompt_tokens, 0, time.monotonic() - handle.submitted_at)
                handle.events.put(GenerationFailedError(f"generation failed: {reason}"))
        if self.loaded is not None and self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail_everything(self, error: Exception) -> None:
        for handle in [*self.scheduler.drain(), *self._progress]:
            handle.events.put(error)
        self._progress.clear()
        self._batch, self._rows = None, []
        self._chunked.clear()


def default_threads() -> int:
    """Intra-op threads = physical cores: hyper-threads only add contention to matrix work."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
