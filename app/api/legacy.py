"""The original API: `POST /generate` (also `POST /`) and its streaming twin `POST /generate_stream`.

Responses keep the original's shape, `{"model", "s_elapsed", "sentences": [{"generated_text"}]}`,
where each generated text starts with the prompt; new fields are only ever added. Invalid input is
a 422 with the FastAPI-style `detail` list the original's clients read.
"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify

from app.api import generation as gen
from app.api.errors import error_response
from app.api.legacy_schemas import (
    LegacyGenerateRequest,
    LegacyGenerateResponse,
    LegacyStreamDelta,
    LegacyStreamDone,
    Sentence,
)
from app.api.protocol import RequestRefused, Usage
from app.api.sse import sse_response
from app.engine import Delta, Finished
from app.openapi import SSE_TEXT, Body, documented, errors

bp = Blueprint("legacy", __name__)


@bp.errorhandler(RequestRefused)
def _refused(exc: RequestRefused):
    return error_response(422, exc.message, exc.param, exc.code)


_ERRORS = errors(
    e400="the body is not a JSON object",
    e413="the body is larger than MAX_BODY_BYTES",
    e422="a field is invalid, or the prompt and length do not fit the model or the server's limits",
)
_REQUEST_DOC = (
    "The original API's request. `text` is required; everything else has the original's defaults. "
    "Fields after `num_return_sequences` are additions."
)


@bp.post("/generate")
@bp.post("/")
@documented(
    "Generate text (the original API)", "original API", summaries={"/": "Generate text: the same as POST /generate"},
    description=_REQUEST_DOC, request=LegacyGenerateRequest, generates=True,
    responses={200: Body("the generated sequences, each starting with the prompt", LegacyGenerateResponse), **_ERRORS},
)
def generate():
    body = LegacyGenerateRequest.model_validate(gen.json_body())
    request, prompt = body.to_engine(gen.serving())
    started = time.perf_counter()
    result = gen.run_to_completion(request)
    response = LegacyGenerateResponse(
        model=gen.loaded_model().model_id,
        s_elapsed=f"{time.perf_counter() - started:.2f}",
        sentences=[Sentence(generated_text=prompt + c.text, finish_reason=c.finish_reason) for c in result.completions],
        usage=Usage.of(result.prompt_tokens, result.completion_tokens),
    )
    return jsonify(response.model_dump())


@bp.post("/generate_stream")
@documented(
    "Generate text as server-sent events (the original API)", "original API", request=LegacyGenerateRequest,
    description=_REQUEST_DOC + " The answer streams: new text of each sequence as it is generated (the prompt is "
    "not repeated), then one last event with the totals.",
    responses={200: Body(SSE_TEXT, events=(LegacyStreamDelta, LegacyStreamDone)), **_ERRORS}, generates=True,
)
def generate_stream():
    """Server-sent events: `{"index", "text"}` per new piece of text (the prompt is not repeated),
    `finish_reason` on each sequence's last event, then one final event with the totals."""
    body = LegacyGenerateRequest.model_validate(gen.json_body())
    request, _ = body.to_engine(gen.serving())
    model_id = gen.loaded_model().model_id
    handle = gen.submit(request)
    started = time.perf_counter()

    def events():
        finish_reasons = [None] * request.n
        for event in gen.event_stream(handle):
            if isinstance(event, Delta):
                if event.finish_reason:
                    finish_reasons[event.index] = event.finish_reason
                if event.text or event.finish_reason:
                    yield LegacyStreamDelta(
                        index=event.index, text=event.text, finish_reason=event.finish_reason,
                    ).model_dump()
            elif isinstance(event, Finished):
                yield LegacyStreamDone(
                    model=model_id,
                    s_elapsed=f"{time.perf_counter() - started:.2f}",
                    finish_reasons=finish_reasons,
                    usage=Usage.of(event.prompt_tokens, event.completion_tokens),
                ).model_dump()

    return sse_response(events())
