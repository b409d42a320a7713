"""`POST /v1/chat/completions`: OpenAI's chat API on the same engine path as `/v1/completions`.

The conversation becomes one prompt through the chat template (app/api/chat_template.py); from
there it is a completion request with `n` sequences, submitted, awaited and cancelled exactly as
`/v1/completions` does it. Only the answer's shape and the log-probabilities' layout differ.
"""

from __future__ import annotations

import time
import uuid

from flask import Blueprint, current_app, jsonify

from app.api import generation as gen
from app.api.chat_schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatStreamChoice,
    ChoiceLogprobs,
    TokenLogprobEntry,
    TopLogprob,
)
from app.api.chat_template import ChatTemplate, chat_template
from app.api.openai import (
    ERRORS,
    cancel_all,
    check_model,
    openai_errors,
    public_finish_reason,
    submit_all,
    wait_all,
)
from app.api.protocol import Usage, backend_decode
from app.api.sse import sse_response
from app.engine import Delta, Finished, TokenLogprob
from app.openapi import Body, documented

bp = Blueprint("chat", __name__, url_prefix="/v1")
openai_errors(bp)


def template() -> ChatTemplate:
    """The template in force, read once per app (CHAT_TEMPLATE, the tokenizer's, or the default)."""
    found = current_app.extensions.get("chat_template")
    if found is None:
        found = current_app.extensions["chat_template"] = chat_template(gen.settings(), gen.loaded_model().tokenizer)
    return found


@bp.post("/chat/completions")
@documented(
    "Create a chat completion (OpenAI-compatible)", "OpenAI-compatible", request=ChatCompletionRequest, generates=True,
    description="OpenAI's chat completions. The messages become one prompt through the model's chat template (or "
    "CHAT_TEMPLATE, or a plain `User:`/`Assistant:` transcript for base models). Tools, functions and "
    "response formats other than text are refused. With `stream: true` the answer is server-sent "
    "events ending with `data: [DONE]`.",
    responses={200: Body("the chat completion; server-sent events of chunks when `stream` is true",
                         ChatCompletionResponse, events=(ChatCompletionChunk,), done=True), **ERRORS},
)
def chat_completions():
    req = ChatCompletionRequest.model_validate(gen.json_body())
    check_model(req)
    job = req.to_engine(gen.serving(), template())
    model_id = gen.loaded_model().model_id
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    submit_all([job])
    if req.stream:
        return sse_response(_stream(req, job, response_id, created, model_id))
    [result] = wait_all([job])
    if result is None:  # max_tokens=0: nothing was generated
        choices = [ChatChoice(index=i, message=AssistantMessage(content=""), finish_reason="length",
                              logprobs=ChoiceLogprobs(content=[]) if req.logprobs else None) for i in range(req.n)]
        usage = Usage.of(len(job.prompt_ids), 0)
    else:
        choices = [ChatChoice(
            index=c.index, message=AssistantMessage(content=c.text),
            logprobs=_logprobs(c.token_ids, c.logprobs) if req.logprobs else None,
            finish_reason=public_finish_reason(c.finish_reason) or "length",
        ) for c in result.completions]
        usage = Usage.of(result.prompt_tokens, result.completion_tokens)
    return jsonify(ChatCompletionResponse(id=response_id, created=created, model=model_id, choices=choices,
                                          usage=usage).model_dump())


def _stream(req: ChatCompletionRequest, job, response_id: str, created: int, model_id: str):
    """OpenAI's chunks: the role first, then content deltas per choice, `finish_reason` on each
    choice's last chunk, the usage chunk if asked for, then `[DONE]`."""

    def chunk(choices: list[ChatStreamChoice], usage: Usage | None = None) -> dict:
        body = ChatCompletionChunk(id=response_id, created=created, model=model_id, choices=choices, usage=usage)
        return body.model_dump(exclude=None if req.include_usage else {"usage"}, exclude_none=False)

    try:
        for i in range(req.n):
            yield chunk([ChatStreamChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        if job.handle is None:  # max_tokens=0
            for i in range(req.n):
                yield chunk([ChatStreamChoice(index=i, delta=ChatDelta(), finish_reason="length")])
            usage = Usage.of(len(job.prompt_ids), 0)
        else:
            usage = None
            for event in job.handle.stream(gen.POLL_SECONDS, gen.client_connected):
                if isinstance(event, Finished):
                    usage = Usage.of(event.prompt_tokens, event.completion_tokens)
                    break
                if not isinstance(event, Delta) or not (event.text or event.finish_reason or event.token_ids):
                    continue
                reason = public_finish_reason(event.finish_reason)
                yield chunk([ChatStreamChoice(
                    index=event.index, delta=ChatDelta(content=event.text) if event.text or not reason else ChatDelta(),
                    logprobs=_logprobs(event.token_ids, event.logprobs) if req.logprobs else None,
                    finish_reason=reason,
                )])
            if usage is None:  # the client went away
                return
        if req.include_usage:
            yield chunk([], usage)
        yield "[DONE]"
    finally:
        cancel_all([job])


def _logprobs(token_ids: list[int], entries: list[TokenLogprob] | None) -> ChoiceLogprobs:
    tokenizer = gen.loaded_model().tokenizer

    def top(token_id: int, logprob: float) -> TopLogprob:
        token = backend_decode(tokenizer, [token_id], skip_special_tokens=False)
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))

    content = []
    for token_id, entry in zip(token_ids, entries or []):
        chosen = top(token_id, entry.logprob)
        content.append(TokenLogprobEntry(**chosen.model_dump(),
                                         top_logprobs=[top(alt_id, alt_lp) for alt_id, alt_lp in entry.top]))
    return ChoiceLogprobs(content=content)
