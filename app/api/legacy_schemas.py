"""Request body of the original API (`POST /generate`), validated with pydantic.

Field names, defaults and meanings are the original server's; fields after the first block are
additions that old clients never send.
"""

from __future__ import annotations

import base64
import binascii
import re

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator, model_validator

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

    plain: str | None = None
    in_64: str | None = None

    @field_validator("in_64")
    @classmethod
    def _decode(cls, value: str | None) -> str | None:
        return None if value is None else decode_base64_text(value)

    @model_validator(mode="after")
    def _one_given(self) -> "TextInput":
        if self.plain is None and self.in_64 is None:
            raise ValueError('needs "plain" (the prompt) or "in_64" (the prompt in base64)')
        return self

    @property
    def prompt(self) -> str:
        return self.plain if self.plain is not None else self.in_64


class LegacyGenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: TextInput
    do_sample: StrictBool = False
    top_p: float = Field(100, description="nucleus sampling; any value >= 1 turns it off")
    top_k: int = Field(50, ge=0, description="top-k filter; 0 turns it off")
    temperature: float = Field(1.0, ge=0, description="must be > 0 when sampling")
    max_length: int = Field(20, ge=1, description="total length in tokens, prompt included")
    num_return_sequences: int = Field(1, ge=1)

    # Additions: per-request controls the engine offers beyond the original API.
    max_new_tokens: int | None = Field(None, ge=1, description="new tokens to generate; overrides max_length")
    typical_p: float = Field(1.0, gt=0, description="typical sampling mass; >= 1 turns it off")
    repetition_penalty: float = Field(1.0, gt=0, description="1 = off; > 1 discourages repeats")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="the same seed gives the same text")
    stop: list[str] = Field(default_factory=list, description="strings that end a sequence (not returned)")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        return [value] if isinstance(value, str) else value

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
