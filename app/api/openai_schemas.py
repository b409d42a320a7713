"""The OpenAI completions protocol (`/v1/completions`, `/v1/models`), as pydantic models.

Field names, ranges and defaults are OpenAI's; the extra sampling fields (`top_k`,
`repetition_penalty`, ...) are vLLM's, which the official clients send as extra JSON fields.
Unknown fields are ignored, as OpenAI does. Checks that depend on the server (the model id, the
context length, the configured limits) are made by the route, not here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator

# Fields for which an explicit JSON `null` means "the default" (clients built from OpenAI's spec
# send `null` for options left unset). `max_tokens` is not here: its `null` means "up to the context".
_NULL_MEANS_DEFAULT = (
    "temperature", "top_p", "n", "echo", "stream", "presence_penalty", "frequency_penalty",
    "top_k", "repetition_penalty", "typical_p", "min_tokens", "ignore_eos",
)

_PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the served model's id (GET /v1/models); omitted = that model")
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    max_tokens: int | None = Field(16, ge=0, description="null = as many as the context and MAX_NEW_TOKENS allow")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1)
    best_of: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: StrictBool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    # Extras beyond OpenAI's fields (vLLM's names).
    top_k: int = Field(0, ge=-1, description="0 or -1 = off")
    repetition_penalty: float = Field(1.0, gt=0, description="HF-style, 1 = off")
    typical_p: float = Field(1.0, gt=0, le=1, description="1 = off")
    min_tokens: int = Field(0, ge=0, description="end-of-text is not allowed before this many tokens")
    ignore_eos: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in _NULL_MEANS_DEFAULT)}
        return data

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        # One clear message instead of pydantic's four (one per member of the union).
        def is_token(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {_PROMPT_SHAPES}" + ("; got an empty list" if value == [] else ""))
        if all(isinstance(p, str) for p in value) or all(is_token(t) for t in value):
            return value
        if all(isinstance(p, list) and p and all(is_token(t) for t in p) for p in value):
            return value
        raise ValueError(f"must be {_PROMPT_SHAPES} (token-id lists must not be empty)")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("not supported: these models continue text, they cannot fill it in before a suffix")
        return None

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("not supported by this server (leave it out or send {})")
        return None

    # Field validators (not a model validator) so that each error names its field; the fields they
    # compare with (`n`, `max_tokens`) are declared earlier and so already validated.
    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise ValueError(f"must equal n ({n}) or be left out: choosing the best of more candidates than "
                             "are returned is not supported")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"must not exceed max_tokens ({max_tokens}); got {value}")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts one by one: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(t, int) for t in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# ---- responses ----------------------------------------------------------------------------------


class CompletionLogprobs(BaseModel):
    """Per token: its text, its log-probability, the most likely alternatives, and where it starts
    in the returned text. Entries for the first prompt token (with `echo`) are null."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def extend(self, other: "CompletionLogprobs") -> None:
        self.tokens += other.tokens
        self.token_logprobs += other.token_logprobs
        self.top_logprobs += other.top_logprobs
        self.text_offset += other.text_offset


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.total_tokens = self.prompt_tokens + self.completion_tokens


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionStreamChunk(BaseModel):
    """One server-sent event. The optional last one (`stream_options.include_usage`) has no
    choices and the usage; when usage is asked for, the others carry `"usage": null`."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int | None = Field(None, description="context length in tokens, once the model is loaded")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
