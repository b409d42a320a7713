"""What a model needs in memory, read from its config alone (no weights): its shape, and the bytes of
its weights, key/value cache and working space in a given dtype (and with int8 weights). The fit check
(app/model/fit.py) weighs this against what the device has.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.model.device import attention_implementation

# Memory no formula below accounts for: allocator slack, kernels' scratch space, small temporaries.
FIXED_OVERHEAD = 128 * 1024**2

GiB = 1024**3


def gib(size: float) -> str:
    """Bytes in the unit operators set limits in; sizes under a GiB in MiB, to stay readable."""
    if size >= GiB:
        return f"{size / GiB:.1f} GiB"
    return f"{size / 1024**2:.1f} MiB"


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
    int8_weight_bytes: int = 0  # the weights as QUANTIZE=int8 holds them (app/model/int8.py)


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
        int8_weight_bytes=_int8_weight_bytes(model),
    )


def _int8_weight_bytes(model) -> int:
    """What QUANTIZE=int8 keeps: a byte per weight of the linear layers, lm_head and the token embedding,
    with a float32 scale per row; FBGEMM's packed copy of lm_head's rows where the embedding shares them;
    everything else (layer norms, biases, position embeddings) in float32. On the safe side: from a
    safetensors checkpoint the embedding's rows are read from the file instead (checkpoint_embedding.py)."""
    from transformers.pytorch_utils import Conv1D

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    int8 = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    int8.add(id(embedding.weight))
    total = sum(p.numel() + 4 * max(p.shape) if id(p) in int8 else 4 * p.numel() for p in model.parameters())
    if head is not None and head.weight is embedding.weight:
        total += head.weight.numel()
    return total


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


def memory_need(shape: ModelShape, dtype: torch.dtype, max_batch_size: int, quantize: str = "none") -> MemoryNeed:
    """Estimate, on the safe side, what serving needs besides the interpreter and the libraries
    (`quantize`: QUANTIZE as it applies, never `auto`).

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
        weights=(shape.int8_weight_bytes if quantize == "int8" else shape.parameters * size) + shape.buffer_bytes,
        cache_per_token=shape.layers * 2 * shape.kv_size * size,
        work_per_token=scores + activations + logits,
        # Each decoding step keeps a few float32 copies of every row's logits for sampling.
        fixed=FIXED_OVERHEAD + 3 * max_batch_size * shape.vocab_size * 4,
    )
