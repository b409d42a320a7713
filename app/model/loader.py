"""Load the served model and its tokenizer once, offline, on the device and dtype the fit plan chose."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from app.allocator import release_free_memory
from app.model.checkpoint_embedding import embed_from_checkpoint
from app.model.device import cuda_index, dtype_name, limit_gpu_memory
from app.model.errors import ModelLoadError
from app.model.files import load_config, model_folder, not_found_message
from app.model.fit import FitPlan, plan_fit
from app.model.footprint import context_length_of, gib
from app.model.int8 import quantize
from app.model.packed import pack_linear_layers, packing_applies
from app.model.safetensors_stream import load_weights, stored_float_dtype
from app.settings import Settings

log = logging.getLogger(__name__)


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


def _loading_plan(plan: FitPlan, folder: str) -> FitPlan:
    """The plan to load the weights by: for int8, a float16 or bfloat16 checkpoint is loaded as stored
    (memory-mapped, no copy), and its int8 rows are made from those weights a slice at a time; converting
    it to float32 first would hold twice the checkpoint (GPT-J-6B: 22.5 GiB) before quantizing it."""
    if plan.quantize != "int8":
        return plan
    stored = stored_float_dtype(folder)
    return replace(plan, dtype=stored) if stored in (torch.float16, torch.bfloat16) else plan


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
        raise ModelLoadError(not_found_message(settings, exc)) from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"model {settings.model_id!r} has no fast tokenizer (tokenizer.json); it is required")
    if plan.device.type == "cuda" and int(settings.memory_limit):
        limit_gpu_memory(plan.device, int(settings.memory_limit))
    try:
        model = load_weights(folder, config, _loading_plan(plan, folder))
    except OSError as exc:
        raise ModelLoadError(not_found_message(settings, exc)) from exc
    model.eval()
    packed = settings.cpu_kernels == "packed" and packing_applies(plan.device.type, plan.dtype, plan.quantize,
                                                                 model.config.model_type)
    if packed or plan.quantize == "int8":  # lm_head is about to get a copy of the vocabulary matrix of its own
        embed_from_checkpoint(model, folder)
    model = quantize(model, plan.quantize)  # int8 linear layers where QUANTIZE resolved to int8
    if packed:
        model = pack_linear_layers(model)
    release_free_memory()  # what loading and converting the weights freed
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
