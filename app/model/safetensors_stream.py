"""The streaming safetensors loader: weights created in their final dtype and device, chunk by chunk.

Safetensors files are memory-mapped; each tensor is created directly in the target dtype on its device
and filled chunk by chunk, and the file's pages are dropped from the process as soon as they are
converted, so the load never holds a second copy of the model: its peak resident memory is the converted
weights plus a few chunks (about 1.0x the weights, where `from_pretrained` on its own peaks near 3x).
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
import warnings
from dataclasses import dataclass

import torch

from app.model.errors import ModelLoadError
from app.model.fit import FitPlan, placement

log = logging.getLogger(__name__)

# Tensor types of the safetensors format (https://github.com/huggingface/safetensors).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

# Bytes converted at a time while loading: the only transient memory per loading thread.
CHUNK_BYTES = 16 * 1024**2


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


def read_header(path: str) -> tuple[int, dict]:
    """A safetensors file's header (tensor name -> dtype, shape, data offsets) and where its data starts."""
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    header.pop("__metadata__", None)
    return 8 + header_size, header


def map_safetensors(path: str) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, memory-mapped, nothing read yet but the header."""
    start, header = read_header(path)
    with open(path, "rb") as file:
        mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    return {
        name: StoredTensor(
            mapped, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), start + info["data_offsets"][0],
        )
        for name, info in header.items()
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


def stored_float_dtype(folder: str) -> torch.dtype | None:
    """The floating dtype of every tensor of the checkpoint's safetensors files (only their headers are
    read); None when they store several, or there are none."""
    stored = {SAFETENSORS_DTYPES[info["dtype"]] for path in safetensors_files(folder)
              for info in read_header(path)[1].values()}
    dtypes = {dtype for dtype in stored if dtype.is_floating_point}
    return dtypes.pop() if len(dtypes) == 1 else None


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
        where = placement(device_map, name if name.startswith(prefix + ".") else f"{prefix}.{name}")
        where = plan.device if where is None else torch.device("cuda", where) if isinstance(where, int) else where
        state[name] = ConvertingTensor(stored, plan.dtype, where)
    try:
        return model_class.from_pretrained(None, config=config, state_dict=state, **options)
    finally:
        del state
        _close_maps(tensors)
