"""Request and response bodies of the original API (`POST /generate`, `POST /`, `POST /generate_stream`).

Field names, defaults and meanings are the original server's; fields after the first block are
additions that old clients never send (requests) or may ignore (responses). The routes build their
responses from these models too, so the OpenAPI document generated from them matches the wire.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator

from app.api.protocol import (
    INT64_MAX,
    FinishReason,
    RequestRefused,
    SamplingFields,
    Serving,
    Usage,
    no_lone_surrogates,
    not_a_bool,
)
from app.engine import GenerationRequest

_WHITESPACE = re.compile(r"\s+")


def decode_base64_text(value: str) -> str:
    """Lenient base64: whitespace and line breaks ignored, padding optional, either alphabet; then UTF-8."""
    compact = _WHITESPACE.sub("", value).translate(str.maketrans("-_", "+/")).rstrip("=")
    try:
        raw = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"decodes to bytes that are not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


class TextInput(BaseModel):
    """`{"plain": "..."}` or `{"in_64": "<base64 of UTF-8>"}`; `plain` wins when both are given."""

    model_config = ConfigDict(extra="forbid")

    plain: str | None = Field(None, description="the prompt as text")
    in_64: str | None = Field(
        None, description="the prompt as base64 of its UTF-8 bytes; whitespace, line breaks and missing padding "
                          "are tolerated; ignored when `plain` is given",
    )

    @field_validator("plain")
    @classmethod
    def _valid_unicode(cls, value: str | None) -> str | None:
        return no_lone_surrogates(value)

    @field_validator("in_64")
    @classmethod
    def _decode(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or info.data.get("plain") is not None:  # `plain` wins: `in_64` is not even read
            return None
        return decode_base64_text(value)

    @model_validator(mode="after")
    def _one_given(self) -> "TextInput":
        if self.plain is None and self.in_64 is None:
            raise ValueError('needs "plain" (the prompt) or "in_64" (the prompt in base64)')
        return self

    @property
    def prompt(self) -> str:
        return self.plain if self.plain is not None else self.in_64


_NUMBERS = ("top_p", "top_k", "temperature", "max_length", "num_return_sequences", "max_new_tokens", "typical_p",
            "seed")


class LegacyGenerateRequest(SamplingFields):
    # Unknown fields are ignored, as the original did; NaN and infinities (which Python's JSON parser
    # accepts) are refused rather than handed to the sampler.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    text: TextInput = Field(description='the prompt: `{"plain": "..."}` or `{"in_64": "<base64>"}`')
    do_sample: StrictBool = Field(False, description="sample instead of greedy decoding")
    top_p: float = Field(100, description="nucleus sampling; any value >= 1 turns it off")
    top_k: int = Field(50, ge=0, le=INT64_MAX, description="top-k filter; 0 turns it off")
    temperature: float = Field(1.0, ge=0, description="must be > 0 when sampling; ignored by greedy decoding")
    max_length: int = Field(20, ge=1, description="total length in tokens, prompt included")
    num_return_sequences: int = Field(1, ge=1, description="completions to return; more than 1 needs do_sample")

    # Additions: per-request controls the engine offers beyond the original API.
    max_new_tokens: int | None = Field(None, ge=1, description="new tokens to generate; overrides max_length")
    typical_p: float = Field(1.0, gt=0, description="typical sampling mass; >= 1 turns it off")
    seed: int | None = Field(None, ge=0, le=INT64_MAX, description="the same seed gives the same text")
    stop: list[str] = Field(default_factory=list, description="strings that end a sequence (not returned)")

    @field_validator("text", mode="before")
    @classmethod
    def _text_is_object(cls, value):
        if not isinstance(value, dict):
            raise ValueError(
                f'must be an object, {{"plain": "<prompt>"}} or {{"in_64": "<base64 of the prompt>"}}; '
                f"got {_json_type(value)}"
            )
        return value

    @field_validator(*_NUMBERS, mode="before")
    @classmethod
    def _not_a_bool(cls, value):
        return not_a_bool(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        return no_lone_surrogates([value] if isinstance(value, str) else value)

    # Field validators (not a model validator) so that each error names its field; `do_sample` is
    # declared first and so is already validated when these run.
    @field_validator("temperature")
    @classmethod
    def _temperature_when_sampling(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("do_sample") and value <= 0:
            raise ValueError("must be > 0 when do_sample is true")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p_when_sampling(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("do_sample") and value <= 0:
            raise ValueError("must be > 0 when do_sample is true (values >= 1 turn it off)")
        return value

    @field_validator("num_return_sequences")
    @classmethod
    def _several_need_sampling(cls, value: int, info: ValidationInfo) -> int:
        if value > 1 and info.data.get("do_sample") is False:
            raise ValueError("must be 1 unless do_sample is true: greedy decoding gives the same text every time")
        return value

    def to_engine(self, serving: Serving) -> tuple[GenerationRequest, str]:
        """The engine request, and the prompt as the answer repeats it (decoded, for `in_64`)."""
        serving.check_counts(self.num_return_sequences, "num_return_sequences", self.stop)
        prompt_ids = serving.encode(self.text.prompt, "text")
        if self.max_new_tokens is not None:
            new_tokens, param = self.max_new_tokens, "max_new_tokens"
        else:
            new_tokens, param = self.max_length - len(prompt_ids), "max_length"
            if new_tokens < 1:
                raise RequestRefused(
                    f"max_length ({self.max_length}) counts the prompt too and must exceed the prompt's "
                    f"{len(prompt_ids)} tokens", "max_length", "max_length_too_small",
                )
        serving.check_fits(len(prompt_ids), new_tokens, param, self.num_return_sequences)
        sampling = self.sampling(do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k,
                                 top_p=self.top_p, typical_p=self.typical_p, seed=self.seed)
        request = GenerationRequest(prompt_ids=tuple(prompt_ids), max_new_tokens=new_tokens, sampling=sampling,
                                    n=self.num_return_sequences, stop=tuple(self.stop))
        return request, serving.decode(prompt_ids)


def _json_type(value) -> str:
    names = {str: "a string", list: "an array", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


# ---- Responses -----------------------------------------------------------------------------------

class Sentence(BaseModel):
    generated_text: str = Field(
        description="the prompt (decoded, for `in_64`) followed by the generated continuation; special tokens "
                    "removed, stop strings cut off",
    )
    finish_reason: FinishReason | None = Field(
        description='"length": max_length / max_new_tokens reached; "stop": end-of-text token or a stop string',
    )


class LegacyGenerateResponse(BaseModel):
    """200 answer of `POST /generate` and `POST /`; the first three fields are the original's."""

    model: str = Field(description="id of the served model (a Hugging Face repo id or the folder it was loaded from)")
    s_elapsed: str = Field(pattern=r"^\d+\.\d{2}$", description="seconds spent generating, as a string with two decimals")
    sentences: list[Sentence] = Field(description="one entry per returned sequence (num_return_sequences)")
    usage: Usage


class LegacyStreamDelta(BaseModel):
    """One `data:` event of `POST /generate_stream`: new text of one sequence (the prompt is not repeated)."""

    index: int = Field(description="which sequence, 0 .. num_return_sequences - 1")
    text: str = Field(description="text generated since this sequence's previous event")
    finish_reason: FinishReason | None = Field(description="set on the sequence's last event")


class LegacyStreamDone(BaseModel):
    """The last `data:` event of `POST /generate_stream`, once every sequence has finished."""

    done: Literal[True] = True
    model: str = Field(description="id of the served model")
    s_elapsed: str = Field(pattern=r"^\d+\.\d{2}$", description="seconds spent generating, two decimals")
    finish_reasons: list[FinishReason | None] = Field(description="finish reason of each sequence, by index")
    usage: Usage
