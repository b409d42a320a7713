"""Logs through the real server: access lines with request ids and tokens, boot lines, LOG_FORMAT=json."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests

from tests import sse

GENERATE = {"text": {"plain": "Hello world"}, "max_new_tokens": 5}


def wait_for_line(server, pattern: str, timeout: float = 30) -> str:
    """The first log line matching `pattern` (access lines are written when the response has ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log.split("\n"):
            if re.search(pattern, line):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line matches {pattern!r}:\n{server.log[-3000:]}")


JSON_LOGS = {"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}
WARNINGS_ONLY = {"LOG_LEVEL": "warning"}


@pytest.fixture(scope="module", autouse=True)
def _boot_servers_early(boot_early):
    boot_early("json_server", **JSON_LOGS)
    boot_early("test_log_level_hides_access_lines", **WARNINGS_ONLY)


@pytest.fixture(scope="module")
def json_server(start_server):
    return start_server(shared=True, **JSON_LOGS)


def json_lines(server) -> list[dict]:
    lines = [line for line in server.log.split("\n") if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return parsed


def access_entry(server, request_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in json_lines(server):
            if entry.get("logger") == "app.access" and entry.get("request_id") == request_id:
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}")


def test_text_access_line_has_id_status_tokens_and_duration(gpt2_server):
    response = requests.post(gpt2_server.url + "/generate", json=GENERATE, timeout=60)
    rid = response.headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid)
    usage = response.json()["usage"]
    line = wait_for_line(gpt2_server, f"id={rid}")
    assert re.search(
        rf"INFO app\.access: 127\.0\.0\.1 POST /generate 200 in={usage['prompt_tokens']} "
        rf"out={usage['completion_tokens']} \d+\.\d{{3}}s id={rid}$", line), line


def test_client_request_id_is_kept_and_returned(gpt2_server):
    response = requests.get(gpt2_server.url + "/health", headers={"X-Request-ID": "trace-42.a_b"}, timeout=30)
    assert response.headers["X-Request-ID"] == "trace-42.a_b"
    wait_for_line(gpt2_server, r"GET /health 200 in=- out=- [\d.]+s id=trace-42\.a_b$")
    # An id that is too long or has spaces is replaced, not copied into logs and headers.
    for sent in ("x" * 200, "two words", "a\tb"):
        got = requests.get(gpt2_server.url + "/health", headers={"X-Request-ID": sent}, timeout=30)
        assert re.fullmatch(r"[0-9a-f]{32}", got.headers["X-Request-ID"]), sent


def test_every_answer_carries_a_request_id(gpt2_server):
    answers = [
        requests.get(gpt2_server.url + "/nope", timeout=30),
        requests.post(gpt2_server.url + "/generate", data="not json", timeout=30),
        requests.delete(gpt2_server.url + "/generate", timeout=30),
        requests.post(gpt2_server.url + "/generate_stream", json=GENERATE, timeout=60),
    ]
    assert [a.status_code for a in answers] == [404, 400, 405, 200]
    assert all(a.headers.get("X-Request-ID") for a in answers)


def test_json_logs_are_one_object_per_line(json_server):
    # Boot: gunicorn's own lines and the app's are JSON too; they say model, revision, device,
    # dtype, load time and limits.
    entries = json_lines(json_server)
    assert any(e["logger"] == "gunicorn.error" and e["message"].startswith("Starting gunicorn") for e in entries)
    serving = next(e for e in entries if e["logger"] == "app.factory" and e["message"].startswith("serving"))
    assert serving["model"] == "test-org/tiny-gpt2" and serving["revision"] == "main"
    assert serving["limits"]["max_new_tokens"] == 1024 and "max_batch_size" in serving["limits"]
    loaded = next(e for e in entries if e["message"].startswith("loaded model"))
    assert re.search(r"test-org/tiny-gpt2 \(revision main, .*\) on cpu as float32 in [\d.]+ s", loaded["message"])
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry


def test_json_access_line_of_a_stream(json_server):
    with requests.post(json_server.url + "/generate_stream", json=GENERATE, headers={"X-Request-ID": "stream-1"},
                       stream=True, timeout=60) as response:
        events = sse.json_events(sse.chunks_of(response))
    usage = events[-1]["usage"]
    entry = access_entry(json_server, "stream-1")
    assert entry["level"] == "INFO"
    assert entry["method"] == "POST" and entry["path"] == "/generate_stream" and entry["status"] == 200
    assert entry["prompt_tokens"] == usage["prompt_tokens"]
    assert entry["completion_tokens"] == usage["completion_tokens"]
    assert entry["duration_s"] > 0 and entry["client"] == "127.0.0.1"


def test_json_access_line_of_openai_and_errors(json_server):
    completion = requests.post(json_server.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3},
                               headers={"X-Request-ID": "cmpl-7"}, timeout=60).json()
    entry = access_entry(json_server, "cmpl-7")
    assert entry["route"] == "/v1/completions"
    assert entry["prompt_tokens"] == completion["usage"]["prompt_tokens"]
    assert entry["completion_tokens"] == completion["usage"]["completion_tokens"] == 6

    requests.get(json_server.url + "/v1/models/someone/else", headers={"X-Request-ID": "miss-1"}, timeout=30)
    entry = access_entry(json_server, "miss-1")
    # The route template, one label for every id, not the path asked for.
    assert entry["status"] == 404 and entry["route"].startswith("/v1/models/<") and "someone" not in entry["route"]
    assert entry["prompt_tokens"] is None and entry["completion_tokens"] is None


def test_log_level_hides_access_lines(start_server):
    server = start_server(shared=True, **WARNINGS_ONLY)
    requests.post(server.url + "/generate", json=GENERATE, timeout=60)
    requests.get(server.url + "/health", timeout=30)
    assert "app.access" not in server.log
    assert "Starting gunicorn" not in server.log  # gunicorn's INFO lines follow LOG_LEVEL too
