"""The engine thread: owns the model and runs the continuous-batching loop.

HTTP threads call `submit` and read their `RequestHandle`; nothing else touches the model.
Each turn of the loop admits waiting requests that fit (prefilling them together), then decodes
one token for every row. Finished and cancelled rows leave the batch at once.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
import time
from typing import Callable

import torch

from app.engine.batch import Batch, Sequence
from app.engine.observer import EngineObserver
from app.engine.request import (
    Delta,
    EngineUnavailableError,
    Finished,
    GenerationFailedError,
    GenerationRequest,
    QueueFullError,
    QueueTimeoutError,
    RequestHandle,
)
from app.engine.sampling import apply_penalties, choose_tokens, token_logprobs
from app.engine.text import IncrementalDecoder, StopStringFilter

log = logging.getLogger(__name__)


class _RequestProgress:
    """Engine-side bookkeeping of one admitted request across its rows."""

    __slots__ = ("open_rows", "completion_tokens", "prompt_logprobs", "first_token_seen", "admitted_at")

    def __init__(self, rows: int, admitted_at: float):
        self.open_rows = rows
        self.completion_tokens = 0
        self.prompt_logprobs = None
        self.first_token_seen = False
        self.admitted_at = admitted_at


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
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.observer = observer or EngineObserver()
        self._on_death = on_death  # called once the thread has died, after every request was told
        self.loaded = None  # LoadedModel once ready
        self.state = "loading"  # loading -> ready -> (failed | stopped)
        self.failure: str | None = None
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._progress: dict[RequestHandle, _RequestProgress] = {}
        self._batch: Batch | None = None
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ---- HTTP-thread side -----------------------------------------------------------------------

    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self._thread.is_alive()

    @property
    def queue_size(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        batch = self._batch
        return len(batch) if batch is not None else 0

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a request, or refuse it at once when the engine cannot take it."""
        if not self.ready:
            raise EngineUnavailableError(self._unavailable_reason())
        handle = RequestHandle(request)
        with self._wakeup:
            if len(self._waiting) >= self.max_queue:
                self.observer.refused("queue_full")
                raise QueueFullError(
                    f"the server is at capacity: {len(self._waiting)} requests are already waiting "
                    f"(MAX_QUEUE={self.max_queue}); retry later"
                )
            self._waiting.append(handle)
            self._wakeup.notify()
        self.observer.queued()
        return handle

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _unavailable_reason(self) -> str:
        if self.state == "loading":
            return "the model is still loading; retry shortly"
        if self.state == "failed" or not self._thread.is_alive():
            return f"the generation engine has stopped: {self.failure or 'unknown error'}"
        return "the server is shutting down"

    # ---- engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.loaded = self._load()
            self.state = "ready"
            with torch.inference_mode():
                self._loop()
            self.state = "stopped"
        except BaseException as exc:  # the thread must report any death, whatever killed it
            self.failure = f"{type(exc).__name__}: {exc}"
            self.state = "failed"
            log.exception("generation engine stopped")
            self._fail_everything(EngineUnavailableError(f"the generation engine has stopped: {self.failure}"))
            if self._on_death is not None:
                self._on_death()
            raise

    def _loop(self) -> None:
        while True:
            with self._wakeup:
                if self._stopping:
                    break
                if self._batch is None and not self._waiting:
                    self._wakeup.wait(timeout=0.5)
                    continue
            self._expire_waiting()
            self._admit()
            if self._batch is not None:
                self._decode_step()
        self._fail_everything(EngineUnavailableError("the server is shutting down"))

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        with self._wakeup:
            waiting = list(self._waiting)
        for handle in waiting:
            if handle.cancelled:
                self._drop_waiting(handle)
                self.observer.cancelled()
            elif now - handle.submitted_at > self.queue_timeout:
                self._drop_waiting(handle)
                self.observer.refused("queue_timeout")
                handle.events.put(QueueTimeoutError(
                    f"the request waited {self.queue_timeout:g} s (QUEUE_TIMEOUT) without a place in the batch; "
                    "retry later"
                ))

    def _drop_waiting(self, handle: RequestHandle) -> None:
        with self._wakeup:
            try:
                self._waiting.remove(handle)
            except ValueError:
                pass

    def _take_admissible(self) -> list[RequestHandle]:
        """First-come first-served: take waiting requests while the batch limits allow."""
        taken: list[RequestHandle] = []
        rows = self.batch_size
        longest = max((s.max_total_tokens for s in self._batch.sequences), default=0) if self._batch else 0
        with self._wakeup:
            while self._waiting:
                request = self._waiting[0].request
                new_rows = rows + request.n
                new_longest = max(longest, request.max_total_tokens)
                fits = new_rows <= self.max_batch_size and new_rows * new_longest <= self.max_batch_tokens
                if not fits and (rows > 0 or taken):
                    break
                # A request that is alone may exceed the token budget only if validation let it through.
                taken.append(self._waiting.popleft())
                rows, longest = new_rows, new_longest
        return taken

    def _admit(self) -> None:
        handles = self._take_admissible()
        if not handles:
            return
        now = time.monotonic()
        tokenizer = self.loaded.tokenizer
        sequences = []
        for handle in handles:
            request = handle.request
            self._progress[handle] = _RequestProgress(request.n, now)
            self.observer.admitted(now - handle.submitted_at)
            for index in range(request.n):
                sequences.append(Sequence(
                    handle=handle,
                    index=index,
                    decoder=IncrementalDecoder(tokenizer, request.prompt_ids),
                    stops=StopStringFilter(request.stop),
                    rng=_row_rng(request.sampling.seed, index),
                ))
        started = time.perf_counter()
        try:
            group, logits, prompt_logprobs = Batch.prefill(
                self.loaded.model, sequences, self._vocab_size,
                [h.request.logprobs if h.request.prompt_logprobs else None for h in handles],
            )
            for handle, logprobs in zip(handles, prompt_logprobs):
                self._progress[handle].prompt_logprobs = logprobs
            group = self._advance(group, logits)
            prompt_tokens = sum(h.request.prompt_tokens for h in handles)
            self.observer.prefilled(len(handles), prompt_tokens, time.perf_counter() - started)
        except Exception as exc:  # only the new requests were involved: fail them, keep serving
            log.exception("prefill failed for %d request(s)", len(handles))
            self._fail(handles, exc)
            return
        self._batch = Batch.concatenate([self._batch, group])

    def _decode_step(self) -> None:
        batch = self._batch
        started = time.perf_counter()
        try:
            logits = batch.forward(self.loaded.model)
            self._batch = self._advance(batch, logits)
            self.observer.decoded(len(batch), time.perf_counter() - started)
        except Exception as exc:  # every running request took part in the failed step
            log.exception("decoding step failed for a batch of %d rows", len(batch))
            self._batch = None
            self._fail(list(dict.fromkeys(s.handle for s in batch.sequences)), exc)

    @property
    def _vocab_size(self) -> int:
        return self.loaded.model.config.get_text_config().vocab_size

    def _advance(self, batch: Batch, logits: torch.Tensor) -> Batch | None:
        """Choose each row's next token, deliver the text, and keep only the rows still running."""
        logits = logits.float()
        sampling = batch.sampling
        if sampling.use_repetition or sampling.use_presence_frequency:
            scored = apply_penalties(logits, sampling, batch.prompt_seen, batch.output_counts)
        else:
            scored = logits
        scored = self._forbid_early_eos(batch, scored)
        uniforms = torch.tensor([s.rng.random() for s in batch.sequences], device=logits.device)
        tokens = choose_tokens(scored, sampling, uniforms)
        batch.record(tokens)
        wanted = [s.handle.request.logprobs for s in batch.sequences]
        top = max((k for k in wanted if k is not None), default=None)
        logprobs = token_logprobs(logits, tokens, top) if top is not None else None

        eos = self.loaded.tokenizer.eos_token_id
        keep = []
        now = time.monotonic()
        for row, (seq, token) in enumerate(zip(batch.sequences, tokens.tolist())):
            progress = self._progress.get(seq.handle)
            if progress is None:  # the request already failed or was finished elsewhere
                continue
            if seq.handle.cancelled:
                self._finish_row(seq, progress, Delta(seq.index, "", [], None, "cancelled"))
                continue
            if not progress.first_token_seen:
                progress.first_token_seen = True
                self.observer.first_token(now - seq.handle.submitted_at)
            seq.generated.append(token)
            progress.completion_tokens += 1
            request = seq.handle.request
            token_lp = None
            if logprobs is not None and request.logprobs is not None:
                entry = logprobs[row]
                token_lp = [type(entry)(entry.token_id, entry.logprob, entry.top[: request.logprobs])]
            hit_eos = token == eos and not request.ignore_eos
            text, hit_stop = ("", False) if hit_eos else seq.stops.push(seq.decoder.push(token))
            finish = None
            if hit_stop or hit_eos:
                finish = "stop"
            elif len(seq.generated) >= request.max_new_tokens:
                finish = "length"
            if finish and not hit_stop:
                text += seq.stops.push(seq.decoder.flush())[0] + seq.stops.flush()
            delta = Delta(seq.index, text, [token], token_lp, finish)
            if finish:
                self._finish_row(seq, progress, delta)
            else:
                seq.handle.events.put(delta)
                keep.append(row)
        return batch.filter(keep)

    def _forbid_early_eos(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        eos = self.loaded.tokenizer.eos_token_id
        if eos is None:
            return logits
        rows = [
            i for i, s in enumerate(batch.sequences)
            if s.handle.request.ignore_eos or len(s.generated) < s.handle.request.min_new_tokens
        ]
        if rows:
            logits = logits.clone()
            logits[rows, eos] = float("-inf")
        return logits

    def _finish_row(self, seq: Sequence, progress: _RequestProgress, delta: Delta) -> None:
        seq.handle.events.put(delta)
        progress.open_rows -= 1
        if progress.open_rows == 0:
            del self._progress[seq.handle]
            outcome = "cancelled" if seq.handle.cancelled else "finished"
            if outcome == "cancelled":
                self.observer.cancelled()
            self.observer.finished(
                outcome, seq.handle.request.prompt_tokens, progress.completion_tokens,
                time.monotonic() - seq.handle.submitted_at,
            )
            seq.handle.events.put(Finished(
                seq.handle.request.prompt_tokens, progress.completion_tokens, progress.prompt_logprobs,
            ))

    def _fail(self, handles: list[RequestHandle], exc: Exception) -> None:
        reason = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else f"{type(exc).__name__}: {exc}"
        for handle in handles:
            if self._progress.pop(handle, None) is not None or handle in self._waiting:
                self._drop_waiting(handle)
                self.observer.finished("failed", handle.request.prompt_tokens, 0, time.monotonic() - handle.submitted_at)
                handle.events.put(GenerationFailedError(f"generation failed: {reason}"))
        if self.loaded is not None and self.loaded.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fail_everything(self, error: Exception) -> None:
        with self._wakeup:
            waiting = list(self._waiting)
            self._waiting.clear()
        for handle in [*waiting, *self._progress]:
            handle.events.put(error)
        self._progress.clear()
        self._batch = None


def _row_rng(seed: int | None, index: int) -> random.Random:
    """Each row draws from its own generator: a seeded request repeats whatever else is running."""
    if seed is None:
        return random.Random(int.from_bytes(os.urandom(8), "little"))
    return random.Random(f"{seed}:{index}")


def default_threads() -> int:
    """Intra-op threads = physical cores: hyper-threads only add contention to matrix work."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
