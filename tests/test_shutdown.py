"""Graceful shutdown through the real server: SIGTERM while requests are running.

What a user must see: requests already running finish with their full answer; requests arriving
afterwards get a 503 JSON answer or a refused connection (which clients retry elsewhere), never a
connection reset; `/health` says the server is going away; the process exits 0.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time

import pytest
import requests

from tests import sse
from tests.conftest import PATIENT

# Seconds of work even for the tiny model: 8 sequences of 1000 tokens each.
LONG = {"text": {"plain": "Hello"}, "max_new_tokens": 1000, "do_sample": True, "num_return_sequences": 8}

pytestmark = pytest.mark.slow


class Client(threading.Thread):
    """One request in its own thread; `outcome` is what its user got: an answer, or the error."""

    def __init__(self, url: str, path: str, body: dict, stream: bool):
        super().__init__(daemon=True)
        self.url, self.path, self.body, self.stream = url, path, body, stream
        self.status: int | None = None
        self.answer = None
        self.error: Exception | None = None

    def run(self):
        try:
            with requests.post(self.url + self.path, json=self.body, stream=True, timeout=300) as response:
                self.status = response.status_code
                if self.stream and response.status_code == 200:
                    # A spec-compliant reader: generated text may hold U+2028 and friends raw, which
                    # str.splitlines() would take for line ends.
                    self.answer = sse.json_events(sse.chunks_of(response))
                else:
                    self.answer = response.json()
        except Exception as exc:  # what the user would see: recorded, then asserted on
            self.error = exc


def wait_until(condition, what: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def first_tokens(server) -> float:
    """Requests that have produced their first token so far (they are generating, or done)."""
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    line = next(line for line in metrics.splitlines() if line.startswith("gpt_server_time_to_first_token_seconds_count"))
    return float(line.split()[-1])


def new_connection_outcome(server) -> str:
    """What a brand-new client gets now: "answered <status>", "refused", or the error (a reset...)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", "/health")
        return f"answered {connection.getresponse().status}"
    except ConnectionRefusedError:
        return "refused"
    except Exception as exc:
        return f"error {type(exc).__name__}: {exc}"
    finally:
        connection.close()


LONG_GRACE = {"GRACEFUL_TIMEOUT": 120, "MAX_NUM_RETURN_SEQUENCES": 8}
# Four requests of 8 x 1000 tokens through a batch of 8 sequences: far more than 3 seconds of work.
SHORT_GRACE = {"GRACEFUL_TIMEOUT": 3, "MAX_BATCH_SIZE": 8, "MAX_NUM_RETURN_SEQUENCES": 8}


@pytest.fixture(scope="module", autouse=True)
def _boot_servers_early(boot_early):
    boot_early("test_running_requests_finish_and_nothing_is_reset", **LONG_GRACE)
    boot_early("test_requests_still_running_at_the_limit_get_an_answer_not_a_reset", **SHORT_GRACE)
    boot_early("test_idle_kept_alive_connections_do_not_hold_up_the_exit", **PATIENT)


def test_running_requests_finish_and_nothing_is_reset(start_server):
    server = start_server(shared=True, **LONG_GRACE)
    streaming = Client(server.url, "/generate_stream", LONG, stream=True)
    whole = Client(server.url, "/generate", LONG, stream=False)
    streaming.start()
    whole.start()
    wait_until(lambda: first_tokens(server) == 2, "both requests to be generating")
    kept_alive = requests.Session()  # a client with an open keep-alive connection
    assert kept_alive.get(server.url + "/health", timeout=10).status_code == 200

    server.process.send_signal(signal.SIGTERM)
    # New connections are answered until the listening socket closes (503 once the worker has the
    # signal), then refused.
    outcomes = []
    wait_until(lambda: outcomes.append(new_connection_outcome(server)) or outcomes[-1] == "refused",
               "new connections to be refused")
    # A request arriving on the already open connection is answered, not dropped: not ready.
    health = kept_alive.get(server.url + "/health", timeout=10)
    assert health.status_code == 503 and health.json()["status"] == "shutting_down"

    while streaming.is_alive() or whole.is_alive():
        outcomes.append(new_connection_outcome(server))
        time.sleep(0.05)
    assert not [outcome for outcome in outcomes if outcome.startswith("error")], outcomes
    assert outcomes[-1] == "refused"

    # Both running requests got their whole answer.
    assert streaming.error is None and whole.error is None, (streaming.error, whole.error)
    assert streaming.status == 200 and whole.status == 200
    done = streaming.answer[-1]
    assert done["done"] is True and all(done["finish_reasons"]), done
    assert len(whole.answer["sentences"]) == 8
    assert all(s["finish_reason"] in ("stop", "length") for s in whole.answer["sentences"])
    assert whole.answer["usage"]["completion_tokens"] > 8

    assert server.process.wait(60) == 0
    assert "SIGTERM: no new requests" in server.log
    assert "Shutting down: Master" in server.log


def test_requests_still_running_at_the_limit_get_an_answer_not_a_reset(start_server):
    server = start_server(shared=True, **SHORT_GRACE)
    clients = [Client(server.url, "/generate_stream" if i % 2 else "/generate", LONG, stream=bool(i % 2))
               for i in range(4)]
    for client in clients:
        client.start()
    wait_until(lambda: first_tokens(server) >= 1, "the first request to be generating")

    server.process.send_signal(signal.SIGTERM)
    for client in clients:
        client.join(120)

    ended_early = 0
    for client in clients:
        assert client.error is None, client.error  # an answer, never a reset connection
        if client.stream and client.status == 200:
            last = client.answer[-1]
            if "error" in last:  # the stream ends with an error event saying why
                assert last["error"]["code"] == "engine_unavailable" and "shutting down" in \
                    last["error"]["message"], last
                ended_early += 1
            else:
                assert last["done"] is True
        elif client.status == 503:
            assert "shutting down" in client.answer["error"]["message"], client.answer
            ended_early += 1
        else:
            assert client.status == 200 and len(client.answer["sentences"]) == 8
    assert ended_early >= 1
    assert server.process.wait(60) == 0
    assert "GRACEFUL_TIMEOUT is nearly over" in server.log


def test_idle_server_exits_with_0(gpt2_server):
    server = gpt2_server  # idle now, after what other tests asked of it (a later test gets a fresh one)
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    assert new_connection_outcome(server) == "refused"


def test_idle_kept_alive_connections_do_not_hold_up_the_exit(start_server):
    server = start_server(shared=True, **PATIENT)
    idle = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    idle.request("GET", "/health")
    assert idle.getresponse().read() and idle.sock is not None  # answered, and kept alive
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    assert idle.sock.recv(1) == b""  # closed by the server, quietly
    idle.close()
    assert " ERROR " not in server.log and "Traceback" not in server.log, server.log
