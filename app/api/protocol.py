"""What both APIs' protocol models share: the usage and error bodies, the sampling fields and their
conversion to the engine's `SamplingParams`, the per-request limits, and input checks.

Each API's request model converts itself into engine requests (`to_engine`); a check that fails
raises `RequestRefused`, which each blueprint answers with its own status (422 on the original
API, 400 on OpenAI's), so the checks are written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, Field, field_validator

from app.engine import SamplingParams

# Python's JSON parser accepts integers of any size; the engine's tensors and generators take 64 bits.
INT64_MAX = 2**63 - 1

FinishReason = Literal["stop", "length", "cancelled"]
# OpenAI's APIs know no "cancelled": a cancelled choice has no client left to read it.
OpenAIFinishReason = Literal["stop", "length"]


class RequestRefused(Exception):
    """A request the server will not run as asked: `param` names the field, the message says why."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


# ---- bodies both APIs answer with ---------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int = Field(0, description="tokens in the prompt(s)")
    completion_tokens: int = Field(0, description="tokens generated, over all returned sequences")
    total_tokens: int = Field(0, description="prompt_tokens + completion_tokens")

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        usage = cls()
        usage.add(prompt_tokens, completion_tokens)
        return usage

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.total_tokens = self.prompt_tokens + self.completion_tokens


class ErrorInfo(BaseModel):
    message: str = Field(description="what is wrong, naming the field (`field: reason`) where one is at fault")
    type: str = Field(description='class of error, e.g. "invalid_request_error", "overloaded_error"')
    param: str | None = Field(None, description='the field at fault, dotted for nested ones (e.g. "text.in_64")')
    code: str | None = Field(None, description='machine-readable reason, e.g. "context_length_exceeded"')


class ErrorDetailItem(BaseModel):
    loc: list[str] = Field(description='where the problem is: ["body", field, ...]')
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer. Routes of the original API add the FastAPI-style `detail` list that the
    original server's clients read."""

    error: ErrorInfo
    detail: list[ErrorDetailItem] | None = Field(None, description="original API only: every problem found")


# ---- fields -------------------------------------------------------------------------------------


def not_a_bool(value: Any) -> Any:
    """pydantic would read true/false as 1/0 in a number field; a boolean there is a client's mistake."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


def no_lone_surrogates(value: Any) -> Any:
    """JSON may escape half of a UTF-16 pair ("\\ud800"); no tokenizer can encode it, so refuse it here."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"holds a lone UTF-16 surrogate ({text[exc.start]!r} at character {exc.start}); "
                                 "send valid Unicode text") from None
    return value


class SamplingFields(BaseModel):
    """Sampling controls with the same name, range and default in both APIs (vLLM's names)."""

    # Bounded so that dividing or multiplying a logit by it stays finite even in float16 (a penalty
    # of 5e-324 would turn logits into infinities and the sampler's probabilities into NaN).
    repetition_penalty: float = Field(1.0, ge=0.01, le=100, allow_inf_nan=False,
                                      description="HF-style, over prompt and output, 0.01 to 100; 1 = off, > 1 "
                                                  "discourages repeats")
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False,
                         description="drop tokens less likely than min_p times the most likely one; 0 = off")

    @field_validator("repetition_penalty", "min_p", mode="before")
    @classmethod
    def _number(cls, value):
        return not_a_bool(value)

    def sampling(self, *, do_sample: bool, temperature: float, top_k: int, top_p: float, typical_p: float,
                 seed: int | None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> SamplingParams:
        """The engine's sampling parameters: this model's shared fields plus the API's own."""
        return SamplingParams(
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, typical_p=typical_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, seed=seed,
        )


# ---- what a request needs to know about the server ----------------------------------------------


@dataclass(frozen=True)
class Serving:
    """The server's limits and the loaded model, as the protocol models' `to_engine` needs them."""

    settings: Any  # app.settings.Settings
    context_length: int
    vocab_size: int
    encode: Callable[[str, str], list[int]]  # (text, the field it came from, named if it cannot fit)
    tokenizer: Any

    def decode(self, ids: list[int]) -> str:
        """Text of token ids as the original API repeats a prompt (special tokens left out)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_tokens(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids exactly as the tokenizer's backend joins them (no clean-up of spaces)."""
        return backend_decode(self.tokenizer, ids, skip_special_tokens)

    def check_counts(self, n: int, n_param: str, stops: list[str]) -> None:
        """The per-request limits that do not depend on the prompt."""
        limits = self.settings
        if n > limits.max_num_return_sequences:
            raise RequestRefused(f"{n_param}: at most {limits.max_num_return_sequences} on this server "
                                 f"(MAX_NUM_RETURN_SEQUENCES); got {n}", n_param, "too_many_sequences")
        if len(stops) > limits.max_stop_sequences:
            raise RequestRefused(f"stop: at most {limits.max_stop_sequences} stop strings on this server "
                                 f"(MAX_STOP_SEQUENCES); got {len(stops)}", "stop", "too_many_stop_sequences")
        longest = max((len(stop) for stop in stops), default=0)
        if longest > limits.max_stop_length:
            # Every step of every row compares its text with each stop string: long ones slow the whole batch.
            raise RequestRefused(f"stop: a stop string may have at most {limits.max_stop_length} characters on this "
                                 f"server (MAX_STOP_LENGTH); got one of {longest}", "stop", "stop_too_long")

    def check_fits(self, prompt_tokens: int, new_tokens: int, param: str, n: int = 1) -> None:
        """Refuse, never truncate, a prompt and length that the model or the server cannot hold."""
        if prompt_tokens + new_tokens > self.context_length:
            raise RequestRefused(
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{prompt_tokens + new_tokens} tokens ({prompt_tokens} in the prompt, {new_tokens} to generate). "
                f"Shorten the prompt or lower {param}.", param, "context_length_exceeded",
            )
        limit = self.settings.max_new_tokens
        if new_tokens > limit:
            raise RequestRefused(
                f"{param} asks for {new_tokens} new tokens; this server allows at most {limit} (MAX_NEW_TOKENS)",
                param, "too_many_tokens",
            )
        budget = self.settings.max_batch_tokens
        if n * (prompt_tokens + new_tokens) > budget:
            raise RequestRefused(
                f"{n} sequence(s) of {prompt_tokens + new_tokens} tokens need {n * (prompt_tokens + new_tokens)} "
                f"tokens of batch space; this server allows {budget} (MAX_BATCH_TOKENS)", param, "too_many_tokens",
            )

    def room(self, prompt_tokens: int, n: int) -> int:
        """The most new tokens a prompt can get: context, MAX_NEW_TOKENS and the batch budget allowing."""
        limits = self.settings
        room = min(self.context_length - prompt_tokens, limits.max_new_tokens,
                   limits.max_batch_tokens // n - prompt_tokens)
        return max(room, 1)  # at least one, so that a prompt that fills the context gets a clear error


def backend_decode(tokenizer, ids, skip_special_tokens: bool) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
