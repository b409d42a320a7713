"""float32 linear layers packed for oneDNN (CPU_KERNELS=packed): the same float32 model, within rounding,
and the same greedy text as transformers' own layers."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from app.engine.request import GenerationRequest, SamplingParams
from app.model.packed import PackedLinear, pack_linear_layers
from scripts.make_tiny_models import ARCHITECTURES
from tests.unit.conftest import inline_engine, run_until_idle

PROMPTS = ["Hello", "Beautiful is better than ugly. Explicit is better than implicit.", "When Konrad", "a"]


@pytest.fixture(scope="module")
def packed(tiny):
    """Architecture -> the tiny model's loaded record with a packed copy of its model."""
    return {arch: types.SimpleNamespace(**{**vars(loaded), "model": pack_linear_layers(copy.deepcopy(loaded.model))})
            for arch, loaded in tiny.items()}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.inference_mode()
def test_packed_layers_compute_the_float32_logits_within_rounding(arch, tiny, packed):
    reference, model = tiny[arch].model, packed[arch].model
    assert not [m for m in model.modules() if type(m) in (torch.nn.Linear, Conv1D)], "a linear layer was left as it was"
    assert isinstance(model.get_output_embeddings(), PackedLinear)
    # A left-padded batch, as the engine feeds it (mask and positions).
    input_ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(input_ids)
    mask[0, :9] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = reference(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[mask.bool()]
    got = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[mask.bool()]
    # float32 rounding of sums taken in another order: far below any difference a wrong weight would make.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.std()))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_output_of_packed_layers_equals_transformers_generate(arch, tiny, packed):
    tokenizer = tiny[arch].tokenizer
    engine = inline_engine(packed[arch])
    handles = {}
    with torch.inference_mode():
        for prompt in PROMPTS:  # one new request per turn: each joins a running batch
            ids = tuple(tokenizer(prompt).input_ids)
            handles[prompt] = engine.submit(GenerationRequest(ids, 24, SamplingParams()))
            engine.run_once()
    run_until_idle(engine)
    for prompt, handle in handles.items():
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = tiny[arch].model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                            do_sample=False, pad_token_id=tokenizer.eos_token_id)
        expected = out[0, ids.shape[1]:].tolist()
        got = handle.result().completions[0].token_ids
        assert got == expected[: len(got)], prompt  # the tiny model may end early with end-of-text
