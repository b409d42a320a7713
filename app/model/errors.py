"""Why a model cannot be served: the error types, and the messages that both the pre-fork checks (which
must not import torch) and the loader in the worker raise, so the operator reads the same words either way.
"""

from __future__ import annotations

from app.settings import Settings


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what was looked for, where, and what to do."""


class QuantizationError(ModelLoadError):
    """QUANTIZE cannot be applied to this model, device or dtype; the message says what would work."""


def device_setting(settings: Settings) -> str:
    """How the operator chose the device, for messages: `DEVICE=cuda:0` or the legacy key behind it."""
    if "device" not in settings.model_fields_set and settings.srvrest_cuda_dev is not None:
        return f"SRVREST_CUDA_DEV={settings.srvrest_cuda_dev} (DEVICE={settings.device})"
    return f"DEVICE={settings.device}"


def no_cuda_message(setting: str) -> str:
    return f"{setting} but no CUDA device is available; use DEVICE=cpu or DEVICE=auto"


def float16_on_cpu_message() -> str:
    return (
        "DTYPE=float16 is not supported on the CPU (CPUs compute it slowly, and its narrow range can "
        "overflow); use DTYPE=bfloat16 (half the memory of float32, float32's range) or DTYPE=float32"
    )


def offload_on_cpu_message(why: str) -> str:
    """`why`: how the model came to run on the CPU, e.g. "DEVICE=cpu"."""
    return (
        f"OFFLOAD=auto keeps on the CPU the weights that do not fit on the GPU, but the model runs on the CPU "
        f"({why}); set OFFLOAD=none, and DTYPE=bfloat16 to halve the memory a model needs on the CPU"
    )
