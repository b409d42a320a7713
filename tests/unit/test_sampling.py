"""The sampling maths against transformers' own logits processors, row by row in one batch."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from app.engine.request import SamplingParams
from app.engine.sampling import SamplingTensors, _walk, apply_penalties, choose_tokens, warp

VOCAB = 300


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, VOCAB), generator=generator) * 3


def transformers_warp(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """What `generate` does to one row's scores, in its order."""
    scores = row.unsqueeze(0)
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p:
        warpers.append(MinPLogitsWarper(p.min_p))
    if p.typical_p < 1.0:
        warpers.append(TypicalLogitsWarper(p.typical_p))
    for warper in warpers:
        scores = warper(None, scores)
    return scores.squeeze(0)


MIXED = [
    SamplingParams(do_sample=True, temperature=0.7, top_k=5),
    SamplingParams(do_sample=True, top_p=0.8),
    SamplingParams(do_sample=True, temperature=1.3, top_k=40, top_p=0.6),
    SamplingParams(do_sample=True, min_p=0.1),
    SamplingParams(do_sample=True, temperature=0.5, top_k=50, min_p=0.05),
    SamplingParams(do_sample=True, typical_p=0.7),
    SamplingParams(do_sample=True, top_k=20, typical_p=0.9, min_p=0.02),
    SamplingParams(do_sample=True, temperature=2.0),
]


def test_masks_equal_transformers_warpers_row_by_row():
    """Rows with different filters share one batch and each gets exactly generate's kept set."""
    scores = logits(len(MIXED))
    tensors = SamplingTensors.build(MIXED, torch.device("cpu"), VOCAB)
    ours = warp(scores, tensors)
    for row, params in enumerate(MIXED):
        expected = transformers_warp(scores[row], params)
        assert torch.equal(torch.isfinite(ours[row]), torch.isfinite(expected)), params
        kept = torch.isfinite(expected)
        torch.testing.assert_close(ours[row][kept], expected[kept])


@pytest.mark.parametrize("min_p", [0.01, 0.2, 0.9])
def test_min_p_keeps_tokens_at_least_that_fraction_of_the_most_likely(min_p):
    scores = logits(3, seed=1)
    params = [SamplingParams(do_sample=True, min_p=min_p)] * 3
    kept = torch.isfinite(warp(scores, SamplingTensors.build(params, torch.device("cpu"), VOCAB)))
    probs = scores.softmax(-1)
    assert torch.equal(kept, probs >= min_p * probs.max(-1, keepdim=True).values)
    assert kept.sum(-1).min() >= 1


def test_repetition_penalty_equals_transformers():
    scores = logits(2, seed=2)
    history = torch.tensor([[1, 5, 5, 9, 200], [7, 7, 8, 250, 3]])
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=0.8)]
    tensors = SamplingTensors.build(params, torch.device("cpu"), VOCAB)
    seen = torch.zeros((2, VOCAB), dtype=torch.bool).scatter_(1, history, True)
    ours = apply_penalties(scores, tensors, seen, torch.zeros((2, VOCAB), dtype=torch.int32))
    for row, p in enumerate(params):
        expected = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(history[row:row + 1], scores[row:row + 1])
        torch.testing.assert_close(ours[row], expected[0])


def test_presence_and_frequency_penalties_follow_the_openai_formula():
    scores = logits(1, seed=3)
    counts = torch.zeros((1, VOCAB), dtype=torch.int32)
    counts[0, 4], counts[0, 10] = 3, 1
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    ours = apply_penalties(scores, SamplingTensors.build(params, torch.device("cpu"), VOCAB), counts > 0, counts)
    expected = scores.clone()
    expected[0, 4] -= 3 * 0.25 + 0.5
    expected[0, 10] -= 1 * 0.25 + 0.5
    torch.testing.assert_close(ours, expected)


def test_no_penalty_returns_the_logits_untouched():
    scores = logits(2)
    tensors = SamplingTensors.build([SamplingParams()] * 2, torch.device("cpu"), VOCAB)
    assert apply_penalties(scores, tensors, None, None) is scores


def test_draws_follow_the_filtered_distribution():
    """A uniform u picks the first token whose cumulative probability exceeds u (vocabulary order)."""
    scores = logits(1, seed=4)
    params = [SamplingParams(do_sample=True, top_k=10, temperature=0.8)]
    tensors = SamplingTensors.build(params, torch.device("cpu"), VOCAB)
    probs = transformers_warp(scores[0], params[0]).softmax(-1)
    cdf = probs.cumsum(-1)
    for u in (0.0, 0.13, 0.5, 0.77, 0.999):
        token = int(choose_tokens(scores, tensors, torch.tensor([u])))
        assert probs[token] > 0
        assert cdf[token] >= u and (token == 0 or cdf[token - 1] <= u + 1e-6)


def test_a_row_draws_the_same_token_whatever_its_neighbours():
    """Batch invariance: the token of a row depends on its logits, parameters and draw only."""
    scores = logits(len(MIXED), seed=5)
    uniforms = torch.rand(len(MIXED), generator=torch.Generator().manual_seed(1))
    together = choose_tokens(scores, SamplingTensors.build(MIXED, torch.device("cpu"), VOCAB), uniforms)
    for row, params in enumerate(MIXED):
        alone = choose_tokens(scores[row:row + 1], SamplingTensors.build([params], torch.device("cpu"), VOCAB),
                              uniforms[row:row + 1])
        assert int(alone) == int(together[row]), params


def test_huge_top_k_is_clamped_and_tiny_temperature_is_greedy():
    scores = logits(3, seed=6)
    params = [
        SamplingParams(do_sample=True, top_k=2**70),  # more than any tensor holds
        SamplingParams(do_sample=True, temperature=1e-45),  # logits / temperature would overflow
        SamplingParams(do_sample=True, temperature=1e-30, top_k=3),
    ]
    tensors = SamplingTensors.build(params, torch.device("cpu"), VOCAB)
    tokens = choose_tokens(scores, tensors, torch.tensor([0.5, 0.99, 0.99]))
    assert int(tensors.top_k[0]) == VOCAB
    assert tokens[1:].tolist() == scores[1:].argmax(-1).tolist()
    assert 0 <= int(tokens[0]) < VOCAB


def test_a_top_k_row_draws_the_same_token_whether_the_batch_walks_candidates_or_the_vocabulary():
    """Rows with top-k walk only their candidates, unless a neighbour needs the whole vocabulary
    (top-p without top-k): the token must not depend on which walk the batch took."""
    vocab = 50257  # a real vocabulary's size: the running sum is long
    generator = torch.Generator().manual_seed(7)
    scores = torch.randn((4, vocab), generator=generator) * 4
    rows = [SamplingParams(do_sample=True, top_k=50, temperature=0.6),
            SamplingParams(do_sample=True, top_k=40, top_p=0.9, min_p=0.05),
            SamplingParams(do_sample=True, top_k=3, temperature=1.7),
            SamplingParams()]  # a greedy neighbour
    neighbour = SamplingParams(do_sample=True, top_p=0.5)  # forces the whole-vocabulary walk
    for draw in range(50):
        uniforms = torch.rand(4, generator=generator)
        candidates = choose_tokens(scores, SamplingTensors.build(rows, torch.device("cpu"), vocab), uniforms)
        whole = choose_tokens(torch.cat([scores, scores[:1]]),
                              SamplingTensors.build(rows + [neighbour], torch.device("cpu"), vocab),
                              torch.cat([uniforms, uniforms[:1]]))
        assert candidates.tolist() == whole[:4].tolist(), draw
        assert int(candidates[3]) == int(scores[3].argmax())


def test_a_token_tying_the_cut_off_is_kept_as_transformers_keeps_it():
    scores = torch.zeros((1, VOCAB))
    scores[0, :3] = torch.tensor([5.0, 4.0, 3.0])
    scores[0, 200] = 3.0  # ties the 3rd largest: top-k 3 keeps 4 tokens
    params = [SamplingParams(do_sample=True, top_k=3)]
    expected = transformers_warp(scores[0], params[0])
    assert int(torch.isfinite(expected).sum()) == 4
    probs = expected.softmax(-1)
    tensors = SamplingTensors.build(params, torch.device("cpu"), VOCAB)
    drawn = {int(choose_tokens(scores, tensors, torch.tensor([u]))) for u in torch.linspace(0, 0.999, 200).tolist()}
    assert drawn == {i for i in range(VOCAB) if probs[i] > 0}


def test_the_walk_never_ends_on_a_filtered_token():
    scaled = torch.tensor([[float("-inf"), 1.0, float("-inf"), 2.0, float("-inf")]])
    for u in (0.0, 0.5, 0.9999999):
        assert int(_walk(scaled, torch.tensor([u]))) in (1, 3)
