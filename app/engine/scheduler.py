"""Which requests wait, which join the batch next, and which are refused.

One bounded queue, first come first served. A submit is refused only when the batch's free rows
and the queue's places are all taken: requests that will join the batch at the next step do not
count as queued, so a burst of (free rows + MAX_QUEUE) requests is admitted in full. Waiting
requests are dropped when their client cancels and refused after QUEUE_TIMEOUT.

The scheduler knows nothing of the model: the engine tells it what the running batch holds
(`set_running`) and takes what fits (`take`). Every method is safe to call from any thread.
"""

from __future__ import annotations

import collections
import threading
import time

from app.engine.observer import EngineObserver
from app.engine.request import QueueFullError, QueueTimeoutError, RequestHandle


class Scheduler:
    def __init__(self, *, max_batch_size: int, max_batch_tokens: int, max_queue: int, queue_timeout: float,
                 observer: EngineObserver | None = None, clock=time.monotonic):
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.observer = observer or EngineObserver()
        self._clock = clock
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running_rows = 0
        self._running_longest = 0  # the longest prompt + new tokens of any running row
        self._lock = threading.Condition()
        self._stopping = False

    # ---- any thread -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def queued(self) -> int:
        """Waiting requests that will not join the batch at the next step."""
        with self._lock:
            return len(self._waiting) - self._joinable(self._waiting)

    def submit(self, handle: RequestHandle) -> None:
        """Queue `handle`, or raise QueueFullError when free rows and queue places are all taken."""
        with self._lock:
            candidates = [*self._waiting, handle]
            queued = len(candidates) - self._joinable(candidates)
            if queued > self.max_queue:
                self.observer.refused("queue_full")
                raise QueueFullError(
                    f"the server is at capacity: every batch row is taken and {queued - 1} requests are "
                    f"already waiting (MAX_QUEUE={self.max_queue}); retry later"
                )
            self._waiting.append(handle)
            self._lock.notify()
        self.observer.queued()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()

    # ---- the engine thread ----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def wait_for_work(self, timeout: float) -> bool:
        """Block while nothing waits (up to `timeout`); True when there is something to do."""
        with self._lock:
            if not self._waiting and not self._stopping:
                self._lock.wait(timeout)
            return bool(self._waiting) and not self._stopping

    def set_running(self, rows: int, longest: int) -> None:
        """What the batch holds now: its rows and the longest prompt + new tokens among them."""
        with self._lock:
            self._running_rows, self._running_longest = rows, longest

    def expire(self) -> None:
        """Drop cancelled waiting requests; refuse those that waited longer than QUEUE_TIMEOUT."""
        now = self._clock()
        with self._lock:
            cancelled = [h for h in self._waiting if h.cancelled]
            late = [h for h in self._waiting if not h.cancelled and now - h.submitted_at > self.queue_timeout]
            for handle in (*cancelled, *late):
                self._waiting.remove(handle)
        for _ in cancelled:
            self.observer.cancelled()
        for handle in late:
            self.observer.refused("queue_timeout")
            handle.events.put(QueueTimeoutError(
                f"the request waited {self.queue_timeout:g} s (QUEUE_TIMEOUT) without a place in the batch; "
                "retry later"
            ))

    def take(self, prompt_tokens: int | None = None) -> list:
        """Waiting requests that join the batch now, first come first served, and count them as running;
        with `prompt_tokens`, only as many as hold that many prompt tokens together (at least one)."""
        with self._lock:
            count = self._joinable(self._waiting)
            if count == 0 and self._waiting and self._running_rows == 0:
                count = 1  # alone, a request may exceed the token budget only if validation let it through
            if prompt_tokens is not None:
                count = min(count, _head_within(self._waiting, prompt_tokens))
            taken = [self._waiting.popleft() for _ in range(count)]
            for handle in taken:
                self._running_longest = max(self._running_longest, handle.request.max_total_tokens)
                self._running_rows += handle.request.n
        return taken

    def remove(self, handle: RequestHandle) -> bool:
        with self._lock:
            try:
                self._waiting.remove(handle)
                return True
            except ValueError:
                return False

    def drain(self) -> list[RequestHandle]:
        """Every waiting request, removed from the queue (the engine is stopping)."""
        with self._lock:
            waiting = list(self._waiting)
            self._waiting.clear()
        return waiting

    # ---- rules ----------------------------------------------------------------------------------

    def _joinable(self, waiting) -> int:
        """How many requests at the head of `waiting` fit in the batch beside the running rows."""
        rows, longest, count = self._running_rows, self._running_longest, 0
        for handle in waiting:
            request = handle.request
            new_rows = rows + request.n
            new_longest = max(longest, request.max_total_tokens)
            if new_rows > self.max_batch_size or new_rows * new_longest > self.max_batch_tokens:
                break
            rows, longest, count = new_rows, new_longest, count + 1
        return count


def _head_within(waiting, prompt_tokens: int) -> int:
    """How many requests at the head of `waiting` hold at most `prompt_tokens` prompt tokens together (at
    least one)."""
    total = 0
    for count, handle in enumerate(waiting):
        total += handle.request.prompt_tokens
        if total > prompt_tokens:
            return max(count, 1)
    return len(waiting)
