"""`GET /openapi.json` (OpenAPI 3.1) and `GET /docs` (Swagger UI, served from this server).

The paths table below names, for each route, the pydantic models that validate its request and
build its responses; their JSON schemas are generated from those models at run time
(`models_json_schema`), so the document cannot drift from what the routes accept and answer.
tests/test_openapi.py checks that every route of the app is in the table, and fuzzes the running
server against the document.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib.metadata import version

from flask import Blueprint, Flask, Response, current_app, send_from_directory
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api import playground
from app.api.chat_schemas import ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse
from app.api.health import HealthResponse
from app.api.legacy_schemas import (
    LegacyGenerateRequest,
    LegacyGenerateResponse,
    LegacyStreamDelta,
    LegacyStreamDone,
)
from app.api.openai_schemas import (
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChunk,
    ModelCard,
    ModelList,
)
from app.api.protocol import ErrorResponse

bp = Blueprint("docs", __name__)

TITLE = "gpt-server"

# The Swagger UI files the docs page loads (only these: the package ships many more).
_ASSET_RULE = '/docs/<any("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):asset>'


# ---- the paths table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """One response (or request) body: a pydantic model as JSON, or raw content of a media type."""

    description: str
    model: type[BaseModel] | None = None
    media: dict[str, dict] = field(default_factory=dict)  # media type -> schema, for non-JSON content
    events: type[BaseModel] | tuple[type[BaseModel], ...] | None = None  # text/event-stream `data:` items


@dataclass(frozen=True)
class Operation:
    method: str
    rule: str  # the Flask rule, e.g. /v1/models/<path:model_id>
    summary: str
    tag: str
    description: str = ""
    request: type[BaseModel] | None = None
    responses: dict[int, Body] = field(default_factory=dict)
    generates: bool = False  # runs the model: can be refused when the server is busy, or fail
    public: bool = False  # needs no API key


def _errors(model: type[BaseModel], **statuses: str) -> dict[int, Body]:
    return {int(status.removeprefix("e")): Body(description, model) for status, description in statuses.items()}


_LEGACY_ERRORS = _errors(
    ErrorResponse,
    e400="the body is not a JSON object",
    e413="the body is larger than MAX_BODY_BYTES",
    e422="a field is invalid, or the prompt and length do not fit the model or the server's limits",
)
_OPENAI_ERRORS = _errors(
    ErrorResponse,
    e400="the body is not JSON, a field is invalid, or the prompt does not fit the context or the limits",
    e404="the model named is not the one this server serves",
    e413="the body is larger than MAX_BODY_BYTES",
)
_LEGACY_REQUEST_DOC = (
    "The original API's request. `text` is required; everything else has the original's defaults. "
    "Fields after `num_return_sequences` are additions."
)
_SSE_TEXT = "Server-sent events: one `data: <JSON>` line per event, each event one of the schemas listed."


def _legacy_generate(rule: str, summary: str) -> Operation:
    return Operation(
        "post", rule, summary, "original API", _LEGACY_REQUEST_DOC, LegacyGenerateRequest,
        {200: Body("the generated sequences, each starting with the prompt", LegacyGenerateResponse),
         **_LEGACY_ERRORS},
        generates=True,
    )


OPERATIONS: tuple[Operation, ...] = (
    _legacy_generate("/generate", "Generate text (the original API)"),
    _legacy_generate("/", "Generate text: the same as POST /generate"),
    Operation(
        "post", "/generate_stream", "Generate text as server-sent events (the original API)", "original API",
        _LEGACY_REQUEST_DOC + " The answer streams: new text of each sequence as it is generated (the prompt is "
        "not repeated), then one last event with the totals.",
        LegacyGenerateRequest,
        {200: Body(_SSE_TEXT, events=(LegacyStreamDelta, LegacyStreamDone)), **_LEGACY_ERRORS},
        generates=True,
    ),
    Operation(
        "post", "/v1/completions", "Create a completion (OpenAI-compatible)", "OpenAI-compatible",
        "OpenAI's legacy completions. With `stream: true` the answer is server-sent events ending with "
        "`data: [DONE]`.",
        CompletionRequest,
        {200: Body("the completion; server-sent events of chunks when `stream` is true", CompletionResponse,
                   events=CompletionStreamChunk),
         **_OPENAI_ERRORS},
        generates=True,
    ),
    Operation(
        "post", "/v1/chat/completions", "Create a chat completion (OpenAI-compatible)", "OpenAI-compatible",
        "OpenAI's chat completions. The messages become one prompt through the model's chat template (or "
        "CHAT_TEMPLATE, or a plain `User:`/`Assistant:` transcript for base models). Tools, functions and "
        "response formats other than text are refused. With `stream: true` the answer is server-sent "
        "events ending with `data: [DONE]`.",
        ChatCompletionRequest,
        {200: Body("the chat completion; server-sent events of chunks when `stream` is true",
                   ChatCompletionResponse, events=ChatCompletionChunk),
         **_OPENAI_ERRORS},
        generates=True,
    ),
    Operation(
        "get", "/v1/models", "List the served model (OpenAI-compatible)", "OpenAI-compatible",
        responses={200: Body("the one model this server serves", ModelList)},
    ),
    Operation(
        "get", "/v1/models/<path:model_id>", "Describe a model (OpenAI-compatible)", "OpenAI-compatible",
        responses={200: Body("the model", ModelCard), 404: Body("no such model on this server", ErrorResponse)},
    ),
    Operation(
        "get", "/health", "Health and readiness", "operations",
        "200 when the model is loaded and requests are served; 503 while it loads, after the engine "
        "failed, or once the server is shutting down. Needs no API key.",
        responses={200: Body("ready", HealthResponse), 503: Body("not ready", HealthResponse)},
        public=True,
    ),
    Operation(
        "get", "/metrics", "Prometheus metrics", "operations",
        "Every metric is prefixed `gpt_server_`; see the README's Production section.",
        responses={200: Body("metrics in Prometheus text format", media={"text/plain": {"type": "string"}})},
    ),
    Operation(
        "get", "/openapi.json", "This document", "operations",
        responses={200: Body("the OpenAPI 3.1 document", media={"application/json": {"type": "object"}})},
    ),
    Operation(
        "get", "/docs", "Browsable API documentation (Swagger UI)", "operations",
        "Needs no API key itself; when the server has keys it asks for one to load the document.",
        responses={200: Body("an HTML page", media={"text/html": {"type": "string"}})},
        public=True,
    ),
    Operation(
        "get", _ASSET_RULE, "Files of the documentation page", "operations",
        responses={
            200: Body("the file", media={t: {"type": "string"} for t in (
                "text/javascript", "application/javascript", "text/css", "image/png")}),
            404: Body("no such file", ErrorResponse),
        },
        public=True,
    ),
    Operation(
        "get", "/", "The playground: a page to try the model in a browser", "operations",
        "Needs no API key itself; when the server has keys the page asks for one and sends it with each request.",
        responses={200: Body("an HTML page", media={"text/html": {"type": "string"}})},
        public=True,
    ),
    Operation(
        "get", playground.ASSET_RULE, "Files of the playground page", "operations",
        "`config.json` holds the defaults and ranges of the page's form and whether an API key is required.",
        responses={
            200: Body("the file", media={t: {"type": "string"} for t in (
                "text/javascript", "application/javascript", "text/css", "image/svg+xml")}
                | {"application/json": {"type": "object"}}),
            404: Body("no such file", ErrorResponse),
        },
        public=True,
    ),
)


def openapi_path(rule: str) -> str:
    """Flask's `/v1/models/<path:model_id>` as OpenAPI's `/v1/models/{model_id}`."""
    return re.sub(r"<(?:[^<>]*:)?(\w+)>", r"{\1}", rule)


def _converters(rule: str) -> list[tuple[str, str]]:
    """(converter with its arguments, variable name) of each variable in a Flask rule."""
    found = []
    for variable in re.findall(r"<([^<>]+)>", rule):
        converter, _, name = variable.rpartition(":")
        found.append((converter, name))
    return found


# ---- building the document -----------------------------------------------------------------------------


def build_document(app: Flask) -> dict:
    settings = app.extensions["settings"]
    auth = bool(settings.api_keys)

    models: list[tuple[type[BaseModel], str]] = []
    for op in OPERATIONS:
        if op.request is not None:
            models.append((op.request, "validation"))
        for body in op.responses.values():
            for model in _body_models(body):
                models.append((model, "serialization"))
    models.append((ErrorResponse, "serialization"))
    keys, definitions = _readable_names(*models_json_schema(
        list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}"
    ))

    def ref(model: type[BaseModel], mode: str) -> dict:
        return keys[(model, mode)]

    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        responses: dict[int, Body] = dict(op.responses)
        if auth and not op.public:
            responses[401] = Body("no API key, or not a valid one", _error_model(op))
        if op.generates:
            responses.setdefault(500, Body("the generation failed", _error_model(op)))
        if op.rule not in ("/health", "/metrics") and not op.public:
            responses.setdefault(503, Body(
                "the server is busy (queue full or timed out), still loading the model, or shutting down; "
                "`Retry-After` says when to retry", _error_model(op)))

        operation: dict = {
            "operationId": _operation_id(op),
            "summary": op.summary,
            "tags": [op.tag],
            "responses": {str(status): _response(body, ref) for status, body in sorted(responses.items())},
        }
        if op.description:
            operation["description"] = op.description
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": _converter_schema(converter)}
            for converter, name in _converters(op.rule)
        ]
        if parameters:
            operation["parameters"] = parameters
        if op.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref(op.request, "validation")}},
            }
        if auth:
            operation["security"] = [] if op.public else [{"bearerAuth": []}, {"apiKeyHeader": []}]
        paths.setdefault(openapi_path(op.rule), {})[op.method] = operation

    return {
        "openapi": "3.1.0",
        "info": {
            "title": TITLE,
            "version": _version(),
            "description": (
                "Text generation with Hugging Face GPT-style models: the original API (`/generate`), an "
                "OpenAI-compatible API (`/v1/completions`) and operations routes. Errors are "
                '`{"error": {"message", "type", "param", "code"}}`; the original API\'s routes add a '
                "`detail` list. Every response carries `X-Request-ID`."
                + (" Every route but /health, /docs, the playground (/) and their files needs an API key." if auth else "")
            ),
        },
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            # Only a server with API keys asks for one (Swagger UI then offers its Authorize button).
            **({"securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }} if auth else {}),
        },
    }


# Models of the same name in two API modules (both have a `Usage`) get pydantic's module-qualified
# names, e.g. `app__api__legacy_schemas__Usage`; the document calls them `LegacyUsage`, `OpenAIUsage`.
_MODULE_PREFIXES = {"legacy": "Legacy", "openai": "OpenAI"}
_QUALIFIED = re.compile(r"^app__api__(\w+?)_schemas__(\w+)$")


def _readable_names(keys: dict, definitions: dict) -> tuple[dict, dict]:
    renames = {}
    for name in definitions.get("$defs", {}):
        match = _QUALIFIED.match(name)
        if match:
            module, model = match.groups()
            renames[name] = _MODULE_PREFIXES.get(module, module.capitalize()) + model
    if not renames:
        return keys, definitions
    text = json.dumps({"keys": list(keys.values()), "definitions": definitions})
    for old, new in renames.items():
        text = text.replace(f'"#/components/schemas/{old}"', f'"#/components/schemas/{new}"')
    data = json.loads(text)
    defs = {renames.get(name, name): schema for name, schema in data["definitions"].get("$defs", {}).items()}
    # The keys are (model, mode) tuples, which JSON cannot hold: pair them back with their new values.
    keys = dict(zip(keys, data["keys"]))
    return keys, {"$defs": defs}


def _body_models(body: Body) -> list[type[BaseModel]]:
    found = [body.model] if body.model is not None else []
    events = body.events if isinstance(body.events, tuple) else (body.events,) if body.events else ()
    return found + list(events)


def _error_model(op: Operation) -> type[BaseModel]:
    return ErrorResponse


def _operation_id(op: Operation) -> str:
    words = re.findall(r"[A-Za-z0-9]+", openapi_path(op.rule)) or ["root"]
    return op.method + "_" + "_".join(words)


def _converter_schema(converter: str) -> dict:
    if converter.startswith("any("):
        return {"type": "string", "enum": re.findall(r'"([^"]+)"', converter)}
    if converter == "int":
        return {"type": "integer"}
    return {"type": "string", "minLength": 1}


def _response(body: Body, ref) -> dict:
    content: dict = {}
    if body.model is not None:
        content["application/json"] = {"schema": ref(body.model, "serialization")}
    if body.events:
        content["text/event-stream"] = {"schema": _event_schema(body, ref)}
    for media, schema in body.media.items():
        content[media] = {"schema": schema}
    response: dict = {
        "description": body.description,
        "headers": {"X-Request-ID": {"description": "the request's id (the client's, or a new one)",
                                     "schema": {"type": "string"}}},
    }
    if content:
        response["content"] = content
    return response


def _event_schema(body: Body, ref) -> dict:
    """One server-sent event, as the fields of an event (OpenAPI 3.1 has no way to say "a stream of"
    these, so the schema describes each event, as schemathesis and OpenAPI 3.2's `itemSchema` read it):
    its `data` is the JSON of one of the event models, or `[DONE]` where the stream ends with it."""
    events = body.events if isinstance(body.events, tuple) else (body.events,)
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [ref(model, "serialization") for model in events]},
    }
    done = body.model in (CompletionResponse, ChatCompletionResponse)  # OpenAI's streams end with `data: [DONE]`
    return {
        "type": "object",
        "description": _SSE_TEXT + " Events: " + ", ".join(model.__name__ for model in events)
        + (", then `data: [DONE]`." if done else "."),
        "required": ["data"],
        "properties": {
            "data": {"anyOf": [json_data, {"const": "[DONE]"}]} if done else json_data,
            "event": {"type": "string"},
        },
    }


def _version() -> str:
    try:
        return version("gpt-server")
    except Exception:  # not installed as a package: the document's version is the API's
        return "1.0"


def document() -> dict:
    """The document of the current app, built once (it depends only on the code and the settings)."""
    cached = current_app.extensions.get("openapi")
    if cached is None:
        cached = current_app.extensions["openapi"] = build_document(current_app)
    return cached


def undocumented_routes(app: Flask) -> list[str]:
    """`METHOD rule` of every route of the app that the table lacks (HEAD and OPTIONS are Flask's own)."""
    documented = {(op.method.upper(), op.rule) for op in OPERATIONS}
    missing = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            if (method, rule.rule) not in documented:
                missing.append(f"{method} {rule.rule}")
    return missing


# ---- routes ----------------------------------------------------------------------------------------------


@bp.get("/openapi.json")
def openapi():
    return Response(json.dumps(document(), ensure_ascii=False), mimetype="application/json")


@bp.get("/docs")
def page():
    return Response(_PAGE, mimetype="text/html")


@bp.get(_ASSET_RULE)
def asset(asset: str):
    from swagger_ui.utils import SWAGGER_UI_PY_ROOT  # the Swagger UI files shipped by swagger-ui-py

    return send_from_directory(SWAGGER_UI_PY_ROOT / "static", asset, max_age=86400)


# Relative links: the page works at /docs behind a proxy that adds a path prefix too. The document is
# fetched by the page itself so that, when the server has API keys, it can ask for one first.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>gpt-server API</title>
<link rel="stylesheet" href="docs/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/favicon-32x32.png">
<style>
  body { margin: 0; }
  #key-form { display: none; font-family: sans-serif; padding: 2em; }
  #key-form input { width: 28em; padding: .3em; }
</style>
</head>
<body>
<form id="key-form">
  <p id="key-message">This server needs an API key to show its API description.</p>
  <input id="key" type="password" placeholder="API key" autocomplete="off">
  <button type="submit">Show</button>
</form>
<div id="swagger-ui"></div>
<script src="docs/swagger-ui-bundle.js"></script>
<script>
const STORE = "gpt-server-api-key";
const form = document.getElementById("key-form");
form.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(STORE, document.getElementById("key").value.trim());
  load();
});
async function load() {
  const key = sessionStorage.getItem(STORE);
  const headers = key ? { "Authorization": "Bearer " + key } : {};
  const response = await fetch("openapi.json", { headers });
  if (response.status === 401) {
    if (key) document.getElementById("key-message").textContent = "That API key was refused; try another.";
    form.style.display = "block";
    return;
  }
  form.style.display = "none";
  window.ui = SwaggerUIBundle({
    spec: await response.json(),
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    requestInterceptor: (request) => {
      if (key && !request.headers["Authorization"]) request.headers["Authorization"] = "Bearer " + key;
      return request;
    },
  });
}
load();
</script>
</body>
</html>
"""
