"""The gunicorn worker: gevent's event loop for the connections, a native thread for the engine.

Every connection is a greenlet, so an idle, slow or streaming client costs a little memory and a
file descriptor, never a thread: `/health` and `/metrics` are answered at once however many clients
wait, stream or dawdle. What this adds to gunicorn's own gevent worker:

- threads are not monkey-patched, so the engine's `threading.Thread` is a real OS thread whose
  computation never runs on the event loop (app/concurrency.py carries events across);
- a client gets HEADER_TIMEOUT seconds to send a request's line and headers (counted again for each
  request on a kept-alive connection), then the connection is closed;
- gunicorn's own refusals (a malformed request line, a URL over 8190 bytes, too many or too large
  headers) answer with the same JSON error body as the app instead of an HTML page;
- on SIGTERM the connections already waiting in the listening socket's backlog are accepted (and
  answered 503 by the draining app) before the socket closes, so none is reset; requests running go
  on for up to GRACEFUL_TIMEOUT, and kept-alive connections left idle are closed after a short grace.
"""

from __future__ import annotations

import json
import time

import gevent
from gevent import monkey
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

# How long, once draining, a kept-alive connection may still bring one more request (answered 503
# with `Connection: close`) before it is closed.
IDLE_GRACE_SECONDS = 2.0


class Worker(GeventWorker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = self.app.config["header_timeout"]  # `app` is app.master.Server
        self._waiting_for_request: dict = {}  # greenlet -> its header timer, while it waits for a request

    def patch(self) -> None:
        # Everything but threads and queues: the engine thread, the model loader's thread pool and the
        # timers stay native threads, and what they hand each other must be native queues. Not ssl
        # either: the server speaks plain HTTP, and the model downloads (on the engine's native thread,
        # through libraries that imported ssl before the fork) keep the standard blocking ssl. Not
        # subprocess: the app is built on a native thread (app/booting.py), where imports run
        # `ldconfig` through it, and gevent's version can only wait for a child on the main loop.
        monkey.patch_all(thread=False, queue=False, ssl=False, subprocess=False)
        self.sockets = [gevent.socket.socket(s.FAMILY, gevent.socket.SOCK_STREAM, fileno=s.sock.detach())
                        for s in self.sockets]

    def init_process(self) -> None:
        # gunicorn writes its own refusals with util.write_error: make those JSON, in this process only.
        util.write_error = write_json_error
        super().init_process()

    def timeout_ctx(self):
        """Bounds the wait for a request's line and headers (gunicorn enters it around each one)."""
        return _WaitForRequest(self, self.header_timeout)

    def run(self) -> None:
        servers = []
        for listener in self.sockets:
            listener.setblocking(1)
            server = StreamServer(listener, handle=lambda client, addr, listener=listener: self.handle(
                listener, client, addr), spawn=Pool(self.worker_connections))
            server.start()
            servers.append(server)

        while self.alive:
            self.notify()
            gevent.sleep(0.5)

        # SIGTERM (the app is draining already, see app/draining.py).
        started = time.monotonic()
        for server in servers:
            server.stop_accepting()
            while True:  # what is in the backlog now gets an answer, not a reset
                accepted = server.do_read()
                if not accepted:
                    break
                server.do_handle(*accepted)
            server.close()

        def busy() -> bool:
            return any(server.pool.free_count() != server.pool.size for server in servers)

        grace_over = started + IDLE_GRACE_SECONDS
        while busy() and time.monotonic() - started <= self.cfg.graceful_timeout:
            if time.monotonic() >= grace_over:
                self._close_idle_connections()
            self.notify()
            gevent.sleep(0.1)
        if busy():
            self.log.warning("GRACEFUL_TIMEOUT is over: closing %d connection(s)",
                             sum(server.pool.size - server.pool.free_count() for server in servers))
            for server in servers:
                server.stop(timeout=1)

    def _close_idle_connections(self) -> None:
        """End every kept-alive connection waiting for its next request (its timer, raised in it,
        ends the wait quietly and gunicorn closes the connection)."""
        loop = gevent.get_hub().loop
        for greenlet, timer in list(self._waiting_for_request.items()):
            loop.run_callback(self._end_wait, greenlet, timer)

    def _end_wait(self, greenlet, timer) -> None:
        # On the hub, so nothing runs in between: only a connection still waiting is ended, never one
        # that has meanwhile begun a request.
        if self._waiting_for_request.get(greenlet) is timer:
            greenlet.throw(timer)


class _WaitForRequest:
    """`with` block around the reading of one request's line and headers: at most `seconds`, then the
    block is left quietly without a request (gunicorn then closes the connection)."""

    def __init__(self, worker: Worker, seconds: float):
        self.worker = worker
        self.timer = gevent.Timeout(seconds, False)

    def __enter__(self):
        self.timer.start()
        self.worker._waiting_for_request[gevent.getcurrent()] = self.timer
        return self

    def __exit__(self, kind, value, traceback):
        self.worker._waiting_for_request.pop(gevent.getcurrent(), None)
        return self.timer.__exit__(kind, value, traceback)


def write_json_error(sock, status: int, reason: str, message: str) -> None:
    """gunicorn's refusal of a request the app never saw, in the app's error shape."""
    body = json.dumps({"error": {
        "message": message or reason,
        "type": "invalid_request_error" if status < 500 else "server_error",
        "param": None,
        "code": reason.lower().replace(" ", "_"),
    }}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1")
    util.write_nonblock(sock, head + body)
