"""The token embedding read from the checkpoint file, a row per token looked up, instead of held in memory.

A decoding step looks up one row per sequence; a prefill, one per prompt token. Once the output layer
holds its own copy of the vocabulary matrix (float32's packed `lm_head`, int8's FBGEMM layer), the
embedding is the only user of the stored matrix, and holding it costs a whole vocabulary matrix for a few
rows a step: GPT-2 small's is 154 MB in float32. Read from a memory-mapped file instead, it is not much
better: the kernel maps the 64 KB around every row a lookup touches (fault-around), so after a few
thousand distinct tokens nearly all of the matrix is resident (measured: 148 MB of 154 for 6,000 random
rows, whatever `madvise` says). Here each looked-up row is read with `pread` into a tensor of its own:
the checkpoint's pages stay in the kernel's page cache, shared and reclaimable, and none are mapped into
the process. A step's few reads of a few KB each take microseconds.

The rows are the checkpoint's own values, widened to float32 as the model computes: the same embedding
as the in-memory one (float32 checkpoints: bit for bit; a float16 checkpoint served in int8: the exact
widening of its stored values, where int8 rounded them to 8 bits before).
"""

from __future__ import annotations

import logging
import os

import torch

from app.model.safetensors_stream import SAFETENSORS_DTYPES, read_header, safetensors_files

log = logging.getLogger(__name__)


class CheckpointEmbedding(torch.nn.Module):
    """Looks up token rows [num_embeddings, embedding_dim] stored row-major at `offset` in `path`."""

    def __init__(self, path: str, offset: int, shape: tuple[int, int], stored_dtype: torch.dtype,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = shape
        self.path, self.offset = path, offset
        self.stored_dtype, self.dtype = stored_dtype, dtype
        self._row_bytes = self.embedding_dim * stored_dtype.itemsize
        self._file = open(path, "rb", buffering=0)  # one descriptor; pread is safe from any thread

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        distinct, where = torch.unique(input_ids, return_inverse=True)  # each distinct token read once
        tokens = distinct.tolist()  # ascending
        for token in (tokens[0], tokens[-1]):
            if not 0 <= token < self.num_embeddings:  # as torch.nn.Embedding refuses it
                raise IndexError(f"token id {token} is out of range of the {self.num_embeddings}-token embedding")
        rows = torch.empty((len(tokens), self.embedding_dim), dtype=self.stored_dtype)
        buffer = memoryview(rows.view(torch.uint8).numpy()).cast("B")
        size, fd = self._row_bytes, self._file.fileno()
        for i, token in enumerate(tokens):
            if os.preadv(fd, [buffer[i * size:(i + 1) * size]], self.offset + token * size) != size:
                raise OSError(f"{self.path} ended before the embedding row of token {token}")
        return rows.to(self.dtype)[where]  # [*input_ids.shape, embedding_dim]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, read from {os.path.basename(self.path)}"


def embed_from_checkpoint(model: torch.nn.Module, folder: str) -> None:
    """Swap the model's token embedding for a `CheckpointEmbedding` of its rows in `folder`'s safetensors
    files, if they hold them. Called before `lm_head` gets a copy of the vocabulary matrix of its own
    (packed float32, int8): a tied `lm_head` keeps the loaded matrix to convert it from, and the embedding
    is never converted. Anything else keeps the embedding as it is."""
    embedding = model.get_input_embeddings()
    name = next(name for name, module in model.named_modules() if module is embedding) + ".weight"
    prefix = model.base_model_prefix + "."
    for path in safetensors_files(folder):
        start, header = read_header(path)
        info = header.get(name) or header.get(name.removeprefix(prefix))
        if info is None:
            continue
        shape = tuple(info["shape"])
        stored = SAFETENSORS_DTYPES.get(info["dtype"])
        fits = shape == (embedding.num_embeddings, embedding.embedding_dim)
        if not fits or stored is None or not stored.is_floating_point:
            return  # not the matrix the model holds
        model.set_input_embeddings(CheckpointEmbedding(path, start + info["data_offsets"][0], shape, stored))
        log.info("token embedding: rows read from %s on lookup, not held in memory", os.path.basename(path))
        return
