"""One error shape for every route: `{"error": {"message", "type", "param", "code"}}`.

The original API's clients also read a FastAPI-style `detail` list, so routes of that API get one
as well. Every handler here answers JSON; no input reaches the generic 500 page.
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from app.engine import EngineError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   retry_after: int | None = None, detail: list | None = None):
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    if detail is None and request.blueprint == "legacy":
        detail = [{"loc": ["body", *(param.split(".") if param else [])], "msg": message, "type": code or "error"}]
    if detail is not None:
        body["detail"] = detail
    response = jsonify(body)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def validation_error_response(exc: ValidationError, status: int = 422, with_detail: bool = True):
    """Name the first offending field and its reason; list them all in `detail` (the original API's)."""
    errors = exc.errors(include_url=False)
    detail = [
        {"loc": ["body", *map(str, e["loc"])], "msg": e["msg"].removeprefix("Value error, "), "type": e["type"]}
        for e in errors
    ]
    first = detail[0]
    param = ".".join(first["loc"][1:]) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    return error_response(status, message, param, first["type"], detail=detail if with_detail else None)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.retry_after)

    @app.errorhandler(ValidationError)
    def _validation_error(exc: ValidationError):
        return validation_error_response(exc)

    @app.errorhandler(EngineError)
    def _engine_error(exc: EngineError):
        return error_response(exc.status, str(exc), None, exc.code, exc.retry_after)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        messages = {
            413: f"the request body is larger than the limit of {app.config.get('MAX_CONTENT_LENGTH')} bytes "
                 "(MAX_BODY_BYTES)",
            404: f"no route {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
        }
        response = error_response(exc.code or 500, messages.get(exc.code, exc.description),
                                  code=exc.name.lower().replace(" ", "_"))
        # A 405 must say which methods the route has (RFC 9110); werkzeug's exception knows them.
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            response.headers["Allow"] = ", ".join(sorted(exc.valid_methods))
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error")
