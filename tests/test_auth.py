"""API keys and CORS over HTTP, with requests, curl-style headers and the openai client.

The apps are served in process (`make_live_api`, `make_api`; the warning an app without keys logs
when it is built is caught there too); what needs a process of its own (refusals of bad settings,
what the real server writes to its log) runs the real server."""

from __future__ import annotations

import logging
import subprocess
import sys

import openai
import pytest
import requests

KEYS = ("key-one-0123456789", "key-two-0123456789")
FILE_KEY = "key-from-file-0123456789"
ORIGIN = "https://app.example.com"
GENERATE = {"text": {"plain": "Hello"}, "max_new_tokens": 3}


@pytest.fixture(scope="module")
def server(make_live_api, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    key_file.write_text(f"# one key per line\n\n  {FILE_KEY}  \n")
    return make_live_api(API_KEY=",".join(KEYS), API_KEY_FILE=str(key_file), CORS_ORIGINS=ORIGIN)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def refused_count(server) -> float:
    text = requests.get(server.url + "/metrics", headers=bearer(KEYS[0]), timeout=30).text
    line = next(line for line in text.splitlines()
                if line.startswith('gpt_server_requests_refused_total{reason="unauthorized"}'))
    return float(line.split()[-1])


def assert_refused(response: requests.Response, code: str) -> dict:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == code, error
    return error


def test_every_route_but_health_needs_a_key(server):
    health = requests.get(server.url + "/health", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    before = refused_count(server)
    routes = [("post", "/generate"), ("post", "/"), ("post", "/generate_stream"), ("post", "/v1/completions"),
              ("post", "/v1/chat/completions"), ("get", "/v1/models"), ("get", "/v1/models/test-org/tiny-gpt2"),
              ("get", "/metrics"), ("get", "/openapi.json")]
    for method, path in routes:
        response = requests.request(method, server.url + path, json=GENERATE, timeout=30)
        error = assert_refused(response, "missing_api_key")
        assert "Authorization: Bearer" in error["message"], error
    # The original API's routes keep their `detail` list on this error too.
    assert requests.post(server.url + "/generate", json=GENERATE, timeout=30).json()["detail"]
    assert refused_count(server) - before == len(routes) + 1


def test_wrong_keys_are_refused(server):
    before = refused_count(server)
    wrong = [bearer("key-one"), bearer(KEYS[0] + "x"), bearer(KEYS[0].upper()), {"X-API-Key": "nope"},
             {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": KEYS[0]}, bearer("")]
    for headers in wrong:
        response = requests.post(server.url + "/generate", json=GENERATE, headers=headers, timeout=30)
        assert response.status_code == 401, headers
    response = requests.post(server.url + "/generate", json=GENERATE, headers=bearer("nope"), timeout=30)
    assert_refused(response, "invalid_api_key")
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert refused_count(server) - before == len(wrong) + 1


@pytest.mark.parametrize("headers", [
    bearer(KEYS[0]),
    bearer(KEYS[1]),
    bearer(FILE_KEY),
    {"Authorization": f"bearer {KEYS[1]}"},
    {"X-API-Key": KEYS[0]},
    {"X-API-Key": FILE_KEY},
    {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": KEYS[1]},
], ids=["bearer-1", "bearer-2", "bearer-file", "lowercase-scheme", "x-api-key", "x-api-key-file", "basic+x-api-key"])
def test_any_accepted_key_in_either_header_works(server, headers):
    response = requests.post(server.url + "/generate", json=GENERATE, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["sentences"][0]["generated_text"].startswith("Hello")


def test_openai_client_sends_its_key(server, tiny_models):
    model = str(tiny_models.folders["gpt2"])  # the in-process app serves tiny GPT-2 from its folder
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[1], max_retries=0)
    completion = client.completions.create(model=model, prompt="Hello", max_tokens=3)
    assert completion.usage.completion_tokens == 3
    assert [m.id for m in client.models.list()] == [model]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          seed=1)
    assert chat.choices[0].message.role == "assistant" and 1 <= chat.usage.completion_tokens <= 2
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=model, prompt="Hello", max_tokens=3)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)


def test_docs_page_is_public_but_the_document_is_not(server):
    page = requests.get(server.url + "/docs", timeout=30)
    assert page.status_code == 200 and "swagger-ui" in page.text
    assert requests.get(server.url + "/docs/swagger-ui.css", timeout=30).status_code == 200
    assert requests.get(server.url + "/openapi.json", timeout=30).status_code == 401
    document = requests.get(server.url + "/openapi.json", headers=bearer(KEYS[0]), timeout=30).json()
    assert document["paths"]["/generate"]["post"]["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}]
    assert document["paths"]["/health"]["get"]["security"] == []
    assert "401" in document["paths"]["/v1/completions"]["post"]["responses"]


def test_compose_healthcheck_works_with_a_key(server):
    """compose.yaml's healthcheck command (no key) against a server that has keys."""
    probe = (f"import urllib.request; urllib.request.urlopen('{server.url}/health', timeout=4)")
    assert subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 0


def test_cors_preflight_and_answers_for_the_configured_origin(server):
    preflight = requests.options(server.url + "/v1/completions", timeout=30, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    })
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    allowed = preflight.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]

    answer = requests.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                           headers={"Origin": ORIGIN, **bearer(KEYS[0])}, timeout=60)
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Request-ID" in answer.headers["Access-Control-Expose-Headers"]

    stranger = requests.options(server.url + "/v1/completions", timeout=30, headers={
        "Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in stranger.headers


def test_no_cors_and_a_warning_without_a_key_beyond_localhost(make_live_api, caplog):
    with caplog.at_level(logging.WARNING, logger="app"):
        server = make_live_api(HOST="0.0.0.0")
    answer = requests.get(server.url + "/v1/models", headers={"Origin": ORIGIN}, timeout=30)
    assert answer.status_code == 200  # no key set: open
    assert "Access-Control-Allow-Origin" not in answer.headers
    assert "no API key is set and the server listens on 0.0.0.0" in caplog.text


def test_no_warning_on_localhost(gpt2_server):
    assert "no API key is set" not in gpt2_server.log


@pytest.mark.parametrize("settings, message", [
    ({"API_KEY_FILE": "/nonexistent/keys.txt"}, "setting API_KEY_FILE='/nonexistent/keys.txt' is invalid: no such file"),
    ({"API_KEY": "good-key,,other-key"}, "setting API_KEY='<hidden>' is invalid: a key between commas is empty"),
    ({"API_KEY": "has space"}, "printable ASCII"),
    ({"CORS_ORIGINS": "example.com"}, "setting CORS_ORIGINS='example.com' is invalid"),
], ids=["missing-key-file", "empty-key", "space-in-key", "bad-origin"])
def test_bad_auth_settings_stop_the_server_with_a_clear_line(start_server, settings, message):
    server = start_server(wait=False, **settings)
    assert server.process.wait(60) == 2
    assert message in server.log
    assert "good-key" not in server.log  # keys never appear in messages


def test_empty_key_file_is_refused(start_server, tmp_path):
    empty = tmp_path / "keys.txt"
    empty.write_text("# no keys yet\n\n")
    server = start_server(wait=False, API_KEY_FILE=empty)
    assert server.process.wait(60) == 2
    assert "the file holds no key" in server.log
