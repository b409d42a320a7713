"""Load the served model and its tokenizer once, offline, on the chosen device and dtype."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from app.settings import Settings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what was looked for, where, and what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    context_length: int
    load_seconds: float

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def device_setting(settings: Settings) -> str:
    """How the operator chose the device, for messages: `DEVICE=cuda:0` or the legacy key behind it."""
    if "device" not in settings.model_fields_set and settings.srvrest_cuda_dev is not None:
        return f"SRVREST_CUDA_DEV={settings.srvrest_cuda_dev} (DEVICE={settings.device})"
    return f"DEVICE={settings.device}"


def _no_cuda_message(setting: str) -> str:
    return f"{setting} but no CUDA device is available; use DEVICE=cpu or DEVICE=auto"


def resolve_device(name: str, setting: str | None = None) -> torch.device:
    setting = setting or f"DEVICE={name}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(_no_cuda_message(setting))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"{setting} but only {torch.cuda.device_count()} CUDA device(s) exist (cuda:0..)"
            )
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ModelLoadError("DTYPE=float16 is not supported on the CPU (too slow and lossy); use float32 or bfloat16")
    return dtype


def context_length_of(config) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def hf_cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _in_cache(model_id: str, revision: str | None = None) -> bool:
    """Whether the HF cache holds this repo (at `revision`: a branch or tag it recorded, or a commit)."""
    repo = os.path.join(hf_cache_dir(), "models--" + model_id.replace("/", "--"))
    if revision is None:
        return os.path.isdir(repo)
    return os.path.isfile(os.path.join(repo, "refs", revision)) or os.path.isdir(os.path.join(repo, "snapshots", revision))


def _first_line(cause: Exception) -> str:
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def _not_found_message(settings: Settings, cause: Exception) -> str:
    model_id, revision = settings.model_id, settings.model_revision
    if settings.model_is_local_folder:
        return (
            f"MODEL_ID={model_id!r} is a folder, but no model loads from it ({_first_line(cause)}); it needs the "
            "config.json, weights and tokenizer files that `save_pretrained` writes"
        )
    if model_id.startswith(("/", "./", "../", "~")):
        return f"MODEL_ID={model_id!r} looks like a folder, but there is no such folder"
    cache = f"the Hugging Face cache at {hf_cache_dir()} (HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')})"
    option = f"--revision {revision} " if revision != "main" else ""
    prefetch = f"`python scripts/prefetch_model.py {option}{model_id}`"
    if not _in_cache(model_id):
        # Not the library's reason: it talks about connecting to the hub, which this server never does.
        return (
            f"model {model_id!r} was not found: it is neither a local folder nor in {cache}. Prefetch it with "
            f"{prefetch} (or rebuild the image with MODEL_ID={model_id})."
        )
    if not _in_cache(model_id, revision):
        return (
            f"model {model_id!r} is in {cache}, but not at revision {revision!r} (MODEL_REVISION). Prefetch that "
            f"revision with {prefetch}."
        )
    # The files are there but do not load: the library's reason is the useful part.
    return (
        f"model {model_id!r} (revision {revision!r}) is in {cache} but does not load: {_first_line(cause)}. "
        f"Prefetch it again with {prefetch}."
    )


def load_model(settings: Settings) -> LoadedModel:
    """Load tokenizer and model from local files only; never touches the network."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(settings.device, device_setting(settings))
    dtype = resolve_dtype(settings.dtype, device)
    source = dict(revision=settings.model_revision, local_files_only=True)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.model_id, **source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_not_found_message(settings, exc)) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"model {settings.model_id!r} has no fast tokenizer (tokenizer.json); it is required")
    try:
        # Weights are memory-mapped from safetensors and materialised directly in the target dtype on the
        # target device: no transient float32 copy of the whole model.
        model = AutoModelForCausalLM.from_pretrained(settings.model_id, dtype=dtype, device_map=device, **source)
    except OSError as exc:
        raise ModelLoadError(_not_found_message(settings, exc)) from exc
    model.eval()
    seconds = time.perf_counter() - started
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=settings.model_id,
        revision=settings.model_revision,
        device=device,
        dtype=dtype,
        context_length=context_length_of(model.config),
        load_seconds=seconds,
    )
    log.info(
        "loaded model %s (revision %s, %s) on %s as %s in %.2f s; context %d tokens",
        settings.model_id, settings.model_revision, type(model).__name__, device, loaded.dtype_name, seconds,
        loaded.context_length,
    )
    return loaded


def check_device_available(settings: Settings) -> None:
    """Fail fast when a CUDA device is asked of a PyTorch built without CUDA.

    Runs in the gunicorn master before it forks the worker, so it must not initialise CUDA (a forked
    child cannot use CUDA its parent initialised); with a CUDA build the worker checks the device.
    """
    if settings.device.startswith("cuda") and not torch.backends.cuda.is_built():
        raise ModelLoadError(_no_cuda_message(device_setting(settings)) + " (this PyTorch is built without CUDA)")


def check_model_available(settings: Settings) -> None:
    """Fail fast, before the server starts, when the model's files are not on this machine."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(settings.model_id, revision=settings.model_revision, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_not_found_message(settings, exc)) from exc
