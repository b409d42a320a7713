"""Device and dtype: which device and precision a setting asks for, and what each model type needs there."""

from __future__ import annotations

import torch

from app.model.errors import ModelLoadError, float16_on_cpu_message, no_cuda_message

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str, setting: str | None = None) -> torch.device:
    setting = setting or f"DEVICE={name}"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(no_cuda_message(setting))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelLoadError(
                f"{setting} but only {torch.cuda.device_count()} CUDA device(s) exist (cuda:0..)"
            )
    return device


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def gpu_supports_bfloat16(device: torch.device) -> bool:
    # Native support only (Ampere and newer): older cards emulate bfloat16, far slower than float16.
    return torch.cuda.get_device_capability(cuda_index(device)) >= (8, 0)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype a setting asks for on a device; `auto` is the fastest safe one (on the CPU, float32 —
    `plan_fit` falls back to bfloat16 when float32 does not fit)."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if gpu_supports_bfloat16(device) else torch.float16
        return torch.float32
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ModelLoadError(float16_on_cpu_message())
    return dtype


def attention_implementation(model_type: str, dtype: torch.dtype) -> str | None:
    """The attention code to run, None for the library's default.

    In float16 GPT-J's default (scaled dot-product) attention multiplies queries by keys in float16,
    where large scores overflow to inf and the softmax turns them into NaN; its eager implementation
    does that product in float32. GPT-Neo has only an eager implementation, which upcasts likewise;
    GPT-2 scales its scores before the product and stays in range.
    """
    if model_type == "gptj" and dtype == torch.float16:
        return "eager"
    return None


def limit_gpu_memory(device: torch.device, limit: int) -> None:
    """Make MEMORY_LIMIT a hard cap for this process's allocations on the GPU."""
    total = torch.cuda.get_device_properties(cuda_index(device)).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), cuda_index(device))
