"""The token embedding read from the checkpoint file on lookup (app/model/checkpoint_embedding.py), where
lm_head holds its own copy of the vocabulary matrix: packed float32 and int8, loaded as the server loads
them. The rows looked up are the checkpoint's own, bit for bit, and nothing of the matrix is held in memory."""

from __future__ import annotations

import pytest
import torch

from app.model.checkpoint_embedding import CheckpointEmbedding
from app.model.loader import load_model
from app.settings import Settings
from tests.conftest import ARCHITECTURES


def load(folder, **values):
    return load_model(Settings(_env_file=None, model_id=str(folder), device="cpu", **values)).model


@pytest.fixture(scope="module")
def references(tiny_models):
    """transformers' own layers: the embedding is the checkpoint's matrix, in memory (tied to lm_head)."""
    return {arch: load(tiny_models.folders[arch], cpu_kernels="reference") for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_rows_are_the_checkpoints_own(arch, quantize, tiny_models, references):
    model = load(tiny_models.folders[arch], cpu_kernels="packed", quantize=quantize)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, CheckpointEmbedding)
    assert not list(embedding.parameters()) and not list(embedding.buffers()), "the matrix is held in memory"
    reference = references[arch].get_input_embeddings()
    vocab = reference.weight.shape[0]
    # A batch as a prefill feeds it: repeated tokens, the first and the last row of the matrix.
    ids = torch.tensor([[0, 5, 5, vocab - 1], [7, 0, 3, 5]])
    with torch.inference_mode():
        got, expected = embedding(ids), reference(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert torch.equal(got, expected)


def test_a_token_outside_the_vocabulary_is_refused_as_torch_refuses_it(tiny_models):
    embedding = load(tiny_models.folders["gpt2"], quantize="int8").get_input_embeddings()
    with pytest.raises(IndexError, match="out of range"):
        embedding(torch.tensor([[1, embedding.num_embeddings]]))


def test_an_embedding_shared_with_lm_head_stays_in_memory(tiny_models):
    """transformers' own float32 layers: lm_head multiplies by the embedding's matrix, so it stays."""
    model = load(tiny_models.folders["gpt2"], cpu_kernels="reference")
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
