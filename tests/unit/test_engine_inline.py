"""The engine driven turn by turn in the test's thread: batching, seeds, per-request refusals, and
the step function's end-of-text and stop rules."""

from __future__ import annotations

import types

import pytest
import torch

from app.engine.engine import LONG_PROMPT_TOKENS, PREFILL_CHUNK_TOKENS, PREFILL_GROUP_TOKENS
from app.engine.request import (
    Delta,
    GenerationRequest,
    InvalidRequestError,
    QueueFullError,
    RequestHandle,
    SamplingParams,
)
from app.engine.sampling import SamplingTensors
from app.engine.step import Row, step
from scripts.make_tiny_models import ARCHITECTURES
from tests.unit.conftest import inline_engine, run_until_idle

PROMPTS = ["Hello", "Beautiful is better than ugly. Explicit is better than implicit.", "When Konrad", "a"]
# A long prompt: joining a running batch, it is prefilled a chunk per turn.
LONG_PROMPT = "Simple is better than complex. Complex is better than complicated. " * 30


def request(tokenizer, prompt: str, new: int = 24, **fields) -> GenerationRequest:
    sampling = SamplingParams(**{k: v for k, v in fields.items() if k in SamplingParams.__dataclass_fields__})
    other = {k: v for k, v in fields.items() if k not in SamplingParams.__dataclass_fields__}
    return GenerationRequest(tuple(tokenizer(prompt).input_ids), new, sampling, **other)


def text_of(handle: RequestHandle, index: int = 0) -> str:
    return handle.result().completions[index].text


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_rows_joining_a_running_batch_equal_generate(arch, tiny):
    loaded = tiny[arch]
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = inline_engine(loaded)
    handles = {}
    assert len(tokenizer(LONG_PROMPT).input_ids) > LONG_PROMPT_TOKENS
    with torch.inference_mode():
        for prompt in [*PROMPTS, LONG_PROMPT]:  # one new request per turn: each joins a running batch
            handles[prompt] = engine.submit(request(tokenizer, prompt))
            engine.run_once()
    run_until_idle(engine)
    for prompt, handle in handles.items():
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
        expected = out[0, ids.shape[1]:].tolist()
        got = handle.result().completions[0].token_ids
        # The tiny model may end early with end-of-text, which generate keeps as its last token.
        assert got == expected[: len(got)], prompt


def test_a_seeded_request_repeats_whatever_runs_beside_it(tiny):
    loaded = tiny["gpt2"]
    tokenizer = loaded.tokenizer
    fields = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=1234, n=2)
    engine = inline_engine(loaded)
    alone = engine.submit(request(tokenizer, "Hello", **fields))
    run_until_idle(engine)
    noise = [engine.submit(request(tokenizer, p, do_sample=True, typical_p=0.9, repetition_penalty=1.3, seed=i))
             for i, p in enumerate(PROMPTS)]
    with torch.inference_mode():
        engine.run_once()
    again = engine.submit(request(tokenizer, "Hello", **fields))
    run_until_idle(engine)
    repeated = again.result().completions
    assert [c.token_ids for c in repeated] == [c.token_ids for c in alone.result().completions]
    assert repeated[0].token_ids != repeated[1].token_ids
    assert all(h.result() for h in noise)


def test_one_bad_request_is_refused_alone(tiny):
    loaded = tiny["gpt2"]
    tokenizer = loaded.tokenizer
    engine = inline_engine(loaded)
    good = engine.submit(request(tokenizer, "Hello", do_sample=True, seed=1))
    huge_k = engine.submit(request(tokenizer, "Hello", do_sample=True, top_k=2**70, seed=2))
    tiny_t = engine.submit(request(tokenizer, "Hello", do_sample=True, temperature=1e-45, seed=3))
    greedy = engine.submit(request(tokenizer, "Hello"))
    bad = engine.submit(request(tokenizer, "Hello", repetition_penalty=float("inf")))
    run_until_idle(engine)
    with pytest.raises(InvalidRequestError, match="repetition_penalty"):
        bad.result()
    assert good.result().completion_tokens > 0
    assert huge_k.result().completion_tokens > 0
    assert text_of(tiny_t) == text_of(greedy)  # an overflowing temperature decodes greedily


def test_a_burst_is_prefilled_a_group_per_turn_between_decoding_steps(tiny):
    """Requests that arrive together: each turn prefills the next group of about PREFILL_GROUP_TOKENS
    prompt tokens and then decodes a step for every running row, so the first requests of a burst get
    their first tokens without waiting for the last, and keep getting tokens while the rest arrive."""
    loaded = tiny["gpt2"]
    tokenizer = loaded.tokenizer
    engine = inline_engine(loaded)
    prompt = "Beautiful is better than ugly. " * 40
    ids = tuple(tokenizer(prompt).input_ids[: PREFILL_GROUP_TOKENS // 3])  # three prompts fill a group
    burst = [engine.submit(GenerationRequest(ids, 8, SamplingParams(), ignore_eos=True)) for _ in range(8)]
    tokens = [[] for _ in burst]

    def turn() -> list[int]:
        engine.run_once()
        for got, handle in zip(tokens, burst):
            while not handle.events.empty():
                got.extend(handle.events.get().token_ids)
        return [len(got) for got in tokens]

    with torch.inference_mode():
        assert turn() == [2, 2, 2, 0, 0, 0, 0, 0]  # a group's first tokens, then a step for it
        assert engine.queue_size == 5 and engine.batch_size == 3
        assert turn() == [3, 3, 3, 2, 2, 2, 0, 0]
        assert turn() == [4, 4, 4, 3, 3, 3, 2, 2]
    run_until_idle(engine)
    assert all(h.result().completion_tokens == 8 for h in burst)


def test_a_long_prompt_is_prefilled_between_decoding_steps(tiny):
    """While a long prompt is prefilled chunk by chunk, the running row gets a token every turn."""
    loaded = tiny["gpt2"]
    tokenizer = loaded.tokenizer
    engine = inline_engine(loaded)
    running = engine.submit(request(tokenizer, "Hello", new=100, ignore_eos=True))
    chunks = -(-len(tokenizer(LONG_PROMPT).input_ids) // PREFILL_CHUNK_TOKENS)
    with torch.inference_mode():
        engine.run_once()
        long = engine.submit(request(tokenizer, LONG_PROMPT, new=5, ignore_eos=True))
        for _ in range(chunks):
            before = running.events.qsize()
            assert long.events.empty()
            engine.run_once()
            assert running.events.qsize() == before + 1  # one token per turn, whatever is being prefilled
    run_until_idle(engine)
    assert long.result().completion_tokens == 5
    assert running.result().completion_tokens == 100


def test_a_burst_of_free_rows_plus_queue_places_is_admitted_in_full(tiny):
    loaded = tiny["gpt2"]
    tokenizer = loaded.tokenizer
    engine = inline_engine(loaded, max_batch_size=4, max_queue=2)
    running = engine.submit(request(tokenizer, "Hello", new=30, ignore_eos=True))
    with torch.inference_mode():
        engine.run_once()
    assert engine.batch_size == 1
    burst = [engine.submit(request(tokenizer, p, new=5)) for p in PROMPTS[:3] + PROMPTS[:2]]  # 3 free rows + 2
    with pytest.raises(QueueFullError):
        engine.submit(request(tokenizer, "one too many"))
    run_until_idle(engine)
    assert all(h.result().completion_tokens > 0 for h in [running, *burst])


def test_cancelled_rows_leave_the_batch(tiny):
    loaded = tiny["gpt2"]
    engine = inline_engine(loaded)
    handle = engine.submit(request(loaded.tokenizer, "Hello", new=500, ignore_eos=True))
    with torch.inference_mode():
        engine.run_once()
        engine.run_once()
        assert engine.batch_size == 1
        handle.cancel()
        engine.run_once()
    assert engine.batch_size == 0
    events = []
    while not handle.events.empty():
        events.append(handle.events.get())
    assert [e.finish_reason for e in events if isinstance(e, Delta)][-1] == "cancelled"


class FakeBatch:
    """The batch as the step function sees it: sampling tensors, penalty state, and `record`."""

    def __init__(self, params: list[SamplingParams], vocab: int):
        self.sampling = SamplingTensors.build(params, torch.device("cpu"), vocab)
        self.seen = self.output_counts = None
        self.recorded = None

    def record(self, tokens):
        self.recorded = tokens


def make_row(tokenizer, prompt="Hi", **fields) -> Row:
    return Row.start(RequestHandle(request(tokenizer, prompt, **fields)), 0, tokenizer)


def test_end_of_text_is_banned_until_min_new_tokens_and_with_ignore_eos(tokenizer):
    eos, vocab = tokenizer.eos_token_id, len(tokenizer)
    rows = [make_row(tokenizer, new=5, min_new_tokens=2), make_row(tokenizer, new=5, ignore_eos=True),
            make_row(tokenizer, new=5)]
    logits = torch.zeros((3, vocab))
    logits[:, eos] = 10.0  # end-of-text is by far the most likely token for every row
    batch = FakeBatch([r.params for r in rows], vocab)
    first = step(logits.clone(), batch, rows, eos)
    assert [d.token_ids[0] == eos for d in first] == [False, False, True]
    assert [d.finish_reason for d in first] == [None, None, "stop"]
    second = step(logits[:2].clone(), FakeBatch([r.params for r in rows[:2]], vocab), rows[:2], eos)
    assert [d.token_ids[0] == eos for d in second] == [False, False]
    third = step(logits[:2].clone(), FakeBatch([r.params for r in rows[:2]], vocab), rows[:2], eos)
    assert third[0].token_ids == [eos] and third[0].finish_reason == "stop"
    assert third[1].token_ids != [eos] and third[1].finish_reason is None


def test_a_stop_string_ends_the_row_and_is_not_released(tokenizer):
    target = tokenizer(" world and more").input_ids
    row = make_row(tokenizer, prompt="Hello", new=len(target) + 5, stop=("and",))
    released, finish = "", None
    for token in target:
        logits = torch.full((1, len(tokenizer)), -10.0)
        logits[0, token] = 10.0
        delta = step(logits, FakeBatch([row.params], len(tokenizer)), [row], tokenizer.eos_token_id)[0]
        released += delta.text
        if delta.finish_reason:
            finish = delta.finish_reason
            break
    assert finish == "stop"
    assert released == " world "


def test_log_probabilities_come_from_the_model_not_the_penalties(tokenizer):
    vocab = len(tokenizer)
    row = make_row(tokenizer, logprobs=2, repetition_penalty=2.0)
    logits = torch.randn((1, vocab), generator=torch.Generator().manual_seed(0))
    batch = FakeBatch([row.params], vocab)
    batch.seen = torch.ones((1, vocab), dtype=torch.bool)
    batch.output_counts = torch.zeros((1, vocab), dtype=torch.int32)
    delta = step(logits.clone(), batch, [row], None)[0]
    expected = torch.log_softmax(logits, -1)[0]
    assert delta.logprobs[0].logprob == pytest.approx(float(expected[delta.token_ids[0]]), abs=1e-5)
    assert [t for t, _ in delta.logprobs[0].top] == expected.topk(2).indices.tolist()


def test_refused_requests_do_not_reach_the_model(tiny):
    loaded = tiny["gpt2"]
    calls = []
    guarded = types.SimpleNamespace(**vars(loaded))
    guarded.model = _Recording(loaded.model, calls)
    engine = inline_engine(guarded)
    bad = engine.submit(GenerationRequest((10**9,), 5))
    run_until_idle(engine)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        bad.result()
    assert calls == []


class _Recording:
    """The model, recording the shape of each forward pass's input."""

    def __init__(self, model, calls):
        self._model, self._calls = model, calls
        self.config, self.device = model.config, model.device

    def __call__(self, *args, **kwargs):
        self._calls.append(tuple(kwargs["input_ids"].shape))
        return self._model(*args, **kwargs)
