"""Admission, the bounded queue, expiry and cancellation, with no model and no engine thread."""

from __future__ import annotations

import pytest

from app.engine.request import GenerationRequest, QueueFullError, QueueTimeoutError, RequestHandle
from app.engine.scheduler import Scheduler


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def handle(n: int = 1, prompt: int = 10, new: int = 20, clock: Clock | None = None) -> RequestHandle:
    h = RequestHandle(GenerationRequest(prompt_ids=tuple(range(prompt)), max_new_tokens=new, n=n))
    if clock is not None:
        h.submitted_at = clock.now
    return h


def scheduler(**limits) -> Scheduler:
    settings = dict(max_batch_size=4, max_batch_tokens=10_000, max_queue=2, queue_timeout=5.0) | limits
    return Scheduler(**settings)


def test_a_burst_of_free_rows_plus_queue_places_is_admitted_in_full():
    s = scheduler()
    for _ in range(4 + 2):
        s.submit(handle())
    with pytest.raises(QueueFullError) as refused:
        s.submit(handle())
    assert "MAX_QUEUE=2" in str(refused.value)
    assert len(s) == 6 and s.queued == 2
    assert len(s.take()) == 4  # the free rows join at the next step
    assert s.queued == 2


def test_running_rows_leave_fewer_free_rows():
    s = scheduler()
    s.set_running(rows=3, longest=30)
    for _ in range(1 + 2):
        s.submit(handle())
    with pytest.raises(QueueFullError):
        s.submit(handle())
    s.set_running(rows=0, longest=0)  # the running requests finished: room again
    s.submit(handle())


def test_a_request_of_several_rows_needs_that_many_free_rows():
    s = scheduler(max_queue=1)
    s.set_running(rows=2, longest=30)
    s.submit(handle(n=3))  # does not fit the 2 free rows: it is queued
    assert s.queued == 1
    with pytest.raises(QueueFullError):
        s.submit(handle(n=1))  # first come first served: it may not overtake, so it would queue too
    assert s.take() == []


def test_take_is_first_come_first_served_within_the_token_budget():
    s = scheduler(max_batch_tokens=100, max_queue=5)
    first, second, third = handle(new=20), handle(new=40), handle(new=10)
    for h in (first, second, third):
        s.submit(h)
    # 2 rows x 50 tokens fit 100; a third row would need 3 x 50.
    assert s.take() == [first, second]
    assert s.take() == []
    s.set_running(rows=0, longest=0)
    assert s.take() == [third]


def test_take_with_a_prompt_budget_admits_one_group_and_keeps_the_rest_joinable():
    s = scheduler(max_queue=0)
    burst = [handle(prompt=30) for _ in range(4)]
    for h in burst:
        s.submit(h)  # 4 free rows: none of them is queued
    assert s.take(prompt_tokens=64) == burst[:2]
    assert s.queued == 0  # the others still join at the next steps, so they hold no queue place
    with pytest.raises(QueueFullError):
        s.submit(handle())
    assert s.take(prompt_tokens=10) == burst[2:3]  # a prompt longer than the budget goes alone
    assert s.take(prompt_tokens=64) == burst[3:]


def test_a_request_alone_may_exceed_the_token_budget():
    s = scheduler(max_batch_tokens=16)
    big = handle(prompt=10, new=20)
    s.submit(big)
    assert s.take() == [big]


def test_waiting_too_long_is_refused_with_queue_timeout():
    clock = Clock()
    s = Scheduler(max_batch_size=1, max_batch_tokens=10_000, max_queue=4, queue_timeout=5.0, clock=clock)
    s.set_running(rows=1, longest=30)
    early, late = handle(clock=clock), None
    s.submit(early)
    clock.now += 3
    late = handle(clock=clock)
    s.submit(late)
    clock.now += 2.5
    s.expire()
    assert isinstance(early.events.get_nowait(), QueueTimeoutError)
    assert late.events.empty()
    assert len(s) == 1


def test_cancelled_waiting_requests_leave_the_queue_silently():
    s = scheduler(max_batch_size=1)
    s.set_running(rows=1, longest=30)
    gone, kept = handle(), handle()
    s.submit(gone)
    s.submit(kept)
    gone.cancel()
    s.expire()
    assert len(s) == 1 and gone.events.empty()
    s.set_running(rows=0, longest=0)
    assert s.take() == [kept]


def test_drain_empties_the_queue():
    s = scheduler()
    handles = [handle() for _ in range(3)]
    for h in handles:
        s.submit(h)
    assert s.drain() == handles
    assert len(s) == 0
