"""The OpenAI chat completions protocol (`POST /v1/chat/completions`), as pydantic models.

It shares every sampling field, default and range with `/v1/completions` (`OpenAIRequest`); what
differs is the prompt (a list of messages rendered by a chat template), the answer's shape, and the
log-probabilities (`logprobs: true` and `top_logprobs: k`). Tools, functions and structured output
cannot be honoured by these models and are refused by name.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

from app.api.chat_template import ChatTemplate
from app.api.openai_schemas import EnginePrompt, OpenAIRequest
from app.api.protocol import OpenAIFinishReason, RequestRefused, Serving, Usage, no_lone_surrogates


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"] = Field(description='only "text": these models read no images or audio')
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description='"developer" is read as "system" (newer OpenAI clients send it)')
    content: str | list[TextPart] = Field(description="the text, or a list of text parts joined together")
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _valid_text(cls, value):
        texts = [value] if isinstance(value, str) else [part.text for part in value]
        no_lone_surrogates(texts)
        return value

    def template_input(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str


def _unsupported(what: str) -> str:
    return f"not supported: {what}; leave it out"


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation so far, oldest first")
    max_tokens: int | None = Field(None, ge=0, description="null = as many as the context and MAX_NEW_TOKENS allow")
    max_completion_tokens: int | None = Field(None, ge=0, description="the newer name of max_tokens; wins over it")
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="alternatives per token; needs logprobs: true")

    # What these models cannot do: refused by name rather than silently ignored.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, value, info: ValidationInfo):
        if value:
            raise ValueError(_unsupported(f"{info.field_name} (function calling) needs a model trained for it"))
        return None

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, value, info: ValidationInfo):
        if value not in (None, "none", "auto"):
            raise ValueError(_unsupported(f"{info.field_name} (function calling) needs a model trained for it"))
        return None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: ResponseFormat | None):
        if value is not None and value.type != "text":
            raise ValueError(_unsupported(f'response_format type "{value.type}": only "text" is served'))
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs: true")
        return value

    @property
    def new_tokens_asked(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def new_tokens_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def to_engine(self, serving: Serving, template: ChatTemplate) -> EnginePrompt:
        """The conversation as one engine request (with `n` sequences), checked against the limits."""
        serving.check_counts(self.n, "n", self.stops)
        text = template.render(serving.tokenizer, [m.template_input() for m in self.messages])
        ids = serving.encode(text, "messages")
        asked = self.new_tokens_asked
        new_tokens = asked if asked is not None else serving.room(len(ids), self.n)
        serving.check_fits(len(ids), new_tokens, self.new_tokens_param, self.n)
        if self.min_tokens > new_tokens:  # the shared check sees max_tokens only, not max_completion_tokens
            raise RequestRefused(f"min_tokens: must not exceed {self.new_tokens_param} ({new_tokens}); got "
                                 f"{self.min_tokens}", "min_tokens", "invalid_value")
        if new_tokens == 0:
            return EnginePrompt(0, ids, text, None, keep_output=False)
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        # The template's turn markers end the answer too; they are not the client's stop strings, so
        # they count against no limit.
        return EnginePrompt(0, ids, text, self.generation(ids, new_tokens, self.stops + list(template.stop), logprobs))


# ---- responses ----------------------------------------------------------------------------------


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = Field(description="the token's UTF-8 bytes (a token may hold part of a character)")


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(description="the most likely tokens at this place, top_logprobs of them")


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: OpenAIFinishReason


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event. The first chunk of each choice carries the role; the optional last one
    (`stream_options.include_usage`) has no choices and the usage."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
