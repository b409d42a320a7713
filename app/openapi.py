"""`GET /openapi.json` (OpenAPI 3.1) and `GET /docs` (Swagger UI, served from this server).

Each view declares its operation where it is defined, with `@documented(...)`: the pydantic models
that validate its request and build its responses, and its other answers. The document is derived
from the app's routes (Flask's url_map) with apispec; the models' JSON schemas come from pydantic
(`models_json_schema`), so the document cannot drift from what the routes accept and answer.
tests/test_openapi.py checks that every route is documented, and fuzzes the running server against
the document.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib.metadata import version

from apispec import APISpec
from apispec_webframeworks.flask import FlaskPlugin
from flask import Blueprint, Flask, Response, current_app, send_from_directory
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from werkzeug.routing import AnyConverter, IntegerConverter, Rule

from app.api.protocol import ErrorResponse

bp = Blueprint("docs", __name__)

TITLE = "gpt-server"
SSE_TEXT = "Server-sent events: one `data: <JSON>` line per event, each event one of the schemas listed."


# ---- what a view declares -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """One response body: a pydantic model as JSON, server-sent events, or raw content of a media type."""

    description: str
    model: type[BaseModel] | None = None
    media: dict[str, dict] = field(default_factory=dict)  # media type -> schema, for non-JSON content
    events: tuple[type[BaseModel], ...] = ()  # text/event-stream `data:` items
    done: bool = False  # the event stream ends with `data: [DONE]` (OpenAI's streams)


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    description: str = ""
    request: type[BaseModel] | None = None
    responses: dict[int, Body] = field(default_factory=dict)
    generates: bool = False  # runs the model: can be refused when the server is busy, or fail
    public: bool = False  # needs no API key (and is served while loading or shutting down)
    always_served: bool = False  # answered while loading or shutting down, though it needs a key
    summaries: dict[str, str] = field(default_factory=dict)  # a summary per Flask rule, where a view has several


def documented(summary: str, tag: str, **declaration):
    """Marks a view with its OpenAPI operation (see `Operation`); the view itself is unchanged."""

    def mark(view):
        view.openapi = Operation(summary, tag, **declaration)
        return view

    return mark


def errors(**statuses: str) -> dict[int, Body]:
    """`errors(e400="why")`: error answers, each with the one error body of both APIs."""
    return {int(status.removeprefix("e")): Body(why, ErrorResponse) for status, why in statuses.items()}


def files(*media: str, **schemas: dict) -> dict[int, Body]:
    """The answers of a route that serves files: the file (of these media types), or 404."""
    return {200: Body("the file", media={m: {"type": "string"} for m in media} | schemas),
            404: Body("no such file", ErrorResponse)}


def page_body() -> dict[int, Body]:
    return {200: Body("an HTML page", media={"text/html": {"type": "string"}})}


# ---- building the document -----------------------------------------------------------------------------


def documented_rules(app: Flask) -> list[tuple[Rule, str, Operation | None]]:
    """(rule, method, its declaration or None) of every route of the app but Flask's static files;
    HEAD and OPTIONS are Flask's own."""
    found = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint != "static":
            operation = getattr(app.view_functions[rule.endpoint], "openapi", None)
            found += [(rule, method, operation) for method in sorted(rule.methods - {"HEAD", "OPTIONS"})]
    return found


def undocumented_routes(app: Flask) -> list[str]:
    """`METHOD rule` of every route of the app whose view has no `@documented`."""
    return [f"{method} {rule.rule}" for rule, method, operation in documented_rules(app) if operation is None]


def build_document(app: Flask) -> dict:
    auth = bool(app.extensions["settings"].api_keys)
    routes = [(rule, method, op) for rule, method, op in documented_rules(app) if op is not None]

    models = [(ErrorResponse, "serialization")]
    for _, _, op in routes:
        models += [(op.request, "validation")] if op.request else []
        models += [(model, "serialization") for body in op.responses.values() for model in _models(body)]
    refs, definitions = models_json_schema(list(dict.fromkeys(models)), ref_template="#/components/schemas/{model}")

    spec = APISpec(TITLE, _version(), "3.1.0", info={"description": _description(auth)})
    for name, schema in definitions.get("$defs", {}).items():
        spec.components.schema(name, schema)
    if auth:  # only a server with API keys asks for one (Swagger UI then offers its Authorize button)
        spec.components.security_scheme(
            "bearerAuth", {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"})
        spec.components.security_scheme("apiKeyHeader", {"type": "apiKey", "in": "header", "name": "X-API-Key"})
    for rule, method, op in routes:
        path = FlaskPlugin.flaskpath2openapi(rule.rule)
        spec.path(path, operations={method.lower(): _operation(rule, method, path, op, auth, refs)})
    return spec.to_dict()


def _operation(rule: Rule, method: str, path: str, op: Operation, auth: bool, refs: dict) -> dict:
    responses = dict(op.responses)
    if auth and not op.public:
        responses[401] = Body("no API key, or not a valid one", ErrorResponse)
    if op.generates:
        responses.setdefault(500, Body("the generation failed", ErrorResponse))
    if not (op.public or op.always_served):
        responses.setdefault(503, Body(
            "the server is busy (queue full or timed out), still loading the model, or shutting down; "
            "`Retry-After` says when to retry", ErrorResponse))
    operation: dict = {
        "operationId": method.lower() + "_" + "_".join(re.findall(r"[A-Za-z0-9]+", path) or ["root"]),
        "summary": op.summaries.get(rule.rule, op.summary),
        "tags": [op.tag],
        "responses": {str(status): _response(body, refs) for status, body in sorted(responses.items())},
    }
    if op.description:
        operation["description"] = op.description
    # Rule._converters: werkzeug's converter of each variable (it has no public accessor).
    if parameters := [{"name": name, "in": "path", "required": True, "schema": _parameter_schema(converter)}
                      for name, converter in rule._converters.items()]:
        operation["parameters"] = parameters
    if op.request is not None:
        operation["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": refs[(op.request, "validation")]}}}
    if auth:
        operation["security"] = [] if op.public else [{"bearerAuth": []}, {"apiKeyHeader": []}]
    return operation


def _description(auth: bool) -> str:
    return (
        "Text generation with Hugging Face GPT-style models: the original API (`/generate`), an "
        "OpenAI-compatible API (`/v1/completions`) and operations routes. Errors are "
        '`{"error": {"message", "type", "param", "code"}}`; the original API\'s routes add a '
        "`detail` list. Every response carries `X-Request-ID`."
        + (" Every route but /health, /docs, the playground (/) and their files needs an API key." if auth else "")
    )


def _models(body: Body) -> list[type[BaseModel]]:
    return ([body.model] if body.model is not None else []) + list(body.events)


def _parameter_schema(converter) -> dict:
    if isinstance(converter, AnyConverter):
        return {"type": "string", "enum": sorted(converter.items)}
    if isinstance(converter, IntegerConverter):
        return {"type": "integer"}
    return {"type": "string", "minLength": 1}


def _response(body: Body, refs: dict) -> dict:
    content: dict = {}
    if body.model is not None:
        content["application/json"] = {"schema": refs[(body.model, "serialization")]}
    if body.events:
        content["text/event-stream"] = {"schema": _event_schema(body, refs)}
    content |= {media: {"schema": schema} for media, schema in body.media.items()}
    response: dict = {
        "description": body.description,
        "headers": {"X-Request-ID": {"description": "the request's id (the client's, or a new one)",
                                     "schema": {"type": "string"}}},
    }
    if content:
        response["content"] = content
    return response


def _event_schema(body: Body, refs: dict) -> dict:
    """One server-sent event, as the fields of an event (OpenAPI 3.1 has no way to say "a stream of"
    these, so the schema describes each event, as schemathesis and OpenAPI 3.2's `itemSchema` read it):
    its `data` is the JSON of one of the event models, or `[DONE]` where the stream ends with it."""
    json_data = {
        "type": "string",
        "contentMediaType": "application/json",
        "contentSchema": {"anyOf": [refs[(model, "serialization")] for model in body.events]},
    }
    return {
        "type": "object",
        "description": SSE_TEXT + " Events: " + ", ".join(model.__name__ for model in body.events)
        + (", then `data: [DONE]`." if body.done else "."),
        "required": ["data"],
        "properties": {
            "data": {"anyOf": [json_data, {"const": "[DONE]"}]} if body.done else json_data,
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


# ---- routes ----------------------------------------------------------------------------------------------


@bp.get("/openapi.json")
@documented("This document", "operations",
            responses={200: Body("the OpenAPI 3.1 document", media={"application/json": {"type": "object"}})})
def openapi():
    return Response(json.dumps(document(), ensure_ascii=False), mimetype="application/json")


@bp.get("/docs")
@documented("Browsable API documentation (Swagger UI)", "operations", public=True, responses=page_body(),
            description="Needs no API key itself; when the server has keys it asks for one to load the document.")
def page():
    return Response(_PAGE, mimetype="text/html")


# The Swagger UI files the docs page loads (only these: the package ships many more).
@bp.get('/docs/<any("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"):asset>')
@documented("Files of the documentation page", "operations", public=True,
            responses=files("text/javascript", "application/javascript", "text/css", "image/png"))
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
