"""Every setting of the server, read and validated in one place at boot.

Values come from the environment; a `.env` file in the working directory supplies the documented
defaults for anything the environment leaves unset. A bad value stops the server with one line
that names the setting, the value and what is allowed (see `load_settings`).
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The original project's `.env` chose the model by index into this list (SRVREST_MODEL).
LEGACY_MODELS = (
    "gpt2",
    "EleutherAI/gpt-neo-125M",
    "EleutherAI/gpt-neo-1.3B",
    "EleutherAI/gpt-neo-2.7B",
    "EleutherAI/gpt-j-6B",
)

DEFAULT_MODEL = "EleutherAI/gpt-neo-125M"


class SettingsError(ValueError):
    """A setting has a value the server cannot start with; the message is meant for the operator."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True)

    # What to serve, and where.
    model_id: str = DEFAULT_MODEL
    model_revision: str = "main"
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    # HTTP.
    host: str = "127.0.0.1"
    port: int = Field(49151, ge=1, le=65535)
    http_threads: int = Field(64, ge=2, le=1024, description="concurrent HTTP connections the worker serves")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    graceful_timeout: float = Field(120.0, ge=0, description="seconds running generations get to finish on SIGTERM")

    # Per-request limits.
    max_new_tokens: int = Field(1024, ge=1, description="most tokens one sequence may generate")
    max_num_return_sequences: int = Field(8, ge=1, le=64)
    max_stop_sequences: int = Field(4, ge=0, le=64)

    # Engine: batching and backpressure.
    max_batch_size: int = Field(32, ge=1, le=1024, description="most sequences decoded together")
    max_batch_tokens: int = Field(32768, ge=16, description="most tokens (prompt + new, padded) held by the batch")
    max_queue: int = Field(128, ge=0, description="requests allowed to wait for a place in the batch")
    queue_timeout: float = Field(60.0, gt=0, description="seconds a request may wait before it is refused")
    torch_threads: int = Field(0, ge=0, description="intra-op threads; 0 = physical cores")

    # Legacy keys of the original project's .env; used only where the new keys are unset.
    srvrest_model: int | None = Field(None, ge=0, le=len(LEGACY_MODELS) - 1)
    srvrest_cuda_dev: int | None = Field(None, ge=-1)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("model_id", "model_revision")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _apply_legacy_keys(self) -> "Settings":
        # An old .env sets only SRVREST_*; an explicit MODEL_ID / DEVICE wins over them.
        if self.srvrest_model is not None and "model_id" not in self.model_fields_set:
            object.__setattr__(self, "model_id", LEGACY_MODELS[self.srvrest_model])
        if self.srvrest_cuda_dev is not None and "device" not in self.model_fields_set:
            legacy_device = "cpu" if self.srvrest_cuda_dev < 0 else f"cuda:{self.srvrest_cuda_dev}"
            object.__setattr__(self, "device", legacy_device)
        return self

    @property
    def model_is_local_folder(self) -> bool:
        return os.path.isdir(self.model_id)


def load_settings(**overrides) -> Settings:
    """Read the settings; on a bad value raise SettingsError with one line per problem."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "settings"
            value = error.get("input")
            reason = error["msg"].removeprefix("Value error, ")
            lines.append(f"setting {name}={value!r} is invalid: {reason}")
        raise SettingsError("\n".join(lines)) from None
