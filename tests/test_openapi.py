"""`GET /openapi.json` and `GET /docs` over HTTP (in process), and a fuzzer run against the document
and the real server.

The fuzzer (schemathesis) generates requests for every operation from the document, valid and
invalid, sends them to a running server with small limits, and fails on any 5xx, any response
whose status, content type, headers or body the document does not describe, a route that ignores
the API key, a 405 without `Allow`, or a request that does not get an answer in time.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
import requests

from app.api.legacy_schemas import LegacyGenerateRequest, LegacyGenerateResponse
from app.api.chat_schemas import ChatCompletionRequest
from app.api.openai_schemas import CompletionRequest

FUZZ_KEY = "fuzz-key-0123456789"
EXPECTED_PATHS = {
    "/generate": {"post"}, "/": {"get", "post"}, "/generate_stream": {"post"},
    "/v1/completions": {"post"}, "/v1/chat/completions": {"post"}, "/v1/models": {"get"},
    "/v1/models/{model_id}": {"get"},
    "/health": {"get"}, "/metrics": {"get"}, "/openapi.json": {"get"}, "/docs": {"get"}, "/docs/{asset}": {"get"},
    "/playground/{asset}": {"get"},
}
# Everything schemathesis can check but whether the server accepts every schema-valid body (it
# cannot: the prompt must fit the context and the configured limits) or refuses every
# schema-invalid one (pydantic accepts 1.0 for an integer, "null = default" for some OpenAI fields).
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,ignored_auth,unsupported_method,allow_header_conformance,"
          "missing_required_header,use_after_free,ensure_resource_availability")


def document(server, **headers) -> dict:
    response = requests.get(server.url + "/openapi.json", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()


def resolve(doc: dict, schema: dict) -> dict:
    return doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else schema


def same_but_names(a: dict, b: dict) -> bool:
    def anonymous(schema):
        return re.sub(r'"#/components/schemas/[^"]+"', '"ref"', json.dumps(schema, sort_keys=True))

    return anonymous(a) == anonymous(b)


def test_document_describes_every_route(live_api):
    doc = document(live_api)
    assert doc["openapi"] == "3.1.0"
    assert {path: set(ops) for path, ops in doc["paths"].items()} == EXPECTED_PATHS
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            assert operation["summary"] and operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                assert "X-Request-ID" in response["headers"], (method, path, status)
    # No API key on this server: the document asks for none.
    assert "security" not in doc["paths"]["/generate"]["post"]
    assert "securitySchemes" not in doc["components"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine reports the missing model
def test_every_flask_route_is_documented():
    """A route added to any blueprint without its `@documented(...)` declaration fails here."""
    from app.factory import create_app
    from app.openapi import undocumented_routes
    from app.settings import load_settings

    app = create_app(load_settings(model_id="test-org/not-on-disk", torch_threads=1), exit_on_load_failure=False)
    assert undocumented_routes(app) == []
    app.extensions["engine"].join(60)


def test_a_server_with_api_keys_asks_for_one_where_it_needs_one(make_api):
    doc = make_api(API_KEY=FUZZ_KEY).get("/openapi.json", headers={"X-API-Key": FUZZ_KEY}).get_json()
    assert set(doc["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader"}
    generate, health = doc["paths"]["/generate"]["post"], doc["paths"]["/health"]["get"]
    assert generate["security"] == [{"bearerAuth": []}, {"apiKeyHeader": []}] and "401" in generate["responses"]
    assert health["security"] == [] and "401" not in health["responses"]


def test_bodies_come_from_the_validating_models(live_api):
    doc = document(live_api)
    schemas = doc["components"]["schemas"]
    generate = doc["paths"]["/generate"]["post"]
    request_schema = resolve(doc, generate["requestBody"]["content"]["application/json"]["schema"])
    # The very schema pydantic makes of the model that validates the body, field for field (the
    # document may give referenced models other names, e.g. LegacyUsage for the original API's Usage).
    expected = LegacyGenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    assert same_but_names(request_schema["properties"], expected["properties"])
    assert request_schema["required"] == ["text"]
    response_schema = resolve(doc, generate["responses"]["200"]["content"]["application/json"]["schema"])
    expected = LegacyGenerateResponse.model_json_schema(mode="serialization",
                                                        ref_template="#/components/schemas/{model}")
    assert same_but_names(response_schema["properties"], expected["properties"])
    assert response_schema["properties"]["usage"] == {"$ref": "#/components/schemas/Usage"}  # one for both APIs
    completion = resolve(doc, doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]
                         ["application/json"]["schema"])
    assert set(completion["properties"]) == set(CompletionRequest.model_fields)
    # Errors: one body for both APIs; the original API's add the `detail` list.
    legacy_422 = resolve(doc, generate["responses"]["422"]["content"]["application/json"]["schema"])
    openai_400 = resolve(doc, doc["paths"]["/v1/completions"]["post"]["responses"]["400"]["content"]
                         ["application/json"]["schema"])
    assert legacy_422 == openai_400 and legacy_422["required"] == ["error"] and "detail" in legacy_422["properties"]
    chat = resolve(doc, doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]
                   ["application/json"]["schema"])
    assert set(chat["properties"]) == set(ChatCompletionRequest.model_fields)
    assert "LegacyStreamDelta" in schemas and "CompletionStreamChunk" in schemas


def test_document_matches_what_the_routes_answer(live_api):
    """A real answer validates against the document's schema (a quick check; the fuzzer does more)."""
    jsonschema_rs = pytest.importorskip("jsonschema_rs")  # comes with schemathesis
    doc = document(live_api)
    answer = requests.post(live_api.url + "/generate", json={"text": {"plain": "Hi"}, "max_length": 8},
                           timeout=60).json()
    schema = {"$ref": "#/components/schemas/LegacyGenerateResponse", "components": doc["components"]}
    jsonschema_rs.Draft202012Validator(schema).validate(answer)


def test_docs_page_needs_no_internet(live_api):
    page = requests.get(live_api.url + "/docs", timeout=30)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert not re.search(r"(src|href)=\"(https?:)?//", page.text), "the page loads something from elsewhere"
    for asset, media in (("swagger-ui-bundle.js", "javascript"), ("swagger-ui.css", "text/css"),
                         ("favicon-32x32.png", "image/png")):
        response = requests.get(f"{live_api.url}/docs/{asset}", timeout=30)
        assert response.status_code == 200 and media in response.headers["Content-Type"], asset
    assert "SwaggerUIBundle" in requests.get(live_api.url + "/docs/swagger-ui-bundle.js", timeout=30).text
    assert requests.get(live_api.url + "/docs/secrets.txt", timeout=30).status_code == 404


FUZZED = {"API_KEY": FUZZ_KEY, "MAX_NEW_TOKENS": 16, "MAX_NUM_RETURN_SEQUENCES": 2, "MAX_BATCH_TOKENS": 4096}


@pytest.fixture(scope="module", autouse=True)
def _boot_servers_early(boot_early):
    boot_early("test_fuzzer_finds_no_5xx_and_no_answer_outside_the_document", **FUZZED)


@pytest.mark.slow
def test_fuzzer_finds_no_5xx_and_no_answer_outside_the_document(start_server, tmp_path):
    server = start_server(shared=True, **FUZZED)
    log_start = len(server.log.splitlines())
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
        "--header", f"Authorization: Bearer {FUZZ_KEY}",
        "--checks", CHECKS,
        "--max-examples", "40",
        "--seed", "20261125",
        "--workers", "1",
        "--request-timeout", "30",  # a request without an answer in 30 s fails the run: a stuck server
        # Path parameters may not contain "/" for the fuzzer, which filters many model ids away.
        "--suppress-health-check", "filter_too_much",
        "--generation-database", "none",
        "--report", "json", "--report-dir", str(tmp_path / "report"),
        "--no-color",
    ]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    output = run.stdout + run.stderr
    report = json.loads(next((tmp_path / "report").glob("*.json")).read_text())

    # What the server saw: one access line per request.
    statuses = Counter(
        int(match.group(1)) for line in server.log.splitlines()[log_start:]
        if (match := re.search(r" (\d{3}) in=\S+ out=\S+ [\d.]+s id=", line))
    )
    print(f"\nfuzzer: {report['test_cases']['generated']} test cases, {sum(statuses.values())} requests "
          f"answered by the server ({dict(sorted(statuses.items()))}), "
          f"{report['test_cases']['with_failures']} with failures")
    assert run.returncode == 0, output[-6000:]
    # Every operation but GET /openapi.json, which schemathesis leaves out (it is the document itself).
    assert report["operations"]["tested"] == report["operations"]["total"] == 13
    assert not any(status >= 500 for status in statuses), statuses
    assert sum(statuses.values()) >= 500  # it really ran

    # And the server is still fine afterwards.
    assert requests.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    answer = requests.post(server.url + "/generate", json={"text": {"plain": "Hello"}, "max_length": 8},
                           headers={"X-API-Key": FUZZ_KEY}, timeout=60)
    assert answer.status_code == 200
