"""How the HTTP side waits for the engine thread without a thread of its own.

Under the server's gevent worker (app/http_worker.py) every connection is a greenlet on one event
loop in the worker's main thread, while the engine computes on a native OS thread (threads are left
unpatched, so `threading.Thread` stays native). What crosses between them goes through here:

- `Mailbox`: events the engine thread puts and one waiter takes; a waiting greenlet yields to the
  loop, and the engine wakes it through the loop's thread-safe callback (one wake-up per batch of
  events, not one per event);
- `off_loop`: work that would hold the loop for long (tokenizing a large prompt) runs on the loop's
  pool of native threads;
- `deadline`: a limit on the time a greenlet may spend reading a request body;
- `original_select`: a non-blocking look at a socket that bypasses gevent's patched `select`.

In a process without gevent's loop (Flask's test client, scripts) the same calls fall back to plain
threads: a `threading.Event`, a direct call, no deadline.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import sys
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def gevent_hub():
    """The gevent hub running in this thread when the process serves through gevent, else None."""
    gevent = sys.modules.get("gevent")
    if gevent is None:
        return None
    from gevent import monkey
    from gevent._hub_local import get_hub_if_exists  # gevent.get_hub() would make one in any thread

    if not monkey.is_module_patched("socket"):
        return None
    return get_hub_if_exists()


class Mailbox:
    """Items put by any thread, taken in order by one waiter: a greenlet of the gevent loop this
    mailbox was made on, or a plain thread. The reading side of `queue.SimpleQueue`'s interface."""

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()  # append and popleft are atomic
        hub = gevent_hub()
        if hub is None:
            self._loop = None
            self._ready = threading.Event()
        else:
            from gevent.event import Event

            self._loop = hub.loop
            self._loop_thread = hub.thread_ident
            self._ready = Event()
            self._wake_scheduled = False

    def put(self, item) -> None:
        self._items.append(item)
        if self._loop is None or threading.get_ident() == self._loop_thread:
            self._ready.set()
        elif not self._wake_scheduled:
            # A gevent Event belongs to its loop's thread: set it there. Until that callback has run,
            # further items need no second wake-up.
            self._wake_scheduled = True
            self._loop.run_callback_threadsafe(self._wake)

    def _wake(self) -> None:  # on the loop's thread
        self._wake_scheduled = False
        self._ready.set()

    def get(self, block: bool = True, timeout: float | None = None):
        """The next item; `queue.Empty` if none came within `timeout` seconds (or at once if not `block`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._items.popleft()
            except IndexError:
                pass
            self._ready.clear()
            if self._items:  # put between the popleft and the clear: its wake-up was just cleared
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if not block or (remaining is not None and remaining <= 0):
                raise queue.Empty
            self._ready.wait(remaining)

    def get_nowait(self):
        return self.get(block=False)

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


def original_select(rlist, wlist, xlist, timeout: float):
    """`select.select` as the operating system gives it, even after gevent patched the module (whose
    version would wait on the event loop)."""
    if "gevent" in sys.modules:
        from gevent import monkey

        return monkey.get_original("select", "select")(rlist, wlist, xlist, timeout)
    import select

    return select.select(rlist, wlist, xlist, timeout)


def off_loop(function: Callable[..., T], *args) -> T:
    """`function(*args)`, on a native thread of the loop's pool when called from the gevent loop (so
    other connections are served meanwhile), else right here."""
    hub = gevent_hub()
    if hub is None:
        return function(*args)
    return hub.threadpool.apply(function, args)


@contextlib.contextmanager
def deadline(seconds: float, error: Callable[[], Exception]):
    """Raise `error()` if the block runs longer than `seconds` while it waits on the gevent loop
    (reading a slow client's body, say). Without a loop the block runs unbounded: a plain-thread
    caller (Flask's test client) has its body in memory."""
    if gevent_hub() is None:
        yield
        return
    import gevent

    timer = gevent.Timeout(seconds)
    timer.start()
    try:
        yield
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        raise error() from None
    finally:
        timer.close()
