"""The OpenAI completions protocol (`/v1/completions`, `/v1/models`), as pydantic models.

Field names, ranges and defaults are OpenAI's; the extra sampling fields (`top_k`,
`repetition_penalty`, `min_p`, ...) are vLLM's, which the official clients send as extra JSON
fields. Unknown fields are ignored, as OpenAI does. `to_engine` checks a request against the
server's limits and the model (`Serving`) and turns it into engine requests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator

from app.api.protocol import (
    OpenAIFinishReason,
    INT64_MAX,
    RequestRefused,
    SamplingFields,
    Serving,
    Usage,
    no_lone_surrogates,
    not_a_bool,
)
from app.engine import GenerationRequest, RequestHandle, SamplingParams

_PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of token-id lists"

_NUMBERS = ("max_tokens", "temperature", "top_p", "n", "seed", "presence_penalty", "frequency_penalty", "top_k",
            "typical_p", "min_tokens")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = False


class OpenAIRequest(SamplingFields):
    """The fields `/v1/completions` and `/v1/chat/completions` share, with OpenAI's names and ranges."""

    # NaN and infinities (which Python's JSON parser accepts) are refused rather than handed to the sampler.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = Field(None, description="the served model's id (GET /v1/models); omitted = that model")
    max_tokens: int | None = Field(16, ge=0, description="null = as many as the context and MAX_NEW_TOKENS allow")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    # Extras beyond OpenAI's fields (vLLM's names).
    top_k: int = Field(0, ge=-1, le=INT64_MAX, description="0 or -1 = off")
    typical_p: float = Field(1.0, gt=0, le=1, description="1 = off")
    min_tokens: int = Field(0, ge=0, description="end-of-text is not allowed before this many tokens")
    ignore_eos: StrictBool = False

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Clients built from OpenAI's spec send `null` for options left unset: for a field that cannot
        # be null, that means its default. Where null has a meaning of its own (`max_tokens: null` =
        # up to the context) the field admits it and keeps it.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in cls._not_nullable())}
        return data

    @classmethod
    @functools.cache
    def _not_nullable(cls) -> frozenset[str]:
        return frozenset(name for name, field in cls.model_fields.items()
                         if not field.is_required() and type(None) not in get_args(field.annotation))

    @field_validator(*_NUMBERS, mode="before")
    @classmethod
    def _not_a_bool(cls, value):
        return not_a_bool(value)

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, value):
        return no_lone_surrogates(value)

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("not supported by this server (leave it out or send {})")
        return None

    # Field validators (not a model validator) so that each error names its field; the fields they
    # compare with (`n`, `max_tokens`) are declared earlier and so already validated.
    @field_validator("min_tokens")
    @classmethod
    def _min_within_max(cls, value: int, info: ValidationInfo) -> int:
        max_tokens = info.data.get("max_tokens")
        if max_tokens is not None and value > max_tokens:
            raise ValueError(f"must not exceed max_tokens ({max_tokens}); got {value}")
        return value

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def engine_sampling(self) -> SamplingParams:
        do_sample = self.temperature > 0
        return self.sampling(
            do_sample=do_sample, temperature=self.temperature if do_sample else 1.0, top_k=max(self.top_k, 0),
            top_p=self.top_p, typical_p=self.typical_p, seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
        )

    def generation(self, prompt_ids: list[int], new_tokens: int, stop: list[str], logprobs: int | None,
                   prompt_logprobs: bool = False) -> GenerationRequest:
        return GenerationRequest(
            prompt_ids=tuple(prompt_ids), max_new_tokens=new_tokens, sampling=self.engine_sampling(), n=self.n,
            stop=tuple(stop), min_new_tokens=self.min_tokens, ignore_eos=self.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


@dataclass
class EnginePrompt:
    """One prompt of a request: what `echo` returns, and what the engine is asked to do."""

    index: int  # position in the request's prompt list
    prompt_ids: list[int]
    prompt_text: str
    generation: GenerationRequest | None  # None: nothing to run (max_tokens=0 without prompt logprobs)
    keep_output: bool = True  # False: the engine ran only for the prompt's log-probabilities
    handle: RequestHandle | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: StrictBool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        # One clear message instead of pydantic's four (one per member of the union).
        def is_token(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if isinstance(value, str):
            return no_lone_surrogates(value)
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be {_PROMPT_SHAPES}" + ("; got an empty list" if value == [] else ""))
        if all(isinstance(p, str) for p in value):
            return no_lone_surrogates(value)
        if all(is_token(t) for t in value):
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

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise ValueError(f"must equal n ({n}) or be left out: choosing the best of more candidates than "
                             "are returned is not supported")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts one by one: each a string or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(t, int) for t in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)

    def to_engine(self, serving: Serving) -> list[EnginePrompt]:
        """One engine request per prompt (each with `n` sequences), checked against the server's limits."""
        serving.check_counts(self.n, "n", self.stops)
        limits = serving.settings
        if len(self.prompts) > limits.max_queue:
            # Every prompt is one engine request; more than the queue holds could never be taken at once.
            raise RequestRefused(f"prompt: a list of {len(self.prompts)} prompts is more than this server queues at "
                                 f"once (MAX_QUEUE={limits.max_queue}); send at most {limits.max_queue} per request",
                                 "prompt", "too_many_prompts")
        single = isinstance(self.prompt, str) or isinstance(self.prompt[0], int)  # errors name prompt, not prompt.N
        planned = []
        for index, prompt in enumerate(self.prompts):
            ids, text = _ids_and_text(serving, prompt, "prompt" if single else f"prompt.{index}")
            new_tokens = self.max_tokens if self.max_tokens is not None else serving.room(len(ids), self.n)
            serving.check_fits(len(ids), new_tokens, "max_tokens", self.n)
            prompt_logprobs = self.echo and self.logprobs is not None
            if new_tokens == 0:
                # The engine always generates at least one token. Prompt log-probabilities come with
                # that first token at no extra model step, so run it for them and drop its output.
                generation = None
                if prompt_logprobs:
                    generation = GenerationRequest(prompt_ids=tuple(ids), max_new_tokens=1, logprobs=self.logprobs,
                                                   prompt_logprobs=True)
                planned.append(EnginePrompt(index, ids, text, generation, keep_output=False))
                continue
            generation = self.generation(ids, new_tokens, self.stops, self.logprobs, prompt_logprobs)
            planned.append(EnginePrompt(index, ids, text, generation))
        return planned


def _ids_and_text(serving: Serving, prompt: str | list[int], param: str) -> tuple[list[int], str]:
    if isinstance(prompt, str):
        return serving.encode(prompt, param), prompt
    bad = next((t for t in prompt if not 0 <= t < serving.vocab_size), None)
    if bad is not None:
        raise RequestRefused(f"{param}: token id {bad} is outside this model's vocabulary (0..{serving.vocab_size - 1})",
                             param, "invalid_token_id")
    return list(prompt), serving.decode_tokens(prompt)


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
    finish_reason: OpenAIFinishReason | None = None


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
    finish_reason: OpenAIFinishReason | None = None


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
