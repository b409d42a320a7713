"""Swapping a loaded model's layers for faster ones in place, without ever holding its weights twice:
what int8 (app/model/int8.py) and float32's packed layers (app/model/packed.py) share."""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Callable

import torch

# The architectures whose layers are known to convert (and are tested): their linear layers are
# torch.nn.Linear or GPT-2's Conv1D, and nothing reads a linear layer's `.weight` outside its forward.
CONVERTIBLE_MODEL_TYPES = {"gpt2": "GPT-2", "gpt_neo": "GPT-Neo", "gptj": "GPT-J"}


def swap_linear_layers(model: torch.nn.Module, make: Callable[[torch.Tensor, torch.Tensor | None], torch.nn.Module],
                       skip: torch.nn.Module | None = None) -> None:
    """Replace every linear layer but `skip` with `make(weight [out, in], bias)`, one at a time, so
    that at most one layer's temporary copies exist; each converted weight's pages are dropped."""
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if child is skip:
                    continue
                if isinstance(child, Conv1D):  # GPT-2: x @ W + b with W stored [in, out]
                    setattr(parent, name, make(child.weight.t(), child.bias))
                    drop_pages(child.weight)
                elif type(child) is torch.nn.Linear:
                    setattr(parent, name, make(child.weight, child.bias))
                    drop_pages(child.weight)


def fuse_gelu(model: torch.nn.Module) -> None:
    """GPT-2, GPT-Neo and GPT-J's activation ("gelu_new") as one fused kernel instead of six element-wise ops.

    The same formula (the tanh approximation of GELU), computed by torch in one pass: results differ
    from the Python version by float32 rounding (<= 3e-7 here). Once the matrix products are fast (int8,
    packed float32), these element-wise passes over the MLP's activations are a visible part of a step:
    measured on GPT-2 small in int8 at batch 16, a decoding step went from 37 to 33 ms.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())


def release_loaded_weights(model: torch.nn.Module, keep: torch.Tensor | None = None) -> None:
    """Give the parameters left (layer norms, position embeddings) float32 memory of their own, and make
    the floating buffers (rotary tables) float32 too.

    The loader serves checkpoints stored as served from the memory-mapped file itself; the mapping
    stays as long as one tensor points into it, and every page the conversion read stays in the
    process's resident memory with it. Copying the few small tensors left lets the whole mapping go.
    In float32, because the converted layers compute in float32 whatever the checkpoint stored (int8
    quantizes a float16 checkpoint's own weights). `keep` stays where it is (packed float32's token
    embedding, which reads only the rows it looks up from the mapping).
    """
    with torch.no_grad():
        for module in model.modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if param is not keep:
                    copy = param.detach().to(torch.float32, copy=True)
                    module._parameters[name] = torch.nn.Parameter(copy, requires_grad=False)
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None and buffer.is_floating_point() and buffer.dtype != torch.float32:
                    module._buffers[name] = buffer.to(torch.float32)


def drop_pages(tensor: torch.Tensor) -> None:
    """Let the kernel take back the memory of a loaded weight that has just been converted.

    The loader serves checkpoints stored as served from the memory-mapped file, and each page the
    conversion reads stays resident until the whole mapping goes (after the last layer). Without this,
    converting reads the whole checkpoint into memory on top of the converted model, and the process's
    peak memory is higher than the unconverted server's. MADV_PAGEOUT only ever drops pages that can be read back (file
    pages) or swapped; it never changes data, so it is safe whatever the tensor's memory is. Linux 5.4+;
    elsewhere, or if refused, nothing happens (only the peak is higher).
    """
    if _libc is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return
    page = mmap.PAGESIZE
    # Whole pages inside this tensor only (its storage may be the whole file, other weights included).
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_PAGEOUT)


_MADV_PAGEOUT = 21
try:
    _libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
except OSError:
    _libc = None
