"""Load the served model and its tokenizer once, offline, on the chosen device and dtype.

Three steps, each its own function:

- `plan_fit(settings)` reads only the model's config (no weights) to choose the device, the dtype and
  the attention implementation, estimates the memory the weights, the key/value cache and the working
  space need, and compares that with what the device has. It starts as configured, starts with lower
  batch limits, keeps on the CPU what does not fit on the GPU (OFFLOAD=auto), or refuses with a message
  that says how much is needed, how much is there and which setting would make it fit.
- `load_model(settings, plan)` loads the tokenizer and the weights. Safetensors files are memory-mapped;
  each tensor is created directly in the target dtype on its device and filled chunk by chunk, and the
  file's pages are dropped from the process as soon as they are converted, so the load never holds a
  second copy of the model (its peak resident memory is the converted weights plus a few chunks).
- `check_device_available` / `check_model_available` fail fast before the server forks its worker.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import time
import warnings
from dataclasses import dataclass, replace

import torch

from app.settings import Settings

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Tensor types of the safetensors format (https://github.com/huggingface/safetensors).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Bytes converted at a time while loading: the only transient memory per loading thread.
CHUNK_BYTES = 16 * 1024**2

# Memory no formula below accounts for: allocator slack, kernels' scratch space, small temporaries.
FIXED_OVERHEAD = 128 * 1024**2

# With OFFLOAD=auto the key/value cache stays on the GPU; it may take at most this share of the GPU
# memory (but always room for one full-length sequence), the weights get the rest.
OFFLOAD_CACHE_SHARE = 0.25

GiB = 1024**3


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says what was looked for, where, and what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    model_id: str
    revision: str
    device: torch.device  # where inputs go: the device of the input embeddings
    dtype: torch.dtype
    context_length: int
    load_seconds: float
    device_map: dict | None = None  # set when OFFLOAD=auto left weights in CPU RAM
    attn_implementation: str | None = None

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gib(size: float) -> str:
    """Bytes in the unit operators set limits in; sizes under a GiB in MiB, to stay readable."""
    if size >= GiB:
        return f"{size / GiB:.1f} GiB"
    return f"{size / 1024**2:.1f} MiB"


# ---- device and dtype ---------------------------------------------------------------------------


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
        raise ModelLoadError(
            "DTYPE=float16 is not supported on the CPU (CPUs compute it slowly, and its narrow range can "
            "overflow); use DTYPE=bfloat16 (half the memory of float32, float32's range) or DTYPE=float32"
        )
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


# ---- what the model needs -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a model's memory, read from its config without loading any weight."""

    model_type: str
    parameters: int  # distinct parameters (tied weights counted once)
    buffer_bytes: int  # non-persistent buffers (causal masks, rotary tables), in their own dtypes
    layers: int
    hidden_size: int
    kv_size: int  # width of the keys (and of the values) one layer caches per token
    heads: int
    inner_size: int
    vocab_size: int
    context_length: int


def context_length_of(config) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def meta_model(config, dtype: torch.dtype, attn_implementation: str | None = None):
    """The model's modules with shapes and dtypes but no storage: costs no memory and no time."""
    from transformers import AutoModelForCausalLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, **extra)


def model_shape(config) -> ModelShape:
    model = meta_model(config, torch.float32)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    inner = getattr(text, "n_inner", None) or getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    return ModelShape(
        model_type=config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        buffer_bytes=sum(b.numel() * b.element_size() for b in model.buffers()),
        layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        kv_size=kv_heads * head_dim,
        heads=heads,
        inner_size=inner,
        vocab_size=text.vocab_size,
        context_length=context_length_of(config),
    )


@dataclass(frozen=True)
class MemoryNeed:
    """Bytes a model needs in one dtype: fixed parts plus a cost per token of batch space."""

    weights: int
    cache_per_token: int  # keys and values of every layer
    work_per_token: int  # the largest transient tensors of a prefill, per prompt token
    fixed: int

    @property
    def per_token(self) -> int:
        return self.cache_per_token + self.work_per_token

    def total(self, tokens: int) -> int:
        return self.weights + self.fixed + tokens * self.per_token

    def tokens_within(self, budget: int, weights_elsewhere: int = 0) -> int:
        room = budget - (self.weights - weights_elsewhere) - self.fixed
        return max(0, room // self.per_token)


def memory_need(shape: ModelShape, dtype: torch.dtype, max_batch_size: int) -> MemoryNeed:
    """Estimate, on the safe side, what serving needs besides the interpreter and the libraries.

    The key/value cache holds layers x 2 x kv_size values per token of batch space. A prefill of as
    many prompt tokens as the batch may hold also needs, per token, the attention scores against a
    full context (eager attention keeps them and their softmax in float32), the hidden states and MLP
    activations, and float32 logits (prompt log-probabilities keep one row per prompt token).
    """
    size = dtype.itemsize
    eager = shape.model_type == "gpt_neo" or attention_implementation(shape.model_type, dtype) == "eager"
    scores = shape.heads * shape.context_length * (2 * 4 if eager else size)
    activations = (6 * shape.hidden_size + 2 * shape.inner_size) * size
    logits = shape.vocab_size * 4
    return MemoryNeed(
        weights=shape.parameters * size + shape.buffer_bytes,
        cache_per_token=shape.layers * 2 * shape.kv_size * size,
        work_per_token=scores + activations + logits,
        # Each decoding step keeps a few float32 copies of every row's logits for sampling.
        fixed=FIXED_OVERHEAD + 3 * max_batch_size * shape.vocab_size * 4,
    )


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

    def describe(self) -> str:
        text = (
            f"{self.model_id} on {self.device} as {dtype_name(self.dtype)} needs about {gib(self.needed)} "
            f"at MAX_BATCH_SIZE={self.max_batch_size}, MAX_BATCH_TOKENS={self.max_batch_tokens}; "
            f"{self.budget.describe()}"
        )
        if self.offloaded_bytes:
            text += f"; {gib(self.offloaded_bytes)} of weights stay in CPU RAM (OFFLOAD=auto)"
        return text


def load_config(settings: Settings, folder: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            folder or settings.model_id, revision=settings.model_revision, local_files_only=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_not_found_message(settings, exc)) from exc


def plan_fit(settings: Settings, config=None) -> FitPlan:
    """Decide device, dtype and batch limits from the config and the free memory, or refuse to start."""
    config = config or load_config(settings)
    device = resolve_device(settings.device, device_setting(settings))
    if settings.offload == "auto" and device.type != "cuda":
        raise ModelLoadError(
            f"OFFLOAD=auto keeps on the CPU the weights that do not fit on the GPU, but the model runs on the "
            f"CPU ({device_setting(settings)} on a machine "
            f"{'without' if not torch.cuda.is_available() else 'with'} a CUDA GPU); set OFFLOAD=none, and "
            f"DTYPE=bfloat16 to halve the memory a model needs on the CPU"
        )
    dtype = resolve_dtype(settings.dtype, device)
    shape = model_shape(config)
    budget = memory_budget(device, settings)
    return plan_for(settings, shape, device, dtype, budget, config)


def plan_for(settings: Settings, shape: ModelShape, device: torch.device, dtype: torch.dtype,
             budget: MemoryBudget, config=None) -> FitPlan:
    """`plan_fit` once the facts are known (kept apart so any budget can be tried without the hardware)."""
    plan = _fit(settings, shape, device, dtype, budget)
    if plan is None and settings.dtype == "auto" and device.type == "cpu":
        plan = _fit(settings, shape, device, torch.bfloat16, budget)
        if plan is not None:
            log.warning(
                "DTYPE=auto: %s in float32 would need about %s but %s; loading it as bfloat16 (half the memory)",
                settings.model_id, gib(memory_need(shape, torch.float32, 1).total(_floor_tokens(settings, shape))),
                budget.describe(),
            )
    if plan is None and settings.offload == "auto" and device.type == "cuda":
        plan = _offload(settings, shape, device, dtype, budget, config)
    if plan is None:
        message = _refusal(settings, shape, device, dtype, budget)
        if settings.fit_check:
            raise ModelLoadError(message)
        log.warning("%s; starting anyway because FIT_CHECK=false", message)
        need = memory_need(shape, dtype, settings.max_batch_size)
        return FitPlan(settings.model_id, device, dtype, attention_implementation(shape.model_type, dtype),
                       settings.max_batch_size, settings.max_batch_tokens,
                       need.total(_wanted_tokens(settings, shape)), budget)
    if plan.lowered:
        if not settings.fit_check:
            log.warning(
                "the batch limits need about %s but %s; keeping MAX_BATCH_SIZE=%d, MAX_BATCH_TOKENS=%d because "
                "FIT_CHECK=false (a full batch may run out of memory)",
                gib(memory_need(shape, plan.dtype, settings.max_batch_size).total(_wanted_tokens(settings, shape))),
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
            gib(memory_need(shape, plan.dtype, settings.max_batch_size).total(_wanted_tokens(settings, shape))),
            budget.describe(),
        )
    log.info("fit check: %s", plan.describe())
    return plan


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
    need = memory_need(shape, dtype, settings.max_batch_size)
    wanted = _wanted_tokens(settings, shape)
    tokens = min(wanted, need.tokens_within(budget.bytes))
    if tokens < _floor_tokens(settings, shape):
        return None
    size, batch_tokens, lowered = _limits(settings, tokens, wanted)
    return FitPlan(settings.model_id, device, dtype, attention_implementation(shape.model_type, dtype), size,
                   batch_tokens, need.total(min(batch_tokens, wanted)), budget, lowered)


def _offload(settings, shape, device, dtype, budget, config) -> FitPlan | None:
    """OFFLOAD=auto: the cache and working space stay on the GPU, the weights fill what is left of it,
    and the layers that do not fit stay in CPU RAM (accelerate moves each to the GPU when it runs)."""
    from transformers.integrations.accelerate import infer_auto_device_map

    need = memory_need(shape, dtype, settings.max_batch_size)
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
    if "disk" in device_map.values() or _placement(device_map, embeddings + ".weight") != index:
        return None  # not even the embeddings fit on the GPU, or the rest does not fit in RAM
    sizes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    offloaded = sum(n for name, n in sizes.items() if _placement(device_map, name) == "cpu")
    size, batch_tokens, lowered = _limits(settings, tokens, wanted)
    return FitPlan(settings.model_id, device, dtype, attention_implementation(shape.model_type, dtype), size,
                   batch_tokens, need.total(min(batch_tokens, wanted)) - offloaded, budget, lowered,
                   device_map=dict(device_map), offloaded_bytes=offloaded)


def _module_name(model, module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _placement(device_map: dict, name: str):
    """The device a parameter (or stored tensor) goes to: the longest module prefix in the map wins."""
    best, best_length = device_map.get(""), -1
    for module, where in device_map.items():
        if module and (name == module or name.startswith(module + ".")) and len(module) > best_length:
            best, best_length = where, len(module)
    return best


def _refusal(settings, shape, device, dtype, budget) -> str:
    floor = _floor_tokens(settings, shape)
    need = memory_need(shape, dtype, settings.max_batch_size)
    cache, work = floor * need.cache_per_token, floor * need.work_per_token + need.fixed
    where = "the CPU" if device.type == "cpu" else str(device)
    message = (
        f"{settings.model_id} does not fit in memory: as {dtype_name(dtype)} on {where} it needs about "
        f"{gib(need.total(floor))} (weights {gib(need.weights)}, key/value cache for one {floor}-token sequence "
        f"{gib(cache)}, working space {gib(work)}) but {budget.describe()}."
    )
    fixes = []
    if dtype == torch.float32:
        half = torch.bfloat16 if device.type == "cpu" or gpu_supports_bfloat16(device) else torch.float16
        fixes.append(f"DTYPE={dtype_name(half)} (needs about {gib(memory_need(shape, half, 1).total(floor))})")
    if device.type == "cuda" and settings.offload == "none":
        fixes.append("OFFLOAD=auto (weights that do not fit on the GPU stay in CPU RAM; slower)")
    fixes.append("a smaller model (MODEL_ID)")
    fixes.append("a higher MEMORY_LIMIT" if budget.capped else "more free memory")
    return (
        message + " To make it fit: " + ", or ".join(fixes)
        + ". FIT_CHECK=false starts anyway (it may run out of memory)."
    )


# ---- loading ------------------------------------------------------------------------------------


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


def model_folder(settings: Settings) -> str:
    """The folder holding the model's files: MODEL_ID itself, or its snapshot in the HF cache."""
    if settings.model_is_local_folder:
        return settings.model_id
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(settings.model_id, revision=settings.model_revision, local_files_only=True)
    except Exception as exc:  # the hub client raises several types for "not in the cache"
        raise ModelLoadError(_not_found_message(settings, exc)) from exc


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a memory-mapped safetensors file."""

    file: mmap.mmap
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as file:
            return [os.path.join(folder, name) for name in sorted(set(json.load(file)["weight_map"].values()))]
    single = os.path.join(folder, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def map_safetensors(path: str) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, memory-mapped, nothing read yet but the header."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    start = 8 + header_size
    return {
        name: StoredTensor(
            mapped, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), start + info["data_offsets"][0],
        )
        for name, info in header.items() if name != "__metadata__"
    }


class ConvertingTensor:
    """A stored tensor, created on request directly in the target dtype on its device.

    The loader of `transformers` materialises each state-dict entry with `tensor[...]` (from several
    threads). Here that allocates the final tensor and fills it chunk by chunk from the memory map;
    each chunk's pages are dropped from this process once converted (they stay in the page cache), so
    only the converted weights accumulate.
    """

    def __init__(self, stored: StoredTensor, dtype: torch.dtype, device):
        self.stored = stored
        self.dtype = dtype if stored.dtype.is_floating_point else stored.dtype
        self.device = device
        self.shape = torch.Size(stored.shape)

    def __getitem__(self, index):
        stored = self.stored
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        flat = out.view(-1)
        itemsize = stored.dtype.itemsize
        per_chunk = max(1, CHUNK_BYTES // itemsize)
        for first in range(0, stored.numel, per_chunk):
            count = min(per_chunk, stored.numel - first)
            offset = stored.offset + first * itemsize
            with warnings.catch_warnings():  # read-only buffer: the chunk is only ever read
                warnings.simplefilter("ignore")
                chunk = torch.frombuffer(stored.file, dtype=stored.dtype, count=count, offset=offset)
            flat[first:first + count].copy_(chunk)
            del chunk
            _drop_pages(stored.file, offset, count * itemsize)
        return out if index is Ellipsis else out[index]


def _drop_pages(mapped: mmap.mmap, offset: int, length: int) -> None:
    start = offset - offset % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, start, length + offset - start)


def _close_maps(tensors: dict[str, StoredTensor]) -> None:
    for mapped in {id(t.file): t.file for t in tensors.values()}.values():
        try:
            mapped.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass


def load_weights(folder: str, config, plan: FitPlan):
    """The model on `plan.device` (or across GPU and CPU per `plan.device_map`) in `plan.dtype`."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    device_map = plan.device_map or {"": plan.device}
    options = dict(dtype=plan.dtype, device_map=device_map)
    if plan.attn_implementation:
        options["attn_implementation"] = plan.attn_implementation
    files = safetensors_files(folder)
    if not files:
        log.warning(
            "%s has no safetensors weights, only PyTorch .bin files: loading them takes more memory and time "
            "(convert the checkpoint to safetensors to avoid it)", plan.model_id,
        )
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **options)
    tensors: dict[str, StoredTensor] = {}
    for path in files:
        tensors.update(map_safetensors(path))
    stored_dtypes = {t.dtype for t in tensors.values() if t.dtype.is_floating_point}
    if plan.device.type == "cpu" and stored_dtypes <= {plan.dtype}:
        # Stored as served: the parameters are the memory-mapped file's pages themselves, no copy at all.
        _close_maps(tensors)
        return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **options)
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelLoadError(f"{plan.model_id}: {type(config).__name__} is not a causal language model") from None
    prefix = model_class.base_model_prefix
    state = {}
    for name, stored in tensors.items():
        # Checkpoints may name tensors without the base model's prefix (GPT-2 on the hub does).
        where = _placement(device_map, name if name.startswith(prefix + ".") else f"{prefix}.{name}")
        where = plan.device if where is None else torch.device("cuda", where) if isinstance(where, int) else where
        state[name] = ConvertingTensor(stored, plan.dtype, where)
    try:
        return model_class.from_pretrained(None, config=config, state_dict=state, **options)
    finally:
        del state
        _close_maps(tensors)


def limit_gpu_memory(device: torch.device, limit: int) -> None:
    """Make MEMORY_LIMIT a hard cap for this process's allocations on the GPU."""
    total = torch.cuda.get_device_properties(cuda_index(device)).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), cuda_index(device))


def load_model(settings: Settings, plan: FitPlan | None = None) -> LoadedModel:
    """Load tokenizer and model from local files only; never touches the network."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    folder = model_folder(settings)
    config = load_config(settings, folder)
    plan = plan or plan_fit(settings, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(_not_found_message(settings, exc)) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"model {settings.model_id!r} has no fast tokenizer (tokenizer.json); it is required")
    if plan.device.type == "cuda" and int(settings.memory_limit):
        limit_gpu_memory(plan.device, int(settings.memory_limit))
    try:
        model = load_weights(folder, config, plan)
    except OSError as exc:
        raise ModelLoadError(_not_found_message(settings, exc)) from exc
    model.eval()
    from app.quantization import quantize  # here: app.quantization imports this module

    model = quantize(model, settings)  # QUANTIZE=int8: int8 linear layers; unchanged for QUANTIZE=none
    device = plan.device
    if plan.device_map:
        # The engine puts its inputs on `model.device` (the first parameter's: the input embeddings).
        if model.device != torch.device("cuda", cuda_index(device)):
            raise ModelLoadError(f"OFFLOAD=auto left the input embeddings on {model.device}; they must be on the GPU")
        device = model.device
    seconds = time.perf_counter() - started
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=settings.model_id,
        revision=settings.model_revision,
        device=device,
        dtype=plan.dtype,
        context_length=context_length_of(model.config),
        load_seconds=seconds,
        device_map=plan.device_map,
        attn_implementation=model.config._attn_implementation,
    )
    log.info(
        "loaded model %s (revision %s, %s) on %s as %s in %.2f s; context %d tokens; attention %s%s",
        settings.model_id, settings.model_revision, type(model).__name__, device, loaded.dtype_name, seconds,
        loaded.context_length, loaded.attn_implementation,
        f"; {gib(plan.offloaded_bytes)} of weights in CPU RAM (OFFLOAD=auto)" if plan.offloaded_bytes else "",
    )
    return loaded


# ---- before the server forks its worker ---------------------------------------------------------


def check_device_available(settings: Settings) -> None:
    """Fail fast on device settings that cannot work, before the gunicorn master forks the worker.

    Runs in the master, so it must not initialise CUDA (a forked child cannot use CUDA its parent
    initialised); what needs the GPU itself is checked in the worker by `plan_fit`.
    """
    if settings.device.startswith("cuda") and not torch.backends.cuda.is_built():
        raise ModelLoadError(_no_cuda_message(device_setting(settings)) + " (this PyTorch is built without CUDA)")
    on_cpu = settings.device == "cpu" or (settings.device == "auto" and not torch.backends.cuda.is_built())
    if on_cpu and settings.dtype == "float16":
        resolve_dtype("float16", torch.device("cpu"))  # raises with the explanation
    if on_cpu and settings.offload == "auto":
        raise ModelLoadError(
            f"OFFLOAD=auto keeps on the CPU the weights that do not fit on the GPU, but the model runs on the CPU "
            f"({device_setting(settings)}{'' if settings.device == 'cpu' else ', and this PyTorch has no CUDA'}); "
            f"set OFFLOAD=none, and DTYPE=bfloat16 to halve the memory a model needs on the CPU"
        )


def check_model_available(settings: Settings) -> None:
    """Fail fast, before the server starts, when the model's files are not on this machine."""
    load_config(settings)
