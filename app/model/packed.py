"""float32 on the CPU: linear layers with their weights laid out once for oneDNN's matrix kernels.

A plain float32 linear layer (`torch.addmm` / `F.linear`, MKL underneath) re-packs its weight matrix
into the kernel's blocked layout on every call. Decoding multiplies a few rows by every weight matrix
each step, so that packing is paid on the whole model every step, for a handful of rows: at batch 4 a
GPT-2-small step spends twice as long in its matrix products as at batch 1. Here each weight is
converted to oneDNN's own layout once, at load time (`Tensor.to_mkldnn`), and each call runs oneDNN's
inner product on it directly.

The arithmetic is float32 throughout; only the order of the sums inside each product differs from
MKL's, so results differ from transformers' own layers by float32 rounding (about 1e-6 relative).
`CPU_KERNELS=reference` keeps transformers' layers, for outputs bit-identical to `transformers`.

Measured on a 2-core AVX-512 CPU (GPT-2 small, the 48 matrices of the blocks plus `lm_head`, weights
read from memory, not cache), time of the products of one decoding step, reference -> packed:
batch 1 30 -> 19 ms, batch 4 62 -> 27 ms, batch 16 72 -> 43 ms.

Memory: the weights move into the packed layout, one layer at a time, `lm_head` first. From a
safetensors checkpoint the loader has already made the token embedding read its rows from the file
(app/model/checkpoint_embedding.py); otherwise it keeps its plain matrix for its lookups (in GPT-2 and
GPT-Neo the one `lm_head` is packed from).
"""

from __future__ import annotations

import logging
import time

import torch

from app.allocator import drop_pages
from app.model.layers import CONVERTIBLE_MODEL_TYPES, fuse_gelu, release_loaded_weights, swap_linear_layers

log = logging.getLogger(__name__)


def packing_applies(device_type: str, dtype: torch.dtype, quantize: str, model_type: str) -> bool:
    return (device_type == "cpu" and dtype == torch.float32 and quantize == "none"
            and model_type in CONVERTIBLE_MODEL_TYPES and torch.backends.mkldnn.is_available())


def pack_linear_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Swap the model's linear layers and lm_head for packed ones, in place."""
    started = time.perf_counter()
    head = model.get_output_embeddings()
    # lm_head first, the largest matrix: while it is packed, the others have not been read yet.
    with torch.no_grad():
        model.set_output_embeddings(PackedLinear(head.weight, head.bias))
    drop_pages(head.weight)
    swap_linear_layers(model, PackedLinear)
    # An embedding still in memory (not read from the checkpoint) keeps its matrix where it is.
    release_loaded_weights(model, keep=getattr(model.get_input_embeddings(), "weight", None))
    fuse_gelu(model)
    log.info("float32 linear layers packed for oneDNN in %.2f s", time.perf_counter() - started)
    return model


class PackedLinear(torch.nn.Module):
    """y = x W^T + b in float32, with W held in oneDNN's layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """`weight` [out, in] may be a view (a transposed Conv1D weight): the packed copy is its own. The
        bias is copied too, so that nothing points into the loaded weights any more."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach().to(torch.float32).contiguous().to_mkldnn()
        self.bias = None if bias is None else bias.detach().to(torch.float32).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Plain tensors in and out: oneDNN reads the activations where they are, with no conversion to
        # and from its own layout around every product.
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"
