"""`GET /`: the playground, a page for trying the model in a browser, and its files under `/playground/`.

The page is static (app/static/playground/); its script calls the same public API as any client
(`/health`, `/v1/completions` with `stream`), with the API key the user types in. The only thing
served here besides the files is `config.json`: the request fields' defaults and ranges, read from
`CompletionRequest` and the server's limits, so the form cannot drift from what the server accepts.

Everything here needs no API key (app/auth.py): the files hold no data, and the key is asked for by
the page itself. Every answer carries a strict Content-Security-Policy: the page may load and call
nothing but this server, runs no inline script or style, and may not be framed.
"""

from __future__ import annotations

from pathlib import Path

from annotated_types import Ge, Gt, Le, MaxLen
from flask import Blueprint, Response, jsonify, send_from_directory

from app.api import generation as gen
from app.api.openai_schemas import CompletionRequest
from app.openapi import documented, files, page_body

bp = Blueprint("playground", __name__)

FILES = Path(__file__).resolve().parent.parent / "static" / "playground"
ASSET_RULE = '/playground/<any("playground.js", "playground.css", "icon.svg", "config.json"):asset>'

# Beyond this, JavaScript numbers lose integer precision.
_JS_SAFE_INTEGER = 2**53 - 1

# The form's fields, in the order the page shows them, as /v1/completions names them.
FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "n", "stop")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    # Revalidated on every load (ETag / Last-Modified), so an upgraded server never pairs a new page
    # with an old script from the browser's cache.
    "Cache-Control": "no-cache",
}


@bp.after_request
def _security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value
    return response


@bp.get("/")
@documented(
    "The playground: a page to try the model in a browser", "operations", public=True, responses=page_body(),
    description="Needs no API key itself; when the server has keys the page asks for one and sends it with each "
    "request.",
)
def page():
    return send_from_directory(FILES, "index.html", max_age=0)


@bp.get(ASSET_RULE)
@documented(
    "Files of the playground page", "operations", public=True,
    description="`config.json` holds the defaults and ranges of the page's form and whether an API key is required.",
    responses=files("text/javascript", "application/javascript", "text/css", "image/svg+xml",
                    **{"application/json": {"type": "object"}}),
)
def asset(asset: str):
    if asset == "config.json":
        return jsonify(config())
    return send_from_directory(FILES, asset, max_age=0)


def config() -> dict:
    """What the page's form needs: each field's default and range, and whether a key is required."""
    settings = gen.settings()
    limits = {"max_tokens": {"max": settings.max_new_tokens}, "n": {"max": settings.max_num_return_sequences},
              "stop": {"max_items": settings.max_stop_sequences}}
    fields = {}
    for name in FIELDS:
        info = CompletionRequest.model_fields[name]
        field = {"default": info.get_default(call_default_factory=True)}
        for rule in info.metadata:
            bound = getattr(rule, "ge", getattr(rule, "gt", getattr(rule, "le", 0)))
            if isinstance(bound, int) and abs(bound) > _JS_SAFE_INTEGER:
                continue  # a bound that only keeps a value within 64 bits: no limit a person needs to see
            if isinstance(rule, Ge):
                field["min"] = rule.ge
            elif isinstance(rule, Gt):
                field["exclusive_min"] = rule.gt
            elif isinstance(rule, Le):
                field["max"] = rule.le
            elif isinstance(rule, MaxLen):
                field["max_items"] = rule.max_length
        field.update(limits.get(name, {}))
        fields[name] = field
    return {"api_key_required": bool(settings.api_keys), "fields": fields}
