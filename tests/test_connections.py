"""Connections through the real server: idle, slow, streaming and malformed clients.

What a user must see: `/health` and `/metrics` answer while every batch row streams and the queue is
full; a request beyond the queue is refused at once (503 JSON, Retry-After), never left waiting
somewhere else; idle sockets hold up nobody; a client too slow with its headers is disconnected and
one too slow with its body gets a 408; every malformed request gets a 4xx JSON error without an
ERROR line in the log and without disturbing a well-formed request running beside it; a client
that goes away has its generation cancelled. From the first second, while the app is still being
built (torch imported, the engine started), every request gets a 503 JSON answer, not silence.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest
import requests

from tests import sse
from tests.conftest import PATIENT, ROOT, batch_size, wait_until

# Long enough to keep a row busy until the test lets go (end-of-text is ignored).
LONG_STREAM = {"prompt": "Hello", "max_tokens": 1000, "ignore_eos": True, "stream": True, "seed": 1}
SHORT = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0.8, "seed": 7}


# Two batch rows and two queue places, short header and body timeouts, a 256 KiB body limit.
SMALL = {"MAX_BATCH_SIZE": 2, "MAX_QUEUE": 2, "HEADER_TIMEOUT": 1, "BODY_TIMEOUT": 1, "MAX_BODY_BYTES": 262144,
         "QUEUE_TIMEOUT": 120}


@pytest.fixture(scope="module", autouse=True)
def _boot_servers_early(boot_early):
    boot_early("server", **SMALL)
    boot_early("test_idle_connections_hold_up_nobody", **PATIENT)


@pytest.fixture(scope="module")
def server(start_server):
    """Two batch rows and two queue places, short header and body timeouts, a 256 KiB body limit."""
    return start_server(shared=True, **SMALL)


def send_raw(server, data: bytes) -> socket.socket:
    """A connection that has sent `data` and reads nothing yet."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(data)
    return sock


def http_post(path: str, body: dict | bytes) -> bytes:
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def read_response(sock: socket.socket) -> tuple[int, dict, dict]:
    """Status, headers and JSON body of one response on a raw connection (read until closed or complete)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed without a complete response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed in the middle of the body"
        body += chunk
    return int(lines[0].split()[1]), headers, json.loads(body[:length])


def metric(server, name: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def health(server) -> dict:
    return requests.get(server.url + "/health", timeout=30).json()


def assert_error(status: int, body: dict, expected_status: int) -> None:
    assert status == expected_status, (status, body)
    assert body["error"]["message"] and body["error"]["type"], body


def test_health_answers_while_every_row_streams_and_one_queue_refuses_the_rest(server):
    cancelled_before = metric(server, "gpt_server_requests_cancelled_total")
    # Two rows streaming and two requests queued: everything this server holds.
    streams = [send_raw(server, http_post("/v1/completions", LONG_STREAM)) for _ in range(4)]
    try:
        assert wait_until(lambda: (lambda h: h["batch_size"] == 2 and h["queue_size"] == 2)(health(server)), 60)
        status = health(server)
        assert status["status"] == "ok" and status["batch_size"] == 2 and status["queue_size"] == 2
        assert requests.get(server.url + "/metrics", timeout=30).status_code == 200
        # One more is refused at once by the engine's queue: there is no other place to wait in.
        refused = requests.post(server.url + "/v1/completions", json=LONG_STREAM, timeout=30)
        assert refused.status_code == 503 and refused.headers["Retry-After"], refused.text
        assert refused.json()["error"]["code"] == "queue_full"
    finally:
        for sock in streams:
            sock.close()
    # Gone clients, running or waiting, are cancelled and free their places.
    assert wait_until(lambda: health(server)["batch_size"] == 0 and health(server)["queue_size"] == 0, 60)
    assert wait_until(lambda: metric(server, "gpt_server_requests_cancelled_total") == cancelled_before + 4, 30)


def test_a_request_is_cancelled_when_its_client_goes_away_before_the_answer(server):
    cancelled_before = metric(server, "gpt_server_requests_cancelled_total")
    body = {**LONG_STREAM, "stream": False}
    sock = send_raw(server, http_post("/v1/completions", body))
    assert wait_until(lambda: batch_size(server.url) == 1, 60)
    sock.close()
    assert wait_until(lambda: batch_size(server.url) == 0, 60)
    assert wait_until(lambda: metric(server, "gpt_server_requests_cancelled_total") == cancelled_before + 1, 30)


def test_slow_headers_are_cut_off_and_health_answers_meanwhile(server):
    slow = send_raw(server, b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")  # and nothing more
    assert health(server)["status"] == "ok"
    assert slow.recv(1024) == b""  # closed by the server after HEADER_TIMEOUT (1 s), not by our 60 s guard
    slow.close()


def test_a_body_that_does_not_arrive_in_time_gets_408(server):
    head = (b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n")
    sock = send_raw(server, head + b'{"text": {"plain": "')  # 980 bytes short, for good
    status, _, body = read_response(sock)
    sock.close()
    assert_error(status, body, 408)
    assert "BODY_TIMEOUT" in body["error"]["message"]


def completion_text(server) -> str:
    response = requests.post(server.url + "/v1/completions", json=SHORT, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_malformed_requests_get_4xx_json_and_leave_others_alone(server):
    alone = completion_text(server)
    beside: list[str] = []
    running = threading.Thread(target=lambda: beside.append(completion_text(server)))
    running.start()

    def over_raw(data: bytes) -> tuple[int, dict]:
        sock = send_raw(server, data)
        try:
            status, headers, body = read_response(sock)
        finally:
            sock.close()
        assert headers["content-type"].startswith("application/json"), headers
        return status, body

    answers = {
        "deeply nested": over_raw(http_post("/generate", b"[" * 100_000 + b"]" * 100_000)),
        "huge integer": over_raw(http_post("/generate", b'{"text": {"plain": "Hi"}, "ignored": ' + b"7" * 5000 + b"}")),
        "long URL": over_raw(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
        "large header": over_raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"),
        "bad request line": over_raw(b"NOT HTTP AT ALL\r\n\r\n"),
        "doubled slash": over_raw(b"GET /v1//models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    }
    expected = {"deeply nested": 400, "huge integer": 400, "long URL": 414, "large header": 431,
                "bad request line": 400, "doubled slash": 404}
    for name, (status, body) in answers.items():
        assert_error(status, body, expected[name])
    assert "nested too deeply" in answers["deeply nested"][1]["error"]["message"]
    assert "4300 digits" in answers["huge integer"][1]["error"]["message"]

    # A chunked body (no length announced) over MAX_BODY_BYTES is refused as too large, not as bad JSON.
    def chunks():
        yield b'{"text": {"plain": "'
        for _ in range(40):
            yield b"x" * 8192
        yield b'"}}'

    too_large = requests.post(server.url + "/generate", data=chunks(), timeout=60)
    assert_error(too_large.status_code, too_large.json(), 413)
    assert "MAX_BODY_BYTES" in too_large.json()["error"]["message"]

    running.join(120)
    assert beside == [alone]  # the seeded request beside them got exactly what it gets alone
    assert not [line for line in server.log.splitlines() if " ERROR " in line or "Traceback" in line], server.log


def test_a_prompt_too_long_for_any_tokenization_is_refused_by_its_length(server):
    # 60,000 characters cannot fit a 1,024-token context whatever the tokenizer makes of them.
    response = requests.post(server.url + "/v1/completions", json={"prompt": "word " * 12_000, "max_tokens": 1},
                             timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "60000 characters" in error["message"], error
    legacy = requests.post(server.url + "/generate", json={"text": {"plain": "word " * 12_000}}, timeout=60)
    assert legacy.status_code == 422 and legacy.json()["error"]["code"] == "context_length_exceeded", legacy.text


def test_idle_connections_hold_up_nobody(start_server):
    server = start_server(shared=True, **PATIENT)  # idle sockets stay open for the whole test
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(300)]
    try:
        answer = requests.post(server.url + "/generate", json={"text": {"plain": "Hi"}, "max_new_tokens": 4},
                               timeout=120)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4, answer.text
        with requests.post(server.url + "/v1/completions", json={**SHORT, "stream": True}, stream=True,
                           timeout=120) as stream:
            events = sse.json_events(sse.chunks_of(stream))
        assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length"), events[-1]
        assert health(server)["status"] == "ok"
    finally:
        for sock in idle:
            sock.close()


def held_server(start_server, gate):
    """A server whose worker cannot import torch until the file `gate` exists (tests/faults/)."""
    return start_server(wait=False, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests' / 'faults'}",
                        FAULT_HOLD_TORCH_UNTIL=str(gate))


def first_answer(server) -> requests.Response:
    """The first HTTP answer to `GET /health`, polled from the process's start (refused connections
    are retried: the port is not bound yet)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.process.poll() is None, f"the server exited:\n{server.log}"
        try:
            return requests.get(server.url + "/health", timeout=30)
        except requests.ConnectionError:
            time.sleep(0.02)
    raise AssertionError(f"no answer from /health:\n{server.log}")


def test_while_the_app_is_built_every_route_answers_503_json(start_server, tiny_models, tmp_path):
    gate = tmp_path / "torch-may-load"
    server = held_server(start_server, gate)
    first = first_answer(server)
    assert first.status_code == 503, first.text
    assert first.json() == {"status": "loading", "model": tiny_models.repo_ids["gpt2"]}
    assert first.headers["X-Request-ID"]
    completion = requests.post(server.url + "/v1/completions", json=SHORT, timeout=30)
    assert completion.status_code == 503 and completion.headers["Retry-After"], completion.text
    assert completion.json()["error"]["code"] == "model_not_ready", completion.text
    legacy = requests.post(server.url + "/generate", json={"text": {"plain": "Hi"}}, timeout=30)
    assert legacy.status_code == 503 and legacy.headers["Retry-After"], legacy.text
    assert legacy.json()["detail"][0]["type"] == "model_not_ready", legacy.text  # what its clients read

    gate.touch()  # torch may load now: the real app is built, the model loaded, and it serves
    server.wait_ready()
    assert completion_text(server)
    assert "app built in" in server.log


def test_sigterm_while_the_app_is_built_exits_0(start_server, tmp_path):
    server = held_server(start_server, tmp_path / "never")
    assert first_answer(server).json()["status"] == "loading"
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0, server.log


def test_an_app_that_cannot_be_built_stops_the_server(start_server, tmp_path):
    broken = tmp_path / "broken" / "torch"  # a torch installation that fails to import
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("this torch is broken")\n')
    server = start_server(wait=False, PYTHONPATH=f"{ROOT}{os.pathsep}{broken.parent}")
    assert server.process.wait(120) == 3, server.log  # gunicorn's boot error: no restart loop
    assert "the app could not be built" in server.log and "this torch is broken" in server.log
