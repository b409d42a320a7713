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

Memory: the blocks' weights move into the packed layout (no second copy). `lm_head` is packed too; when
it shares its matrix with the token embedding (GPT-2, GPT-Neo), the embedding keeps the plain matrix
for its lookups, so the vocabulary matrix is held twice (GPT-2 small: 154 MB more).
"""

from __future__ import annotations

import logging
import time

import torch

from app.model.int8 import INT8_MODEL_TYPES, _drop_pages, _fuse_gelu, _release_float32_weights

log = logging.getLogger(__name__)

# The architectures whose linear layers are known to convert: the same as int8's.
PACKED_MODEL_TYPES = INT8_MODEL_TYPES


def packing_applies(device_type: str, dtype: torch.dtype, quantize: str, model_type: str) -> bool:
    return (device_type == "cpu" and dtype == torch.float32 and quantize == "none"
            and model_type in PACKED_MODEL_TYPES and torch.backends.mkldnn.is_available())


def pack_linear_layers(model: torch.nn.Module) -> torch.nn.Module:
    """Swap the model's linear layers (and lm_head) for packed ones, in place, one at a time."""
    from transformers.pytorch_utils import Conv1D

    started = time.perf_counter()
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    with torch.no_grad():
        # lm_head first, the largest matrix: while it is packed, the others have not been read yet.
        model.set_output_embeddings(PackedLinear(head.weight, head.bias))
        _drop_pages(head.weight)
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Conv1D):  # GPT-2: x @ W + b with W stored [in, out]
                    setattr(parent, name, PackedLinear(child.weight.t(), child.bias))
                    _drop_pages(child.weight)
                elif type(child) is torch.nn.Linear:
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
                    _drop_pages(child.weight)
    # The token embedding keeps its plain matrix for its lookups (when tied, the one lm_head was packed
    # from). From a memory-mapped checkpoint only the rows of tokens actually looked up are read back
    # into memory, so it is not copied out of the mapping with the small tensors.
    _release_float32_weights(model, keep=embedding.weight)
    _fuse_gelu(model)
    log.info("float32 linear layers packed for oneDNN in %.2f s", time.perf_counter() - started)
    return model


class PackedLinear(torch.nn.Module):
    """y = x W^T + b in float32, with W (and b) held in oneDNN's layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """`weight` [out, in] may be a view (a transposed Conv1D weight): the packed copy is its own."""
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach().to(torch.float32).contiguous().to_mkldnn()
        self.bias = None if bias is None else bias.detach().to(torch.float32).contiguous().to_mkldnn()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to_mkldnn()
        out = torch._C._nn.mkldnn_linear(flat, self.weight, self.bias).to_dense()
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"
