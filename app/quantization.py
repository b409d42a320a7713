"""QUANTIZE=int8: serve the model with 8-bit weights, the fastest way to run it on a CPU.

At load time every linear layer of the transformer blocks, and the output projection (`lm_head`),
becomes a dynamically quantized int8 layer: its weights are stored as int8 with one scale per
output channel; each call quantizes its input to 8 bits on the fly, multiplies in integers and
returns float32. Decoding on a CPU is bound by reading the weights from memory every step, and
int8 weights are a quarter of float32's; the integer kernels (AVX-512 VNNI / AVX2) also do four
times the arithmetic per instruction, which is what counts once many rows share a step. Embeddings,
layer norms and attention stay in float32.

Which implementation, and why: PyTorch's own dynamic quantization
(`torch.ao.quantization.quantize_dynamic`, kernels from FBGEMM), measured on a 2-core x86 CPU
against torchao 0.18 (the library PyTorch points to as its successor), on GPT-2 small. torchao's
int8 layers are tensor subclasses written to be compiled with `torch.compile`; run eagerly, as the
server does (batch shapes change every step, which compiling would turn into recompilations), its
weight-only config dequantizes the whole weight matrix on every call and its dynamic-activation
config sums the weight matrix on every call, so both decode slower than float32 on this CPU, while
FBGEMM's prepacked kernels decode several times faster (README, "Fast CPU inference (int8)").
`torch.ao.quantization` is deprecated and warns so; it is still shipped, and tested here, with the
pinned torch. When a torch upgrade removes it, `quantize` refuses to start with a message that says
so (nothing else changes), and torchao is the way forward.

`lm_head` is quantized too: for GPT-2 small it is the largest matrix of a decoding step (768 x 50257,
38.6M of the 124M parameters, a third of every step's weight reads), so leaving it in float32 would
cap the gain. Where it is tied to the token embedding (GPT-2, GPT-Neo), the embedding keeps the
float32 matrix (it only looks rows up) and `lm_head` gets its own int8 copy.
"""

from __future__ import annotations

import logging
import time
import warnings

import torch

from app.model_loader import ModelLoadError
from app.settings import Settings

log = logging.getLogger(__name__)

# The architectures whose layers are known to convert (and are tested): their linear layers are
# torch.nn.Linear or GPT-2's Conv1D, and nothing reads a linear layer's `.weight` outside its forward.
INT8_MODEL_TYPES = {"gpt2": "GPT-2", "gpt_neo": "GPT-Neo", "gptj": "GPT-J"}


class QuantizationError(ModelLoadError):
    """QUANTIZE cannot be applied to this model, device or dtype; the message says what would work."""


def quantize(model: torch.nn.Module, settings: Settings) -> torch.nn.Module:
    """The model as QUANTIZE asks: unchanged for `none`, with int8 linear layers for `int8`."""
    if settings.quantize == "none":
        return model
    check_int8_applies(model)
    started = time.perf_counter()
    before = _weight_bytes(model)
    _to_int8(model)
    log.info(
        "QUANTIZE=int8: linear layers and lm_head hold int8 weights (%.0f MB of weights, %.0f MB in float32) "
        "in %.2f s", _weight_bytes(model) / 1e6, before / 1e6, time.perf_counter() - started,
    )
    return model


def check_int8_applies(model: torch.nn.Module) -> None:
    """Refuse, with a message naming what would work, where int8 weights do not apply."""
    model_type = model.config.model_type
    if model_type not in INT8_MODEL_TYPES:
        raise QuantizationError(
            f"QUANTIZE=int8 supports {', '.join(INT8_MODEL_TYPES.values())} models; this model is "
            f"{model_type!r} ({type(model).__name__}). Use QUANTIZE=none."
        )
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        raise QuantizationError(
            f"QUANTIZE=int8 runs on the CPU only, and the model is on {', '.join(sorted(devices))}. "
            "Use DEVICE=cpu with it, or QUANTIZE=none on a GPU (float16/bfloat16 is the fast path there)."
        )
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {torch.float32}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise QuantizationError(
            f"QUANTIZE=int8 quantizes float32 weights and computes in float32; the model was loaded as {names}. "
            "Use DTYPE=float32 (or auto) with it."
        )
    if not hasattr(torch.backends.quantized, "supported_engines") or "fbgemm" not in torch.backends.quantized.supported_engines:
        raise QuantizationError(
            "QUANTIZE=int8 needs PyTorch's x86 int8 kernels (FBGEMM), which this torch build lacks "
            f"(quantized engines: {getattr(torch.backends.quantized, 'supported_engines', [])}). Use QUANTIZE=none."
        )


def _to_int8(model: torch.nn.Module) -> None:
    from transformers.pytorch_utils import Conv1D

    try:
        with warnings.catch_warnings():
            # The deprecation notices of torch.ao.quantization and of its quantized dtypes: known, see above.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:
        raise QuantizationError(
            f"QUANTIZE=int8 uses torch.ao.quantization, which torch {torch.__version__} no longer has ({exc}). "
            "Use QUANTIZE=none, or the torch version pinned in requirements.txt."
        ) from exc

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                setattr(parent, name, _conv1d_as_linear(child))
    _untie_lm_head(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        # Per-channel weight scales: each output row keeps its own range, which matters for lm_head,
        # whose rows (one per token) differ a lot in size. Same speed as one scale per matrix.
        quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def _conv1d_as_linear(conv) -> torch.nn.Linear:
    """GPT-2's Conv1D computes x @ W + b with W stored [in, out]; nn.Linear stores it [out, in]."""
    n_in, n_out = conv.weight.shape
    linear = torch.nn.Linear(n_in, n_out, bias=conv.bias is not None, device="meta")
    linear.weight = torch.nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
    if conv.bias is not None:
        linear.bias = torch.nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


def _untie_lm_head(model: torch.nn.Module) -> None:
    """Give lm_head its own module so quantizing it leaves the (tied) input embedding in float32."""
    head = model.get_output_embeddings()
    embedding = model.get_input_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return
    # The int8 copy is made from this (shared) tensor; the embedding keeps the float32 original.
    untied = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    untied.weight = torch.nn.Parameter(embedding.weight.detach(), requires_grad=False)
    if head.bias is not None:
        untied.bias = head.bias
    model.set_output_embeddings(untied)


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights the model holds: float tensors, plus one byte per int8 weight and a float32
    scale and bias per output channel of each int8 layer (computed, not unpacked: unpacking copies)."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, Int8Linear):
            total += module.in_features * module.out_features + 8 * module.out_features
    return total
