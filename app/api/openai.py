"""The OpenAI-compatible API: `POST /v1/completions`, `GET /v1/models`, `GET /v1/models/{id}`.

Same engine, same port as the original API. Each prompt of a request becomes one engine request
(with `n` sequences); all of them are submitted together so that they batch, and choice `i` of
prompt `p` is returned at index `p * n + i`, as OpenAI does.

Errors have OpenAI's shape and the status codes its clients map to typed exceptions: invalid
values are 400 (never 422), an unknown model is 404, overload is 503 with `Retry-After`.
"""

from __future__ import annotations

import time
import uuid

from flask import Blueprint, jsonify
from werkzeug.routing import PathConverter
from pydantic import ValidationError

from app.api import generation as gen
from app.api.errors import ApiError, error_response, validation_error_response
from app.api.openai_schemas import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    CompletionStreamChunk,
    EnginePrompt,
    ModelCard,
    ModelList,
    OpenAIRequest,
)
from app.api.protocol import RequestRefused, Usage, backend_decode
from app.api.sse import sse_response
from app.engine import Delta, Finished, TokenLogprob
from app.engine.text import IncrementalDecoder
from app.openapi import Body, documented, errors

bp = Blueprint("openai", __name__, url_prefix="/v1")

# `created` of the model card: when this server process started serving it.
_STARTED = int(time.time())


# ---- models ---------------------------------------------------------------------------------------


def _model_card() -> ModelCard:
    settings = gen.settings()
    model_id = settings.model_id
    owner = model_id.split("/")[0] if "/" in model_id and not settings.model_is_local_folder else "gpt-server"
    engine = gen.engine()
    context = engine.loaded.context_length if engine.loaded is not None else None
    return ModelCard(id=model_id, created=_STARTED, owned_by=owner, max_model_len=context)


def _model_not_found(name: str) -> ApiError:
    return ApiError(404, f"The model `{name}` does not exist. This server serves `{gen.settings().model_id}`.",
                    param="model", code="model_not_found")


ERRORS = errors(
    e400="the body is not JSON, a field is invalid, or the prompt does not fit the context or the limits",
    e404="the model named is not the one this server serves",
    e413="the body is larger than MAX_BODY_BYTES",
)


@bp.get("/models")
@documented("List the served model (OpenAI-compatible)", "OpenAI-compatible",
            responses={200: Body("the one model this server serves", ModelList)})
def list_models():
    return jsonify(ModelList(data=[_model_card()]).model_dump())


class ModelIdConverter(PathConverter):
    """werkzeug's `path`, but also with a leading slash: a model served from a folder has an absolute
    path as its id, which the openai client sends as `/v1/models/%2Fmodels%2Fx` and the app receives as
    `/v1/models//models/x`. It replaces `path` in the app (this is the only rule that uses it), so the
    rule, its metrics label and its OpenAPI path stay `/v1/models/<path:model_id>`."""

    regex = ".+?"
    part_isolating = False  # the id spans several path segments (werkzeug infers True from a regex without "/")


bp.record_once(lambda state: state.app.url_map.converters.update(path=ModelIdConverter))


# merge_slashes=False: the double slash is part of the id, not a typo to redirect.
@bp.get("/models/<path:model_id>", merge_slashes=False)
@documented("Describe a model (OpenAI-compatible)", "OpenAI-compatible",
            responses={200: Body("the model", ModelCard), **errors(e404="no such model on this server")})
def retrieve_model(model_id: str):
    card = _model_card()
    if model_id != card.id:
        raise _model_not_found(model_id)
    return jsonify(card.model_dump())


# ---- running a request's prompts ------------------------------------------------------------------


def check_model(req: OpenAIRequest) -> None:
    if req.model is not None and req.model != gen.settings().model_id:
        raise _model_not_found(req.model)


def submit_all(jobs: list[EnginePrompt]) -> None:
    """Submit every prompt at once (they batch); all or nothing when the server is full."""
    try:
        for job in jobs:
            if job.generation is not None:
                job.handle = gen.submit(job.generation)
    except BaseException:
        cancel_all(jobs)
        raise


def cancel_all(jobs: list[EnginePrompt]) -> None:
    for job in jobs:
        if job.handle is not None:
            job.handle.cancel()  # a no-op for a request that already finished


def wait_all(jobs: list[EnginePrompt]) -> list:
    """Every prompt's result (None where nothing ran); all are cancelled if the client goes away."""
    results = []
    try:
        for job in jobs:
            result = None
            if job.handle is not None:
                result = job.handle.result(gen.POLL_SECONDS, gen.client_connected)
                if result is None:
                    raise ApiError(499, "client closed the connection", code="client_closed")
            results.append(result)
    finally:
        cancel_all(jobs)
    return results


def public_finish_reason(reason: str | None) -> str | None:
    # "cancelled" only reaches a client that has already gone; never show it.
    return reason if reason in (None, "stop", "length") else "stop"


def openai_errors(blueprint: Blueprint) -> None:
    """OpenAI's statuses on `blueprint`: its clients expect 400 (never 422) for invalid values."""
    blueprint.register_error_handler(
        RequestRefused, lambda exc: error_response(400, exc.message, exc.param, exc.code))
    blueprint.register_error_handler(
        ValidationError, lambda exc: validation_error_response(exc, status=400, with_detail=False))


# ---- log-probabilities -------------------------------------------------------------------------


class _LogprobsBuilder:
    """Log-probability entries of one run of tokens, with each token's offset in the returned text.

    Offsets follow the text as it is decoded in context (a token that ends in the middle of a
    UTF-8 character adds nothing until the character is complete), so they index the returned text.
    """

    def __init__(self, tokenizer, context_ids, start_offset: int):
        self._tokenizer = tokenizer
        self._decoder = IncrementalDecoder(tokenizer, context_ids)
        self._offset = start_offset

    def _token(self, token_id: int) -> str:
        return backend_decode(self._tokenizer, [token_id], skip_special_tokens=False)

    def build(self, token_ids, logprobs: list[TokenLogprob | None] | None) -> CompletionLogprobs:
        out = CompletionLogprobs()
        logprobs = logprobs if logprobs is not None else [None] * len(token_ids)
        for token_id, entry in zip(token_ids, logprobs):
            token = self._token(token_id)
            out.tokens.append(token)
            out.text_offset.append(self._offset)
            self._offset += len(self._decoder.push(token_id))
            if entry is None:  # the first prompt token: nothing precedes it to predict it
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
                continue
            out.token_logprobs.append(entry.logprob)
            # The top alternatives, and always the chosen token (so up to logprobs + 1 entries).
            top = {self._token(alt_id): alt_lp for alt_id, alt_lp in entry.top}
            top.setdefault(token, entry.logprob)
            out.top_logprobs.append(top)
        return out


def _prompt_logprobs(job: EnginePrompt, prompt_logprobs) -> CompletionLogprobs:
    tokenizer = gen.loaded_model().tokenizer
    return _LogprobsBuilder(tokenizer, [], 0).build(job.prompt_ids, prompt_logprobs)


def _choice_logprobs(req: CompletionRequest, prompt_lp: CompletionLogprobs | None) -> CompletionLogprobs | None:
    """A choice's own copy of the prompt's entries (with echo), or empty ones; None without logprobs."""
    if req.logprobs is None:
        return None
    return prompt_lp.model_copy(deep=True) if prompt_lp else CompletionLogprobs()


# ---- routes -----------------------------------------------------------------------------------------


@bp.post("/completions")
@documented(
    "Create a completion (OpenAI-compatible)", "OpenAI-compatible", request=CompletionRequest, generates=True,
    description="OpenAI's legacy completions. With `stream: true` the answer is server-sent events ending with "
    "`data: [DONE]`.",
    responses={200: Body("the completion; server-sent events of chunks when `stream` is true", CompletionResponse,
                         events=(CompletionStreamChunk,), done=True), **ERRORS},
)
def completions():
    req = CompletionRequest.model_validate(gen.json_body())
    check_model(req)
    jobs = req.to_engine(gen.serving())
    model_id = gen.loaded_model().model_id
    response_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    submit_all(jobs)
    if req.stream:
        return sse_response(_stream(req, jobs, response_id, created, model_id))
    return jsonify(_complete(req, jobs, response_id, created, model_id).model_dump())


def _complete(req: CompletionRequest, jobs: list[EnginePrompt], response_id: str, created: int,
              model_id: str) -> CompletionResponse:
    """Wait for every prompt's result (cancelling all if the client goes away) and answer at once."""
    results = wait_all(jobs)
    tokenizer = gen.loaded_model().tokenizer
    choices, usage = [], Usage()
    for job, result in zip(jobs, results):
        echo = job.prompt_text if req.echo else ""
        prompt_lp = None
        if req.echo and req.logprobs is not None:
            prompt_lp = _prompt_logprobs(job, result.prompt_logprobs if result else None)
        if not job.keep_output:
            usage.add(len(job.prompt_ids), 0)
            for i in range(req.n):
                choices.append(CompletionChoice(index=job.index * req.n + i, text=echo,
                                                logprobs=_choice_logprobs(req, prompt_lp), finish_reason="length"))
            continue
        usage.add(result.prompt_tokens, result.completion_tokens)
        for completion in result.completions:
            logprobs = _choice_logprobs(req, prompt_lp)
            if logprobs is not None:
                builder = _LogprobsBuilder(tokenizer, job.prompt_ids, len(echo))
                logprobs.extend(builder.build(completion.token_ids, completion.logprobs))
            choices.append(CompletionChoice(
                index=job.index * req.n + completion.index, text=echo + completion.text, logprobs=logprobs,
                finish_reason=public_finish_reason(completion.finish_reason) or "length",
            ))
    return CompletionResponse(id=response_id, created=created, model=model_id, choices=choices, usage=usage)


def _stream(req: CompletionRequest, jobs: list[EnginePrompt], response_id: str, created: int, model_id: str):
    """OpenAI's chunks: text deltas per choice, `finish_reason` on each choice's last chunk, the usage
    chunk if asked for, then `[DONE]`. Prompts are streamed one after another (they run together);
    the client going away cancels all of them."""

    def chunk(choices: list[CompletionStreamChoice], usage: Usage | None = None) -> dict:
        body = CompletionStreamChunk(id=response_id, created=created, model=model_id, choices=choices, usage=usage)
        return body.model_dump(exclude=None if req.include_usage else {"usage"})

    total = Usage()
    try:
        for job in jobs:
            job_usage = yield from _stream_job(req, job, chunk)
            if job_usage is None:  # the client went away
                return
            total.add(*job_usage)
        if req.include_usage:
            yield chunk([], total)
        yield "[DONE]"
    finally:
        cancel_all(jobs)


def _stream_job(req: CompletionRequest, job: EnginePrompt, chunk):
    """Yield one prompt's chunks; return its (prompt, completion) token counts, None on disconnect."""
    n = req.n
    tokenizer = gen.loaded_model().tokenizer
    echo = job.prompt_text if req.echo else ""
    want_logprobs = req.logprobs is not None

    def echo_chunks(prompt_logprobs, finish_reason=None):
        if not req.echo and finish_reason is None:
            return []
        prompt_lp = _prompt_logprobs(job, prompt_logprobs) if want_logprobs and req.echo else None
        return [chunk([CompletionStreamChoice(index=job.index * n + i, text=echo,
                                              logprobs=_choice_logprobs(req, prompt_lp), finish_reason=finish_reason)])
                for i in range(n)]

    if job.handle is None:  # max_tokens=0 and nothing to ask the engine
        yield from echo_chunks(None, finish_reason="length")
        return len(job.prompt_ids), 0

    # With echo + logprobs the prompt's log-probabilities arrive only with the engine's last
    # event, and the echoed prompt must come first: hold this prompt's chunks until then.
    hold = req.echo and want_logprobs
    held = []
    builders = [_LogprobsBuilder(tokenizer, job.prompt_ids, len(echo)) for _ in range(n)]
    if not hold:
        yield from echo_chunks(None)
    for event in job.handle.stream(gen.POLL_SECONDS, gen.client_connected):
        if isinstance(event, Finished):
            if not job.keep_output:
                yield from echo_chunks(event.prompt_logprobs, finish_reason="length")
                return event.prompt_tokens, 0
            if hold:
                yield from echo_chunks(event.prompt_logprobs)
                yield from held
            return event.prompt_tokens, event.completion_tokens
        if not job.keep_output or not isinstance(event, Delta):
            continue
        if not (event.text or event.finish_reason or want_logprobs):
            continue  # nothing to show yet (e.g. text held back at a possible stop string)
        logprobs = builders[event.index].build(event.token_ids, event.logprobs) if want_logprobs else None
        item = chunk([CompletionStreamChoice(index=job.index * n + event.index, text=event.text, logprobs=logprobs,
                                             finish_reason=public_finish_reason(event.finish_reason))])
        if hold:
            held.append(item)
        else:
            yield item
    return None


openai_errors(bp)
