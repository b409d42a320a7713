"""QUANTIZE=int8: serve the model with 8-bit weights, the fastest way to run it on a CPU.

At load time every linear layer of the transformer blocks, and the output projection (`lm_head`),
becomes a dynamically quantized int8 layer: its weights are stored as int8 with one scale per output
channel; each call rounds its input to 8 bits on the fly, multiplies in integers and returns float32.
Decoding on a CPU is bound by reading the weights from memory every step, and int8 weights are a
quarter of float32's; the integer kernels (AVX-512 VNNI / AVX2) also do four times the arithmetic per
instruction, which is what counts once many rows share a step. Position embeddings, layer norms and
attention stay in float32; the MLP's activation runs as one fused kernel (`fuse_gelu`, app/model/layers.py).

Both kernels multiply the same int8 weights (`quantize_rows`: one scale per output channel, absolute
maximum -> 127), with activations rounded to 8 bits per call:

- `fbgemm`: PyTorch's dynamic quantization (`torch.ao.nn.quantized.dynamic.Linear`, FBGEMM's prepacked
  kernels). The fastest measured here, and used while the installed torch has it; `torch.ao.quantization`
  is deprecated and announces its removal.
- `int_mm`: `Int8Linear`, on torch's maintained integer product `torch._int_mm`, with one activation
  scale per row (token). Used when the installed torch has no FBGEMM dynamic quantization, so the
  option keeps working after that removal, about half as fast at one stream on this project's
  benchmark machine (the vocabulary-sized `lm_head` product is what it loses on).

Measured in one run on a 2-core AVX-512 CPU (no AMX), GPT-2-small-sized model, time of a decoding
step as a ratio to FBGEMM's (batch 1 / batch 16): `torch._int_mm` 0.80x / 0.56x; float32 0.35x / 0.25x;
bfloat16 0.37x / 0.43x; torchao 0.18's `quantize_` run eagerly (the server's batch shapes change every
step, which compiling would turn into recompilations) 0.13x / 0.10x weight-only and 0.09x / 0.12x
dynamic. `torch._weight_int8pack_mm` (weight-only, as gpt-fast runs on CPUs) took 0.05x of FBGEMM's
matrix-product time with float32 activations (a generic loop) and 0.42x with bfloat16 ones.

`lm_head` is quantized too: for GPT-2 small it is the largest matrix of a decoding step (768 x 50257,
38.6M of the 124M parameters, a third of every step's weight reads), so leaving it in float32 would
cap the gain. From a safetensors checkpoint the loader has already made the token embedding read its
rows from the file (app/model/checkpoint_embedding.py). Otherwise it looks up int8 rows and scales them
on use: `lm_head`'s own int8 rows where they are tied (GPT-2, GPT-Neo; FBGEMM packs a copy of them for
its product), so no float32 copy of the vocabulary matrix is left.

Memory: the layers are converted one at a time from views of the loaded weights, a slice of rows at a
time, each slice's pages dropped once converted, and at the end nothing points into the loaded weights
any more, so they are freed (or, for a memory-mapped checkpoint, unmapped): GPT-2 small keeps ~170 MB
of weights instead of ~500 MB, and the load's peak is ~35 MB above that (it was ~190 MB when lm_head
was quantized from its whole float32 matrix, by FBGEMM's own observer). A float16 or bfloat16
checkpoint is quantized from its own weights the same way (GPT-J-6B peaks at 6.9 GiB; widened to
float32 first, its weights alone would take 22.5 GiB).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings

import torch

from app.allocator import drop_pages
from app.model.errors import QuantizationError
from app.model.layers import (
    CONVERTIBLE_MODEL_TYPES,
    fuse_gelu,
    release_loaded_weights,
    swap_linear_layers,
)

log = logging.getLogger(__name__)


def quantize(model: torch.nn.Module, mode: str, kernel: str = "auto") -> torch.nn.Module:
    """The model as QUANTIZE asks, once resolved for it (`FitPlan.quantize`: never `auto`): unchanged
    for `none`, with int8 linear layers for `int8`, computing in float32 (the loader may hand it a
    float16 or bfloat16 checkpoint's own weights: the int8 rows are made from those).

    `kernel`: "fbgemm", "int_mm", or "auto" (FBGEMM where this torch has it, else `torch._int_mm`).
    """
    if mode == "none":
        return model
    check_int8_applies(model)
    fbgemm = _fbgemm_linear() if kernel in ("auto", "fbgemm") else None
    if kernel == "fbgemm" and fbgemm is None:
        raise QuantizationError(f"torch {torch.__version__} has no FBGEMM dynamic quantization")
    started = time.perf_counter()
    before = _weight_bytes(model)
    _to_int8(model, fbgemm or Int8Linear)
    log.info(
        "QUANTIZE=int8: linear layers and lm_head hold int8 weights (%.0f MB of weights, %.0f MB as loaded; "
        "kernel %s) in %.2f s", _weight_bytes(model) / 1e6, before / 1e6, "fbgemm" if fbgemm else "int_mm",
        time.perf_counter() - started,
    )
    return model


def resolve_quantize(setting: str, device_type: str, dtype: torch.dtype, model_type: str) -> str:
    """What QUANTIZE means for this model on this device: `auto` is int8 where int8 applies, else none."""
    if setting != "auto":
        return setting
    applies = device_type == "cpu" and dtype == torch.float32 and model_type in CONVERTIBLE_MODEL_TYPES
    return "int8" if applies else "none"


def check_int8_applies(model: torch.nn.Module) -> None:
    """Refuse, with a message naming what would work, where int8 weights do not apply."""
    model_type = model.config.model_type
    if model_type not in CONVERTIBLE_MODEL_TYPES:
        raise QuantizationError(
            f"QUANTIZE=int8 supports {', '.join(CONVERTIBLE_MODEL_TYPES.values())} models; this model is "
            f"{model_type!r} ({type(model).__name__}). Use QUANTIZE=none."
        )
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise QuantizationError(
            f"QUANTIZE=int8 runs on the CPU only, and the model is on {', '.join(sorted(devices))}. "
            "Use DEVICE=cpu with it, or QUANTIZE=none on a GPU (float16/bfloat16 is the fast path there)."
        )
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise QuantizationError(
            f"QUANTIZE=int8 quantizes float32 weights (or a float16 or bfloat16 checkpoint's own) and computes in "
            f"float32; the model was loaded as {names}. Use DTYPE=float32 (or auto) with it."
        )
    if _fbgemm_linear() is None and not hasattr(torch, "_int_mm"):
        raise QuantizationError(
            f"QUANTIZE=int8 needs torch's int8 kernels (FBGEMM dynamic quantization or torch._int_mm), which "
            f"torch {torch.__version__} lacks. Use QUANTIZE=none, or the torch version pinned in requirements.txt."
        )


def _fbgemm_linear():
    """A maker of FBGEMM dynamic int8 layers from (int8 rows [out, in], scales [out], bias), or None where
    torch has none."""
    if "fbgemm" not in getattr(torch.backends.quantized, "supported_engines", []):
        return None
    try:
        with _known_deprecations():
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    except ImportError:
        return None

    def make(int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
        out_features, in_features = int8.shape
        with _known_deprecations():
            # Per-channel weights: each output row keeps its own range (lm_head's rows differ a lot).
            weight = torch._make_per_channel_quantized_tensor(
                int8, scales.to(torch.float64), torch.zeros(out_features, dtype=torch.long), 0)
            # Made 1 x 1, then given its weights: made at full size, it would first pack a matrix of zeros
            # (for lm_head, 77 MB more at the load's peak).
            layer = DynamicLinear(1, 1, bias_=bias is not None, dtype=torch.qint8)
            # FBGEMM packs its own copy of the weights; the bias is copied, so that nothing of the int8
            # model points into the loaded float32 weights any more (see release_loaded_weights).
            layer.set_weight_bias(weight, None if bias is None else bias.detach().to(torch.float32).clone())
        layer.in_features, layer.out_features = in_features, out_features
        return layer

    return make


def is_int8_linear(module: torch.nn.Module) -> bool:
    """Whether a layer holds int8 weights (either kernel's)."""
    if isinstance(module, Int8Linear):
        return True
    with _known_deprecations():
        try:
            from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        except ImportError:
            return False
    return isinstance(module, DynamicLinear)


def _to_int8(model: torch.nn.Module, int8_linear) -> None:
    """Swap the layers in place, the linear layers first, then lm_head and the token embedding (unless it
    reads its rows from the checkpoint already). `int8_linear(int8 rows, scales, bias)` makes a layer of
    the chosen kernel."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    swap_linear_layers(model, lambda weight, bias: int8_linear(*quantize_rows(weight.detach()), bias), skip=head)
    # lm_head, from its own matrix or (GPT-2, GPT-Neo) the embedding's it is tied to.
    head_rows = quantize_rows(head.weight.detach())
    model.set_output_embeddings(int8_linear(*head_rows, head.bias))
    if isinstance(embedding, torch.nn.Embedding):  # in memory: tied, it looks up lm_head's int8 rows
        tied = embedding.weight is head.weight
        model.set_input_embeddings(Int8Embedding(*(head_rows if tied else quantize_rows(embedding.weight.detach()))))
    release_loaded_weights(model)
    fuse_gelu(model)


def quantize_rows(weight: torch.Tensor, rows_at_once: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [rows, columns] as int8 with one float32 scale per row (symmetric, absolute maximum -> 127).

    Per-row scales keep each output channel's own range, which matters for lm_head, whose rows (one per
    token) differ a lot in size. Converted in slices of rows, each slice's pages dropped once it is
    converted (`drop_pages`): the loaded matrix is never all in memory beside its int8 copy.
    """
    int8 = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], dtype=torch.float32)
    with torch.no_grad():
        for first in range(0, weight.shape[0], rows_at_once):
            source = weight[first:first + rows_at_once]
            rows = source.to(torch.float32)
            scale = rows.abs().amax(dim=1).clamp(min=1e-12) / 127
            scales[first:first + rows_at_once] = scale
            int8[first:first + rows_at_once] = torch.round(rows / scale[:, None]).to(torch.int8)
            drop_pages(source)
    return int8, scales


class Int8Linear(torch.nn.Module):
    """y = x W^T + b with W held as int8 rows and one float32 scale per row (per output channel)."""

    def __init__(self, int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        """`int8` [out, in] and `scales` [out]: `quantize_rows`' output. The bias is copied, so that nothing
        of the int8 model points into the loaded float32 weights any more (see release_loaded_weights)."""
        super().__init__()
        self.out_features, self.in_features = int8.shape
        self.register_buffer("weight", int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).clone())
        # Multiplied as [in, out]: torch's int8 product is fastest with the transposed view of [out, in] rows.
        self.weight_t = int8.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Dynamic quantization of the activations, one scale per row (token): each row is rounded to 8 bits
        # on its own range, so one long-tailed token does not coarsen the others.
        flat = x.reshape(-1, self.in_features)
        row_scales = flat.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127)
        quantized = torch.round(flat / row_scales).to(torch.int8)
        out = torch._int_mm(quantized, self.weight_t).to(torch.float32)
        out *= row_scales
        if self.bias is None:
            out *= self.scales
        else:
            out = torch.addcmul(self.bias, out, self.scales)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, dtype=int8"


class Int8Embedding(torch.nn.Module):
    """The token embedding with int8 rows (one float32 scale per row), looked up and scaled on use.

    A lookup reads a few rows per step, so this costs no time; it saves three quarters of the largest
    float32 matrix left (GPT-2 small: 154 MB -> 39 MB), or all of it where the rows are lm_head's own.
    """

    def __init__(self, int8_weight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int8_weight.shape
        self.register_buffer("int8_weight", int8_weight)
        self.register_buffer("scale", scales.view(-1, 1))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.int8_weight[input_ids].to(torch.float32) * self.scale[input_ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype=int8"


@contextlib.contextmanager
def _known_deprecations():
    # torch.ao.quantization and its quantized dtypes warn that they are deprecated: known, see above.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        yield


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights the model holds: parameters and buffers (int8 matrices, scales), each once, plus
    one byte per weight and a float32 scale and bias per output channel of each FBGEMM layer (computed:
    unpacking its weights would copy them)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for module in model.modules():
        if is_int8_linear(module) and not isinstance(module, Int8Linear):
            total += module.in_features * module.out_features + 8 * module.out_features
    return total
