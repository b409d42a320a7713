"""The original API: `POST /generate` (also `POST /`) and its streaming twin `POST /generate_stream`.

Responses keep the original's shape, `{"model", "s_elapsed", "sentences": [{"generated_text"}]}`,
where each generated text starts with the prompt; new fields are only ever added.
"""

from __future__ import annotations

import time

from flask import Blueprint, jsonify

from app.api import generation as gen
from app.api.errors import ApiError
from app.api.legacy_schemas import (
    LegacyGenerateRequest,
    LegacyGenerateResponse,
    LegacyStreamDelta,
    LegacyStreamDone,
    Sentence,
    Usage,
)
from app.engine import Delta, Finished, GenerationRequest, SamplingParams

bp = Blueprint("legacy", __name__)


def _to_engine_request(body: LegacyGenerateRequest) -> tuple[GenerationRequest, str]:
    """Validate against the model and the limits; return the engine request and the prompt text."""
    limits = gen.settings()
    if body.num_return_sequences > limits.max_num_return_sequences:
        raise ApiError(
            422, f"num_return_sequences: at most {limits.max_num_return_sequences} on this server "
                 f"(MAX_NUM_RETURN_SEQUENCES); got {body.num_return_sequences}",
            param="num_return_sequences", code="too_many_sequences",
        )
    if len(body.stop) > limits.max_stop_sequences:
        raise ApiError(
            422, f"stop: at most {limits.max_stop_sequences} stop strings on this server (MAX_STOP_SEQUENCES); "
                 f"got {len(body.stop)}",
            param="stop", code="too_many_stop_sequences",
        )
    prompt_ids = gen.encode(body.text.prompt)
    if body.max_new_tokens is not None:
        new_tokens, param = body.max_new_tokens, "max_new_tokens"
    else:
        new_tokens, param = body.max_length - len(prompt_ids), "max_length"
        if new_tokens < 1:
            raise ApiError(
                422, f"max_length ({body.max_length}) counts the prompt too and must exceed the prompt's "
                     f"{len(prompt_ids)} tokens",
                param="max_length", code="max_length_too_small",
            )
    gen.check_fits(len(prompt_ids), new_tokens, param, body.num_return_sequences)
    sampling = SamplingParams(
        do_sample=body.do_sample,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        typical_p=body.typical_p,
        repetition_penalty=body.repetition_penalty,
        seed=body.seed,
    )
    request = GenerationRequest(
        prompt_ids=tuple(prompt_ids),
        max_new_tokens=new_tokens,
        sampling=sampling,
        n=body.num_return_sequences,
        stop=tuple(body.stop),
    )
    return request, gen.decode(prompt_ids)


@bp.post("/generate")
@bp.post("/")
def generate():
    body = LegacyGenerateRequest.model_validate(gen.json_body())
    request, prompt = _to_engine_request(body)
    started = time.perf_counter()
    result = gen.run_to_completion(request)
    response = LegacyGenerateResponse(
        model=gen.loaded_model().model_id,
        s_elapsed=f"{time.perf_counter() - started:.2f}",
        sentences=[Sentence(generated_text=prompt + c.text, finish_reason=c.finish_reason) for c in result.completions],
        usage=_usage(result.prompt_tokens, result.completion_tokens),
    )
    return jsonify(response.model_dump())


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


@bp.post("/generate_stream")
def generate_stream():
    """Server-sent events: `{"index", "text"}` per new piece of text (the prompt is not repeated),
    `finish_reason` on each sequence's last event, then one final event with the totals."""
    body = LegacyGenerateRequest.model_validate(gen.json_body())
    request, _ = _to_engine_request(body)
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
                    usage=_usage(event.prompt_tokens, event.completion_tokens),
                ).model_dump()

    return gen.sse_response(events())
