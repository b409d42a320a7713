"""The batch's tensors: prefill, rows joining and leaving, against each sequence run alone."""

from __future__ import annotations

import pytest
import torch

from app.engine.batch import Batch, ChunkedPrefill
from app.engine.prefill import can_pack
from app.engine.request import GenerationRequest, RequestHandle, SamplingParams
from app.engine.step import Row
from scripts.make_tiny_models import ARCHITECTURES

PROMPTS = ["Hello", "Beautiful is better than ugly. Explicit is better than implicit.", "When Konrad Adenauer"]


def rows_for(tokenizer, prompt: str, n: int = 1, new: int = 30) -> list[Row]:
    request = GenerationRequest(tuple(tokenizer(prompt).input_ids), new, SamplingParams(), n=n)
    handle = RequestHandle(request)
    return [Row.start(handle, i, tokenizer) for i in range(n)]


def alone_logits(model, row: Row) -> torch.Tensor:
    """Next-token logits of the row's whole sequence, one forward pass without any cache."""
    ids = torch.tensor([list(row.prompt_ids) + row.generated])
    return model(input_ids=ids).logits[0, -1]


def advance(batch: Batch, rows: list[Row], logits: torch.Tensor) -> None:
    """Greedy step without the text side: record each row's argmax."""
    tokens = logits.argmax(-1)
    batch.record(tokens)
    for row, token in zip(rows, tokens.tolist()):
        row.generated.append(token)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.inference_mode()
def test_prefill_join_and_leave_match_unbatched_runs(arch, tiny):
    loaded = tiny[arch]
    model, tokenizer = loaded.model, loaded.tokenizer
    vocab = model.config.vocab_size

    def check(batch_logits, rows):
        for row, got in zip(rows, batch_logits):
            torch.testing.assert_close(got, alone_logits(model, row), atol=1e-4, rtol=1e-4)

    first = rows_for(tokenizer, PROMPTS[0])
    batch, logits, _ = Batch.prefill(model, first, vocab, [None])
    check(logits, first)
    rows = first
    advance(batch, rows, logits)
    for _ in range(3):
        logits = batch.forward(model)
        check(logits, rows)
        advance(batch, rows, logits)

    # A longer prompt with two rows joins the running batch.
    joining = rows_for(tokenizer, PROMPTS[1], n=2)
    group, group_logits, _ = Batch.prefill(model, joining, vocab, [None])
    check(group_logits, joining)
    advance(group, joining, group_logits)
    rows = rows + joining
    batch = Batch.concatenate([batch, group], rows)
    for _ in range(3):
        logits = batch.forward(model)
        check(logits, rows)
        advance(batch, rows, logits)

    # The first row leaves; the others go on as if it had never been there.
    rows = batch.filter([1, 2], rows)
    assert len(batch) == len(rows) == 2
    for _ in range(3):
        logits = batch.forward(model)
        check(logits, rows)
        advance(batch, rows, logits)


@torch.inference_mode()
def test_prompt_log_probabilities_match_a_plain_forward(tiny):
    loaded = tiny["gpt2"]
    model, tokenizer = loaded.model, loaded.tokenizer
    rows = rows_for(tokenizer, PROMPTS[0]) + rows_for(tokenizer, PROMPTS[2])
    _, _, prompt_logprobs = Batch.prefill(model, rows, model.config.vocab_size, [None, 2])
    assert prompt_logprobs[0] is None
    ids = list(rows[1].prompt_ids)
    expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
    assert prompt_logprobs[1][0] is None
    for position, entry in enumerate(prompt_logprobs[1][1:], start=1):
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(float(expected[position - 1, ids[position]]), abs=1e-4)
        assert len(entry.top) == 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.inference_mode()
def test_a_group_prefilled_packed_matches_each_prompt_alone(arch, tiny):
    """Prompts of different lengths prefilled together run packed into one row, each attending only to
    itself: every row's logits, prompt log-probabilities and following steps equal its prompt alone."""
    loaded = tiny[arch]
    model, tokenizer = loaded.model, loaded.tokenizer
    vocab = model.config.vocab_size
    rows = rows_for(tokenizer, PROMPTS[1]) + rows_for(tokenizer, PROMPTS[0], n=2) + rows_for(tokenizer, PROMPTS[2])
    lengths = [len(rows[i].prompt_ids) for i in (0, 1, 3)]
    assert len(set(lengths)) == 3 and can_pack(model, lengths)
    batch, logits, prompt_logprobs = Batch.prefill(model, rows, vocab, [1, None, 3])
    assert batch.cache.layers[0].keys.shape[0] == len(rows) == 4
    for step in range(4):
        for row, got in zip(rows, logits):
            torch.testing.assert_close(got, alone_logits(model, row), atol=1e-4, rtol=1e-4)
        advance(batch, rows, logits)
        logits = batch.forward(model)

    assert prompt_logprobs[1] is None
    for row, logprobs in ((rows[0], prompt_logprobs[0]), (rows[3], prompt_logprobs[2])):
        ids = list(row.prompt_ids)
        expected = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], -1)
        assert len(logprobs) == len(ids) and logprobs[0] is None
        for position, entry in enumerate(logprobs[1:], start=1):
            assert entry.token_id == ids[position]
            assert entry.logprob == pytest.approx(float(expected[position - 1, ids[position]]), abs=1e-4)


@torch.inference_mode()
def test_gpt_neo_packs_only_within_its_local_window(tiny, tokenizer):
    """GPT-Neo's local layers count their window back over the packed row, so a group longer than the
    window is padded instead, and stays exact."""
    model = tiny["gpt-neo"].model
    config = model.config.__class__(**{**model.config.to_dict(), "window_size": 8})
    torch.manual_seed(0)
    model = model.__class__(config).eval()
    rows = rows_for(tokenizer, PROMPTS[0]) + rows_for(tokenizer, PROMPTS[2])
    lengths = [len(row.prompt_ids) for row in rows]
    assert sum(lengths) > 8 and not can_pack(model, lengths)
    assert can_pack(model, [4, 4]) and not can_pack(model, [8])  # a prompt alone is never packed
    batch, logits, _ = Batch.prefill(model, rows, model.config.vocab_size, [None, None])
    for _ in range(3):
        for row, got in zip(rows, logits):
            torch.testing.assert_close(got, alone_logits(model, row), atol=1e-4, rtol=1e-4)
        advance(batch, rows, logits)
        logits = batch.forward(model)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.inference_mode()
def test_a_prompt_prefilled_in_chunks_equals_one_pass(arch, tiny):
    loaded = tiny[arch]
    model, tokenizer = loaded.model, loaded.tokenizer
    vocab = model.config.vocab_size
    prompt = " ".join(PROMPTS) * 3
    whole_rows, chunked_rows = rows_for(tokenizer, prompt, n=2), rows_for(tokenizer, prompt, n=2)
    batch, logits, (whole_logprobs,) = Batch.prefill(model, whole_rows, vocab, [1])
    prefill = ChunkedPrefill(chunked_rows, 1)
    chunks = 0
    while (done := prefill.advance(model, 16, vocab)) is None:
        chunks += 1
    assert chunks >= 2
    chunked, chunked_logits = done
    torch.testing.assert_close(chunked_logits, logits, atol=1e-4, rtol=1e-4)
    assert [e and e.token_id for e in prefill.prompt_logprobs] == [e and e.token_id for e in whole_logprobs]
    for a, b in zip(prefill.prompt_logprobs[1:], whole_logprobs[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # Both go on decoding alike.
    advance(batch, whole_rows, logits)
    advance(chunked, chunked_rows, chunked_logits)
    torch.testing.assert_close(chunked.forward(model), batch.forward(model), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@torch.inference_mode()
def test_rows_stay_exact_through_many_joins_leaves_and_storage_layouts(arch, tiny, tokenizer):
    """Rows join and leave while others decode, the storage grows, and the window runs out of
    columns and shifts back; every step's logits still equal each sequence run alone. GPT-Neo gets
    a local-attention window of 8 tokens here, so its sequences outgrow the window."""
    model = tiny[arch].model
    if arch == "gpt-neo":
        config = model.config.__class__(**{**model.config.to_dict(), "window_size": 8})
        torch.manual_seed(0)
        model = model.__class__(config).eval()
    vocab = model.config.vocab_size

    def check(batch_logits, rows):
        for row, got in zip(rows, batch_logits):
            torch.testing.assert_close(got, alone_logits(model, row), atol=1e-4, rtol=1e-4)

    def prefilled(prompt: str, n: int = 1):
        joining = rows_for(tokenizer, prompt, n=n, new=24)
        group, logits, _ = Batch.prefill(model, joining, vocab, [None])
        check(logits, joining)
        advance(group, joining, logits)
        return group, joining

    batch, rows = prefilled(PROMPTS[0])
    layouts = []  # (storage, last column written) after each step
    for turn in range(90):
        if turn in (3, 9, 20, 41):  # a request joins; at 9 a longer prompt than any running one
            group, joining = prefilled(PROMPTS[1] if turn == 9 else PROMPTS[turn % 3], n=2 if turn == 3 else 1)
            rows = rows + joining
            batch = Batch.concatenate([batch, group], rows)
        if turn in (15, 30):  # at 15 the second row leaves, at 30 all but the newest
            stores = [layer.key_store.data_ptr() for layer in batch.cache.layers]
            before = list(rows)
            keep = [i for i in range(len(rows)) if i != 1] if turn == 15 else [len(rows) - 1]
            rows = batch.filter(keep, rows)
            # The last row takes the freed slot; nobody else moves, and the storage stays.
            expected = [before[-1] if i == 1 else before[i] for i in range(len(before) - 1)]
            assert rows == (expected if turn == 15 else [before[-1]])
            assert [layer.key_store.data_ptr() for layer in batch.cache.layers] == stores
        logits = batch.forward(model)
        check(logits, rows)
        advance(batch, rows, logits)
        layouts.append((batch.cache.layers[0].key_store.data_ptr(), batch.cache.layers[0].end))
    # The storage grew, and the window also went back to its start within the same storage.
    assert len({ptr for ptr, _ in layouts}) >= 2
    assert any(ptr == old_ptr and end < old_end for (old_ptr, old_end), (ptr, end) in zip(layouts, layouts[1:]))


@torch.inference_mode()
def test_the_storage_holds_the_rows_and_their_longest_request_with_little_to_spare(tiny, tokenizer):
    """The key/value storage is the largest thing the server allocates while it serves: its columns are
    the longest request (prompt and new tokens) rounded up to 8; it grows by rows rounded up to 4, and
    a row joining within those takes a free slot without new storage."""
    model = tiny["gpt2"].model
    vocab = model.config.vocab_size
    rows = rows_for(tokenizer, PROMPTS[1], n=3, new=24)
    batch, logits, _ = Batch.prefill(model, rows, vocab, [None])
    advance(batch, rows, logits)
    advance(batch, rows, batch.forward(model))  # the first step lays the storage out
    longest = len(rows[0].prompt_ids) + 24
    assert batch.cache.layers[0].key_store.shape[0] == 3
    assert batch.cache.layers[0].key_store.shape[2] == -(-longest // 8) * 8

    def join(prompt: str) -> tuple[int, int]:
        nonlocal batch, rows
        joining = rows_for(tokenizer, prompt, new=10)
        group, group_logits, _ = Batch.prefill(model, joining, vocab, [None])
        advance(group, joining, group_logits)
        rows = rows + joining
        batch = Batch.concatenate([batch, group], rows)
        advance(batch, rows, batch.forward(model))
        store = batch.cache.layers[0].key_store
        return store.shape[0], store.data_ptr()

    four, _ = join(PROMPTS[0])
    eight, storage = join(PROMPTS[2])
    six, same = join(PROMPTS[0])
    assert (four, eight, six) == (4, 8, 8) and same == storage
