"""Every setting of the server, read and validated in one place at boot.

Values come from the environment; a `.env` file in the working directory supplies the documented
defaults for anything the environment leaves unset. A bad value stops the server with one line
that names the setting, the value and what is allowed (see `load_settings`).
"""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import ByteSize, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator
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
    model_id: str = Field(DEFAULT_MODEL, description="the model to serve: a Hugging Face repo id (prefetched into the "
                          "cache; never downloaded at run time) or a folder that `save_pretrained` wrote")
    model_revision: str = Field("main", description="branch, tag or commit of MODEL_ID in the Hugging Face cache")
    device: str = Field("auto", description="where the model runs: auto = the first CUDA GPU if there is one, else "
                        "the CPU", json_schema_extra={"allowed": "auto, cpu, cuda, cuda:N"})
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="precision of the weights and the computation: auto = bfloat16 on GPUs that support it "
        "(float16 on older ones), float32 on the CPU (bfloat16 when float32 does not fit); float16 is refused on the CPU",
    )
    quantize: Literal["none", "int8", "auto"] = Field(
        "none", description="int8: linear layers with int8 weights, the fastest way to serve on a CPU (CPU and "
        "float32 only; see app/model/int8.py); auto: int8 where it applies (on the CPU, float32 weights, GPT-2, "
        "GPT-Neo or GPT-J), none elsewhere (GPUs, DTYPE=bfloat16); none: the weights as loaded",
    )
    cpu_kernels: Literal["packed", "reference"] = Field(
        "packed", description="float32 on the CPU (QUANTIZE=none): packed = the linear layers' weights laid out "
        "once for oneDNN, about twice as fast at a few rows (see app/model/packed.py), results within float32 "
        "rounding of transformers'; reference = transformers' own layers, bit for bit",
    )

    # Memory: what the model may use, and what happens when it does not fit (see app/model/fit.py).
    memory_limit: ByteSize = Field(
        ByteSize(0), description="most memory (RAM on the CPU, GPU memory on a GPU) the model, its key/value cache "
        "and working space may use, e.g. 12GiB; 0 = whatever is free at boot",
    )
    offload: Literal["none", "auto"] = Field(
        "none", description="auto: on a GPU, weights that do not fit stay in CPU RAM (slower); none: they must fit",
    )
    fit_check: bool = Field(True, description="refuse to start, or lower the batch limits, when the model would not fit")

    # HTTP.
    host: str = Field("127.0.0.1", description="address to listen on; 0.0.0.0 (or ::) for every interface, as in a container")
    port: int = Field(49151, ge=1, le=65535, description="TCP port to listen on")
    published_address: str | None = Field(
        None, description="the address a container runtime publishes the port on (compose sets it from "
        "BIND_ADDRESS); a loopback one means only this machine can connect, whatever HOST is",
    )
    max_connections: int = Field(
        4096, ge=16, le=65536, description="most open HTTP connections; each costs some memory and a file "
        "descriptor, not a thread, so idle, slow and streaming clients never hold up others; more wait in the backlog",
    )
    header_timeout: float = Field(
        10.0, gt=0, le=3600, description="seconds a client has to send a request's line and headers (also how "
        "long a kept-alive connection may stay idle); then the connection is closed",
    )
    body_timeout: float = Field(
        30.0, gt=0, le=3600, description="seconds a client has to send a request's body; then it gets a 408",
    )
    http_threads: int = Field(64, ge=2, le=1024, description="no longer used: connections cost no thread "
                              "(see MAX_CONNECTIONS); still accepted so that existing configurations start")
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024, description="largest request body accepted, in bytes; "
                                "larger ones get a 413")
    graceful_timeout: float = Field(120.0, ge=0, description="seconds running generations get to finish on SIGTERM")

    # Per-request limits.
    max_new_tokens: int = Field(1024, ge=1, description="most tokens one sequence may generate")
    max_num_return_sequences: int = Field(8, ge=1, le=64, description="most sequences one request may ask for "
                                          "(num_return_sequences, n)")
    max_stop_sequences: int = Field(4, ge=0, le=64, description="most stop strings one request may give")
    chat_template: str | None = Field(
        None, description="Jinja file (transformers' chat template format) that turns /v1/chat/completions "
        "messages into the prompt; unset = the tokenizer's own template, else a plain User:/Assistant: transcript",
    )
    max_stop_length: int = Field(
        256, ge=1, le=65536, description="most characters in one stop string; every decoding step compares "
        "each row's new text with its stop strings, so long ones would slow every request in the batch",
    )

    # Engine: batching and backpressure.
    max_batch_size: int = Field(32, ge=1, le=1024, description="most sequences decoded together")
    max_batch_tokens: int = Field(32768, ge=16, description="most tokens (prompt + new, padded) held by the batch")
    max_queue: int = Field(128, ge=1, description="requests allowed to wait for a place in the batch")
    queue_timeout: float = Field(60.0, gt=0, description="seconds a request may wait before it is refused")
    torch_threads: int = Field(0, ge=0, description="intra-op threads; 0 = physical cores")

    # Access control: with keys set, every route but the health check needs one (see app/auth.py).
    api_key: str | None = Field(None, description="API keys, comma-separated; unset or empty = no auth")
    api_key_file: str | None = Field(None, description="file with one API key per line (# comments allowed)")
    cors_origins: str | None = Field(None, description='"*" or comma-separated origins allowed to call from a browser')

    # Logs.
    log_format: Literal["text", "json"] = Field("text", description="text lines, or one JSON object per line "
                                                "(request id, status, tokens as fields) for log collectors")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="least severe log lines written")

    # Legacy keys of the original project's .env; used only where the new keys are unset.
    srvrest_model: int | None = Field(None, ge=0, le=len(LEGACY_MODELS) - 1, description="the original project's "
                                      "model index (0 gpt2, 1 gpt-neo-125M, 2 gpt-neo-1.3B, 3 gpt-neo-2.7B, "
                                      "4 gpt-j-6B); used only when MODEL_ID is unset")
    srvrest_cuda_dev: int | None = Field(None, ge=-1, description="the original project's device: -1 = the CPU, "
                                         "N = cuda:N; used only when DEVICE is unset")

    _api_keys: tuple[str, ...] = PrivateAttr(())

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("quantize")
    @classmethod
    def _check_quantize(cls, value: str, info: ValidationInfo) -> str:
        # What the settings alone rule out; app/model/int8.py checks the loaded model (DEVICE=auto on a
        # GPU machine, the architecture) again at load time.
        if value == "int8":
            if str(info.data.get("device", "")).startswith("cuda"):
                raise ValueError("int8 runs on the CPU only; use DEVICE=cpu with it, or QUANTIZE=none on a GPU")
            if info.data.get("dtype") in ("float16", "bfloat16"):
                raise ValueError(f"int8 quantizes float32 weights; use DTYPE=float32 (or auto) with it, "
                                 f"not DTYPE={info.data['dtype']}")
        return value

    @field_validator("model_id", "model_revision")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("dtype", "quantize", "cpu_kernels", "offload", "log_format", "log_level", mode="before")
    @classmethod
    def _lower_case(cls, value):
        """Choices are case-insensitive: QUANTIZE=INT8 and LOG_LEVEL=DEBUG mean what they say."""
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("api_key")
    @classmethod
    def _check_api_keys(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None  # `API_KEY=` (e.g. an empty compose variable) means no key
        for key in value.split(","):
            _check_key(key.strip(), "a key between commas")
        return value

    @field_validator("api_key_file")
    @classmethod
    def _check_api_key_file(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        keys = read_key_file(value)
        if not keys:
            raise ValueError("the file holds no key (one key per line; blank lines and # comments are skipped)")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for origin in value.split(","):
            origin = origin.strip()
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(f"{origin!r} is not * or an origin like https://example.com or http://localhost:3000")
        return value

    @field_validator("chat_template")
    @classmethod
    def _check_chat_template(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        import jinja2  # here: only a server with a template file pays for the import

        try:
            with open(value, encoding="utf-8") as file:
                jinja2.Environment().parse(file.read())
        except FileNotFoundError:
            raise ValueError("no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot be read: {exc}") from None
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"is not a valid Jinja template: {exc.message} (line {exc.lineno})") from None
        return value

    @model_validator(mode="after")
    def _read_api_keys(self) -> "Settings":
        keys = [k.strip() for k in self.api_key.split(",")] if self.api_key else []
        if self.api_key_file:
            keys += read_key_file(self.api_key_file)
        self._api_keys = tuple(dict.fromkeys(keys))
        return self

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

    @property
    def api_keys(self) -> tuple[str, ...]:
        """Every accepted API key, from API_KEY and API_KEY_FILE; empty when auth is off."""
        return self._api_keys

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",")] if self.cors_origins else []


# An origin as browsers send it: scheme, host and optional port, no path.
_ORIGIN = re.compile(r"https?://[^/\s,]+")

# Settings whose values never appear in an error message.
SECRET_SETTINGS = {"API_KEY"}


def _check_key(key: str, where: str) -> None:
    if not key:
        raise ValueError(f"{where} is empty")
    if not all(33 <= ord(ch) <= 126 for ch in key):
        raise ValueError(f"{where} has spaces or characters other than printable ASCII, which HTTP headers cannot carry")


def read_key_file(path: str) -> list[str]:
    """Keys of an API_KEY_FILE: one a line, surrounding whitespace, blank lines and `#` comments skipped."""
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except FileNotFoundError:
        raise ValueError("no such file") from None
    except IsADirectoryError:
        raise ValueError("is a folder, not a file") from None
    except PermissionError:
        raise ValueError(f"the server's user (uid {os.getuid()}) may not read it") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot be read: {exc}") from None
    keys = []
    for number, line in enumerate(lines, 1):
        key = line.strip()
        if key and not key.startswith("#"):
            _check_key(key, f"the key on line {number}")
            keys.append(key)
    return keys


def load_settings(**overrides) -> Settings:
    """Read the settings; on a bad value raise SettingsError with one line per problem."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            name = str(error["loc"][0]).upper() if error["loc"] else "settings"
            value = "<hidden>" if name in SECRET_SETTINGS else error.get("input")
            reason = error["msg"].removeprefix("Value error, ")
            lines.append(f"setting {name}={value!r} is invalid: {reason}")
        raise SettingsError("\n".join(lines)) from None
