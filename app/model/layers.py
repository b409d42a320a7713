"""Swapping a loaded model's layers for faster ones in place, without ever holding its weights twice:
what int8 (app/model/int8.py) and float32's packed layers (app/model/packed.py) share."""

from __future__ import annotations

from typing import Callable

import torch

from app.allocator import drop_pages

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
