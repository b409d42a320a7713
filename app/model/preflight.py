"""Checks the server runs before gunicorn forks its worker: settings that cannot work, a model not on disk.

They run in the gunicorn master, which serves no request: importing torch or transformers there would
keep their memory (a few hundred MB) resident for nothing, so this module and what it imports use the
standard library and huggingface_hub only. What needs torch (is a CUDA device there? does the model
fit?) is checked in the worker as it boots; a refusal there ends the worker with the boot-error status,
which stops the master too.
"""

from __future__ import annotations

import importlib.util
import os

from app.model.errors import ModelLoadError, device_setting, float16_on_cpu_message, no_cuda_message, offload_on_cpu_message
from app.model.files import check_model_available
from app.settings import Settings

__all__ = ["check_device_available", "check_model_available"]


def torch_has_gpu_support() -> bool:
    """Whether the installed torch is built with CUDA (or ROCm), told from its files without importing it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    lib = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    return any(os.path.exists(os.path.join(lib, name)) for name in ("libtorch_cuda.so", "libtorch_hip.so", "torch_cuda.dll"))


def check_device_available(settings: Settings) -> None:
    """Fail fast on device settings that cannot work with this torch build, whatever the hardware."""
    gpu_build = torch_has_gpu_support()
    if settings.device.startswith("cuda") and not gpu_build:
        raise ModelLoadError(no_cuda_message(device_setting(settings)) + " (this PyTorch is built without CUDA)")
    on_cpu = settings.device == "cpu" or (settings.device == "auto" and not gpu_build)
    if on_cpu and settings.dtype == "float16":
        raise ModelLoadError(float16_on_cpu_message())
    if on_cpu and settings.offload == "auto":
        why = device_setting(settings) + ("" if settings.device == "cpu" else ", and this PyTorch has no CUDA")
        raise ModelLoadError(offload_on_cpu_message(why))
