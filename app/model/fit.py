"""Fit planning: what the device has, and the plan that fits what the model needs (app/model/footprint.py).

`plan_fit(settings)` reads only the model's config (no weights) to choose the device, the dtype and the
attention implementation, estimates the memory the weights, the key/value cache and the working space
need, and compares that with what the device has. It starts as configured, starts with lower batch
limits, keeps on the CPU what does not fit on the GPU (OFFLOAD=auto), or refuses with a message that says
how much is needed, how much is there and which setting would make it fit. `plan_for` is the same
decision from given facts (shape, device, dtype, budget), a pure function testable without the hardware.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from app.model.device import (
    attention_implementation, cuda_index, dtype_name, gpu_supports_bfloat16, resolve_device, resolve_dtype,
)
from app.model.errors import ModelLoadError, device_setting, offload_on_cpu_message
from app.model.files import load_config
from app.model.footprint import MemoryNeed, ModelShape, gib, memory_need, meta_model, model_shape
from app.model.int8 import resolve_quantize
from app.model.layers import CONVERTIBLE_MODEL_TYPES
from app.settings import Settings

log = logging.getLogger(__name__)

# With OFFLOAD=auto the key/value cache stays on the GPU; it may take at most this share of the GPU
# memory (but always room for one full-length sequence), the weights get the rest.
OFFLOAD_CACHE_SHARE = 0.25

# ---- what the device has ------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBudget:
    bytes: int
    what: str  # for messages: "RAM is available", "GPU memory is free on cuda:0", ...
    capped: bool  # MEMORY_LIMIT is what limits it

    def describe(self) -> str:
        return f"{gib(self.bytes)} {self.what}"


def _cgroup_memory_available() -> int | None:
    """Room left under a container's memory limit (cgroup v2), which the host's figures do not show."""
    try:
        with open("/sys/fs/cgroup/memory.max") as limit_file, open("/sys/fs/cgroup/memory.current") as used_file:
            limit, used = limit_file.read().strip(), used_file.read().strip()
    except OSError:
        return None
    if limit == "max":
        return None
    return max(0, int(limit) - int(used))


def ram_available() -> int:
    import psutil

    available = psutil.virtual_memory().available
    in_container = _cgroup_memory_available()
    return min(available, in_container) if in_container is not None else available


def memory_budget(device: torch.device, settings: Settings) -> MemoryBudget:
    limit = int(settings.memory_limit)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(cuda_index(device))
        budget = MemoryBudget(free, f"of GPU memory is free on {device}", False)
    else:
        budget = MemoryBudget(ram_available(), "of RAM is available", False)
    if limit and limit < budget.bytes:
        return MemoryBudget(limit, f"is allowed by MEMORY_LIMIT={settings.memory_limit.human_readable()}", True)
    return budget


# ---- the plan -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitPlan:
    """How the model is served: device, dtype and the batch limits that fit in memory."""

    model_id: str
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str | None
    max_batch_size: int
    max_batch_tokens: int
    needed: int  # estimated bytes on the device at these limits
    budget: MemoryBudget
    lowered: bool = False  # the batch limits are below the configured ones
    device_map: dict | None = None  # OFFLOAD=auto: module -> GPU index or "cpu"
    offloaded_bytes: int = 0  # weights kept in CPU RAM
    quantize: str = "none"  # QUANTIZE as it applies to this device and dtype ("auto" resolved)

    def describe(self) -> str:
        text = (
            f"{self.model_id} on {self.device} as {dtype_name(self.dtype)}"
            f"{' with int8 weights' if self.quantize == 'int8' else ''} needs about {gib(self.needed)} "
            f"at MAX_BATCH_SIZE={self.max_batch_size}, MAX_BATCH_TOKENS={self.max_batch_tokens}; "
            f"{self.budget.describe()}"
        )
        if self.offloaded_bytes:
            text += f"; {gib(self.offloaded_bytes)} of weights stay in CPU RAM (OFFLOAD=auto)"
        return text


def plan_fit(settings: Settings, config=None) -> FitPlan:
    """Decide device, dtype and batch limits from the config and the free memory, or refuse to start."""
    config = config or load_config(settings)
    device = resolve_device(settings.device, device_setting(settings))
    if settings.offload == "auto" and device.type != "cuda":
        machine = "without" if not torch.cuda.is_available() else "with"
        raise ModelLoadError(offload_on_cpu_message(f"{device_setting(settings)} on a machine {machine} a CUDA GPU"))
    dtype = resolve_dtype(settings.dtype, device)
    shape = model_shape(config)
    budget = memory_budget(device, settings)
    return plan_for(settings, shape, device, dtype, budget, config)


def plan_for(settings: Settings, shape: ModelShape, device: torch.device, dtype: torch.dtype,
             budget: MemoryBudget, config=None) -> FitPlan:
    """`plan_fit` once the facts are known (kept apart so any budget can be tried without the hardware)."""
    plan = _fit(settings, shape, device, dtype, budget)
    # int8 computes in float32 whatever the checkpoint: no bfloat16 to fall back to with QUANTIZE=int8.
    if plan is None and settings.dtype == "auto" and device.type == "cpu" and settings.quantize != "int8":
        plan = _fit(settings, shape, device, torch.bfloat16, budget)
        if plan is not None:
            log.warning(
                "DTYPE=auto: %s in float32 would need about %s but %s; loading it as bfloat16 (half the memory)",
                settings.model_id,
                gib(_need(settings, shape, device, torch.float32, 1).total(_floor_tokens(settings, shape))),
                budget.describe(),
            )
    if plan is None and settings.offload == "auto" and device.type == "cuda":
        plan = _offload(settings, shape, device, dtype, budget, config)
    if plan is None:
        message = _refusal(settings, shape, device, dtype, budget)
        if settings.fit_check:
            raise ModelLoadError(message)
        log.warning("%s; starting anyway because FIT_CHECK=false", message)
        need = _need(settings, shape, device, dtype)
        return FitPlan(settings.model_id, device, dtype, attention_implementation(shape.model_type, dtype),
                       settings.max_batch_size, settings.max_batch_tokens,
                       need.total(_wanted_tokens(settings, shape)), budget,
                       quantize=_quantize(settings, shape, device, dtype))
    if plan.lowered:
        if not settings.fit_check:
            log.warning(
                "the batch limits need about %s but %s; keeping MAX_BATCH_SIZE=%d, MAX_BATCH_TOKENS=%d because "
                "FIT_CHECK=false (a full batch may run out of memory)",
                gib(_need(settings, shape, device, plan.dtype).total(_wanted_tokens(settings, shape))),
                budget.describe(), settings.max_batch_size, settings.max_batch_tokens,
            )
            return replace(plan, max_batch_size=settings.max_batch_size,
                           max_batch_tokens=settings.max_batch_tokens, lowered=False)
        changes = [f"MAX_BATCH_TOKENS {settings.max_batch_tokens} -> {plan.max_batch_tokens}"]
        if plan.max_batch_size != settings.max_batch_size:
            changes.append(f"MAX_BATCH_SIZE {settings.max_batch_size} -> {plan.max_batch_size}")
        log.warning(
            "lowered the batch limits to fit in memory: %s (the configured limits would need about %s but %s); "
            "a smaller DTYPE or model, or more memory, leaves room for more",
            ", ".join(changes),
            gib(_need(settings, shape, device, plan.dtype).total(_wanted_tokens(settings, shape))),
            budget.describe(),
        )
    log.info("fit check: %s", plan.describe())
    return plan


def _quantize(settings: Settings, shape: ModelShape, device: torch.device, dtype: torch.dtype) -> str:
    return resolve_quantize(settings.quantize, device.type, dtype, shape.model_type)


def _need(settings: Settings, shape: ModelShape, device: torch.device, dtype: torch.dtype,
          max_batch_size: int | None = None) -> MemoryNeed:
    """`memory_need` for these settings: their batch size, and QUANTIZE as it applies to `dtype`."""
    return memory_need(shape, dtype, max_batch_size or settings.max_batch_size,
                       _quantize(settings, shape, device, dtype))


def _wanted_tokens(settings: Settings, shape: ModelShape) -> int:
    """Batch space the configured limits can really fill: no row is longer than the context."""
    return min(settings.max_batch_tokens, settings.max_batch_size * shape.context_length)


def _floor_tokens(settings: Settings, shape: ModelShape) -> int:
    """The least batch space worth starting with: one sequence as long as any request may be."""
    return min(settings.max_batch_tokens, shape.context_length)


def _limits(settings: Settings, tokens: int, wanted: int) -> tuple[int, int, bool]:
    if tokens >= wanted:
        return settings.max_batch_size, settings.max_batch_tokens, False
    return min(settings.max_batch_size, tokens), tokens, True


def _fit(settings, shape, device, dtype, budget) -> FitPlan | None:
    """The plan with everything on `device`, batch limits lowered as far as needed; None if even one
    full-length sequence does not fit."""
    need = _need(settings, shape, device, dtype)
    wanted = _wanted_tokens(settings, shape)
    tokens = min(wanted, need.tokens_within(budget.bytes))
    if tokens < _floor_tokens(settings, shape):
        return None
    size, batch_tokens, lowered = _limits(settings, tokens, wanted)
    return FitPlan(settings.model_id, device, dtype, attention_implementation(shape.model_type, dtype), size,
                   batch_tokens, need.total(min(batch_tokens, wanted)), budget, lowered,
                   quantize=_quantize(settings, shape, device, dtype))


def _offload(settings, shape, device, dtype, budget, config) -> FitPlan | None:
    """OFFLOAD=auto: the cache and working space stay on the GPU, the weights fill what is left of it,
    and the layers that do not fit stay in CPU RAM (accelerate moves each to the GPU when it runs)."""
    from transformers.integrations.accelerate import infer_auto_device_map

    need = _need(settings, shape, device, dtype)
    wanted = _wanted_tokens(settings, shape)
    floor = _floor_tokens(settings, shape)
    tokens = max(floor, min(wanted, int(budget.bytes * OFFLOAD_CACHE_SHARE) // need.per_token))
    for_weights = budget.bytes - need.fixed - tokens * need.per_token
    if for_weights <= 0 or config is None:
        return None
    ram = ram_available()
    model = meta_model(config, dtype, attention_implementation(shape.model_type, dtype))
    index = cuda_index(device)
    device_map = infer_auto_device_map(
        model, max_memory={index: for_weights, "cpu": ram}, no_split_module_classes=model._no_split_modules,
    )
    embeddings = _module_name(model, model.get_input_embeddings())
    if "disk" in device_map.values() or placement(device_map, embeddings + ".weight") != index:
        return None  # not even the embeddings fit on the GPU, or the rest does not fit in RAM
    sizes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    offloaded = sum(n for name, n in sizes.items() if placement(device_map, name) == "cpu")
    size, batch_tokens, lowered = _limits(settings, tokens, wanted)
    return FitPlan(settings.model_id, device, dtype, attention_implementation(shape.model_type, dtype), size,
                   batch_tokens, need.total(min(batch_tokens, wanted)) - offloaded, budget, lowered,
                   device_map=dict(device_map), offloaded_bytes=offloaded,
                   quantize=_quantize(settings, shape, device, dtype))


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def placement(device_map: dict, name: str):
    """The device a parameter (or stored tensor) goes to: the longest module prefix in the map wins."""
    best, best_length = device_map.get(""), -1
    for module, where in device_map.items():
        if module and (name == module or name.startswith(module + ".")) and len(module) > best_length:
            best, best_length = where, len(module)
    return best


def _refusal(settings, shape, device, dtype, budget) -> str:
    floor = _floor_tokens(settings, shape)
    need = _need(settings, shape, device, dtype)
    cache, work = floor * need.cache_per_token, floor * need.work_per_token + need.fixed
    where = "the CPU" if device.type == "cpu" else str(device)
    message = (
        f"{settings.model_id} does not fit in memory: as {dtype_name(dtype)} on {where} it needs about "
        f"{gib(need.total(floor))} (weights {gib(need.weights)}, key/value cache for one {floor}-token sequence "
        f"{gib(cache)}, working space {gib(work)}) but {budget.describe()}."
    )
    fixes = []
    if device.type == "cpu" and dtype == torch.float32 and _quantize(settings, shape, device, dtype) == "none" \
            and shape.model_type in CONVERTIBLE_MODEL_TYPES:
        int8 = settings.model_copy(update={"quantize": "int8"})
        fixes.append(f"QUANTIZE=int8 (needs about {gib(_need(int8, shape, device, dtype, 1).total(floor))}, "
                     "and runs faster)")
    if dtype == torch.float32:
        half = torch.bfloat16 if device.type == "cpu" or gpu_supports_bfloat16(device) else torch.float16
        half_need = _need(settings, shape, device, half, 1).total(floor)
        fixes.append(f"DTYPE={dtype_name(half)} (needs about {gib(half_need)})")
    if device.type == "cuda" and settings.offload == "none":
        fixes.append("OFFLOAD=auto (weights that do not fit on the GPU stay in CPU RAM; slower)")
    fixes.append("a smaller model (MODEL_ID)")
    fixes.append("a higher MEMORY_LIMIT" if budget.capped else "more free memory")
    return (
        message + " To make it fit: " + ", or ".join(fixes)
        + ". FIT_CHECK=false starts anyway (it may run out of memory)."
    )
