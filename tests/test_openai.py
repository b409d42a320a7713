"""The OpenAI-compatible API, exercised with the official `openai` Python client.

Everything a script written for OpenAI's completions endpoint does, it does here by changing only
`base_url` and `model`: plain and streamed completions, several choices and prompts, stop strings,
seeds, log-probabilities, echo, usage, the models list, and each error as the client's typed exception.
Most tests run the client in process (over the app's WSGI interface, on the shared engine, serving
tiny GPT-2 from its folder, so the model id is an absolute path); keys, overload and disconnects
run against a real server over real HTTP.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from tests import sse
from tests.conftest import ONE_AT_A_TIME_KEY

PROMPT = "Hello world! When Konrad Adenauer was elected chancellor in 1949,"


@pytest.fixture(scope="module")
def served_model(tiny_models) -> str:
    """The model id of a real server: the repo id it loads from its Hugging Face cache."""
    return tiny_models.repo_ids["gpt2"]


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models.folders["gpt2"])


def make_client(server, api_key="any-key", **options) -> openai.OpenAI:
    # No retries by default: an error must reach the test at once, not after the client's back-off.
    options.setdefault("max_retries", 0)
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, **options)


def greedy(client, model, prompt=PROMPT, **options):
    options.setdefault("max_tokens", 12)
    return client.completions.create(model=model, prompt=prompt, temperature=0, **options)


# ---- completions -------------------------------------------------------------------------------------


def test_plain_completion_has_openai_shape_and_true_usage(client, model, tokenizer):
    completion = greedy(client, model, max_tokens=7, extra_body={"ignore_eos": True})

    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    assert completion.model == model
    assert completion.created > 0
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0 and choice.text and choice.logprobs is None
    assert choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7


def test_default_max_tokens_is_16(client, model):
    completion = client.completions.create(model=model, prompt=PROMPT, extra_body={"ignore_eos": True})
    assert completion.usage.completion_tokens == 16
    assert completion.choices[0].finish_reason == "length"


def test_same_engine_as_the_original_api(api, client, model):
    """Greedy text is the same through /v1/completions and the original /generate."""
    completion = greedy(client, model, max_tokens=10)
    original = api.post("/generate", json={"text": {"plain": PROMPT}, "max_new_tokens": 10, "do_sample": False}).json
    assert original["sentences"][0]["generated_text"] == PROMPT + completion.choices[0].text


def test_greedy_is_repeatable_and_top_k_1_sampling_is_greedy(client, model):
    first = greedy(client, model).choices[0].text
    assert greedy(client, model).choices[0].text == first
    top_1 = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=1.5,
                                      extra_body={"top_k": 1})
    assert top_1.choices[0].text == first


def test_streaming_gives_the_same_text_in_openai_chunks(client, model):
    expected = greedy(client, model, max_tokens=10).choices[0].text
    chunks = list(greedy(client, model, max_tokens=10, stream=True, stream_options={"include_usage": True}))

    *text_chunks, usage_chunk = chunks
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == expected
    # finish_reason only on the last chunk of the choice
    assert [c.choices[0].finish_reason for c in text_chunks][:-1] == [None] * (len(text_chunks) - 1)
    assert text_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert text_chunks[0].usage is None
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == 10


def test_stream_without_usage_ends_with_done(api, model):
    response = api.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 5, "stream": True})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = sse.data(sse.chunks_of(response))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] is not None


def test_n_choices_with_a_seed_are_repeatable(client, model):
    def sample(seed):
        completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, n=3, temperature=1.0,
                                               seed=seed)
        assert [c.index for c in completion.choices] == [0, 1, 2]
        return [c.text for c in completion.choices]

    first = sample(1234)
    assert sample(1234) == first
    assert len(set(first)) > 1  # the choices are independent samples
    assert sample(99) != first


def test_n_counts_the_prompt_once_and_every_choice(client, model, tokenizer):
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=4, n=3, temperature=1.0,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert completion.usage.completion_tokens == 3 * 4


def test_a_list_of_prompts_gives_prompt_major_choices(client, model, tokenizer):
    prompts = ["The quick brown fox", PROMPT]
    completion = greedy(client, model, prompt=prompts, n=2, max_tokens=6)

    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        alone = greedy(client, model, prompt=prompt, max_tokens=6).choices[0].text
        assert completion.choices[2 * p].text == alone
        assert completion.choices[2 * p + 1].text == alone
    assert completion.usage.prompt_tokens == sum(len(tokenizer(p).input_ids) for p in prompts)


def test_a_list_of_prompts_streams_every_choice(client, model):
    prompts = ["The quick brown fox", PROMPT]
    texts: dict[int, str] = {}
    finished = []
    for chunk in greedy(client, model, prompt=prompts, max_tokens=6, stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.append(choice.index)
    assert sorted(finished) == [0, 1]
    assert texts == {i: c.text for i, c in enumerate(greedy(client, model, prompt=prompts, max_tokens=6).choices)}


def test_token_id_prompts(client, model, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    as_text = greedy(client, model).choices[0].text
    as_ids = greedy(client, model, prompt=ids)
    assert as_ids.choices[0].text == as_text
    assert as_ids.usage.prompt_tokens == len(ids)

    several = greedy(client, model, prompt=[ids, ids[:3]], echo=True)
    assert several.choices[0].text == PROMPT + as_text
    assert several.choices[1].text.startswith(tokenizer.decode(ids[:3]))


def test_stop_strings_end_the_text_and_are_not_returned(client, model):
    full = greedy(client, model, max_tokens=30, extra_body={"ignore_eos": True}).choices[0].text
    stop = full[6:9]
    cut = full[: full.index(stop)]

    completion = greedy(client, model, max_tokens=30, stop=stop)
    assert completion.choices[0].text == cut
    assert completion.choices[0].finish_reason == "stop"

    several = greedy(client, model, max_tokens=30, stop=["never-in-the-text", stop])
    assert several.choices[0].text == cut

    streamed = greedy(client, model, max_tokens=30, stop=[stop], stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_extra_sampling_fields_are_accepted(client, model):
    completion = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0.7, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, user="someone", best_of=1, seed=1,
        extra_body={"top_k": 40, "repetition_penalty": 1.2, "typical_p": 0.95, "min_tokens": 8, "ignore_eos": False,
                    "unknown_field": "is ignored"},
    )
    assert completion.usage.completion_tokens == 8  # min_tokens = max_tokens: no early end


def test_penalties_change_greedy_text(client, model):
    plain = greedy(client, model, max_tokens=20, extra_body={"ignore_eos": True}).choices[0].text
    penalised = greedy(client, model, max_tokens=20, frequency_penalty=2.0, extra_body={"ignore_eos": True})
    assert penalised.choices[0].text != plain


# ---- log-probabilities and echo ------------------------------------------------------------------


def test_logprobs_shape_alternatives_and_offsets(client, model):
    completion = greedy(client, model, max_tokens=8, logprobs=3, extra_body={"ignore_eos": True})
    choice = completion.choices[0]
    lp = choice.logprobs

    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset[0] == 0
    for i, token in enumerate(lp.tokens):
        assert choice.text[lp.text_offset[i]:].startswith(token)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        # the 3 most likely tokens, and always the chosen one (OpenAI: up to logprobs + 1 entries)
        assert 3 <= len(top) <= 4 and top[token] == pytest.approx(logprob)
        assert logprob == pytest.approx(max(top.values()))  # greedy picks the most likely token


def test_logprobs_zero_gives_only_the_chosen_token(client, model):
    lp = greedy(client, model, max_tokens=4, logprobs=0).choices[0].logprobs
    assert all(list(top) == [token] for token, top in zip(lp.tokens, lp.top_logprobs))


def test_streamed_logprobs_match(client, model):
    whole = greedy(client, model, max_tokens=8, logprobs=2, extra_body={"ignore_eos": True}).choices[0].logprobs
    tokens, offsets = [], []
    for chunk in greedy(client, model, max_tokens=8, logprobs=2, stream=True, extra_body={"ignore_eos": True}):
        tokens += chunk.choices[0].logprobs.tokens
        offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == whole.tokens and offsets == whole.text_offset


def test_echo_returns_the_prompt_before_the_completion(client, model):
    plain = greedy(client, model).choices[0].text
    echoed = greedy(client, model, echo=True)
    assert echoed.choices[0].text == PROMPT + plain

    streamed = "".join(c.choices[0].text for c in greedy(client, model, echo=True, stream=True))
    assert streamed == PROMPT + plain


def test_echo_with_max_tokens_0_scores_the_prompt(client, model, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    completion = greedy(client, model, echo=True, max_tokens=0, logprobs=2)
    choice = completion.choices[0]
    lp = choice.logprobs

    assert choice.text == PROMPT
    assert completion.usage.prompt_tokens == len(ids) and completion.usage.completion_tokens == 0
    assert lp.tokens == [tokenizer.decode([i]) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == PROMPT
    for offset, token in zip(lp.text_offset, lp.tokens):
        assert PROMPT[offset:].startswith(token)

    # Without logprobs the prompt comes back as is; streamed too.
    assert greedy(client, model, echo=True, max_tokens=0).choices[0].text == PROMPT
    chunks = list(greedy(client, model, echo=True, max_tokens=0, stream=True))
    assert [(c.choices[0].text, c.choices[0].finish_reason) for c in chunks] == [(PROMPT, "length")]
    streamed = list(greedy(client, model, echo=True, max_tokens=0, logprobs=2, stream=True))
    assert streamed[0].choices[0].logprobs.tokens == lp.tokens


def test_echo_and_logprobs_cover_prompt_then_completion(client, model, tokenizer):
    prompt_tokens = len(tokenizer(PROMPT).input_ids)
    scored = greedy(client, model, echo=True, max_tokens=0, logprobs=1).choices[0].logprobs
    completion = greedy(client, model, echo=True, max_tokens=5, logprobs=1, extra_body={"ignore_eos": True})
    choice = completion.choices[0]
    lp = choice.logprobs

    assert len(lp.tokens) == prompt_tokens + 5
    assert lp.tokens[:prompt_tokens] == scored.tokens
    assert lp.token_logprobs[:prompt_tokens] == pytest.approx(scored.token_logprobs)
    assert lp.text_offset[prompt_tokens] == len(PROMPT)
    assert "".join(lp.tokens) == choice.text

    streamed = list(greedy(client, model, echo=True, max_tokens=5, logprobs=1, stream=True,
                           extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert sum((c.choices[0].logprobs.tokens for c in streamed), []) == lp.tokens


# ---- models --------------------------------------------------------------------------------------


def test_models_list_and_retrieve(client, model):
    models = client.models.list()
    assert [m.id for m in models.data] == [model]
    assert models.data[0].object == "model" and models.data[0].owned_by

    card = client.models.retrieve(model)  # an absolute folder path: it starts with a slash
    assert card.id == model and card.object == "model"

    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("some-org/not-served")
    assert "not-served" in err.value.message


# ---- errors as the client's typed exceptions ---------------------------------------------------


@pytest.mark.parametrize("options, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"logprobs": 6}, "logprobs"),
    ({"n": 0}, "n"),
    ({"n": 99}, "n"),
    ({"best_of": 2}, "best_of"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"suffix": "the end"}, "suffix"),
    ({"logit_bias": {"50": 10}}, "logit_bias"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 2, 10**6]}, "prompt"),
    ({"extra_body": {"min_tokens": 40}}, "min_tokens"),
    ({"extra_body": {"top_k": -5}}, "top_k"),
])
def test_invalid_values_are_400_bad_request(client, model, options, param):
    options = {"prompt": PROMPT, **options}
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, **options)
    assert err.value.status_code == 400
    assert err.value.param == param
    assert err.value.type == "invalid_request_error"
    assert err.value.body["message"].startswith(param)  # the message names the field first


def test_a_streamed_request_with_a_bad_value_is_400_before_any_event(client, model):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt=PROMPT, temperature=9, stream=True)


def test_prompt_beyond_the_context_is_400_naming_both_numbers(client, model, tokenizer):
    long_prompt = "Hello world! " * 110
    prompt_tokens = len(tokenizer(long_prompt).input_ids)
    assert prompt_tokens < 1024 < prompt_tokens + 200
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=long_prompt, max_tokens=200)
    assert err.value.code == "context_length_exceeded"
    assert "1024" in err.value.message and str(prompt_tokens + 200) in err.value.message
    assert str(prompt_tokens) in err.value.message

    # max_tokens=null asks for what is left of the context: that fits.
    completion = client.completions.create(model=model, prompt=long_prompt, max_tokens=None, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert completion.usage.total_tokens == 1024


def test_wrong_model_is_404_not_found(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT)
    assert err.value.code == "model_not_found"
    assert "The model `gpt-3.5-turbo-instruct` does not exist" in err.value.message


def test_body_over_the_limit_is_413(client, model):
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model=model, prompt="x" * (3 * 1024 * 1024))
    assert err.value.status_code == 413
    assert "MAX_BODY_BYTES" in err.value.message


def test_unknown_route_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.embeddings.create(model="m", input="hi")
    assert err.value.type == "not_found_error"


# ---- overload and disconnects ------------------------------------------------------------------------


def wait_until(condition, what: str, timeout: float = 60):
    """Poll until `condition()` is true; the deadline only stops a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"never saw {what}")


def wait_for_health(server, condition, what: str):
    """Poll /health until `condition(body)`."""
    wait_until(lambda: condition(requests.get(server.url + "/health", timeout=10).json()), what)


API_KEY = ONE_AT_A_TIME_KEY
AUTH = {"Authorization": f"Bearer {API_KEY}"}


LONG_REQUEST = {"prompt": PROMPT, "max_tokens": None, "ignore_eos": True, "seed": 3}  # the rest of the context


def long_stream(server, model):
    """A streamed request that runs for a while (the rest of the context): returns the open response
    after its first event."""
    response = requests.post(server.url + "/v1/completions", json={"model": model, **LONG_REQUEST, "stream": True},
                             headers=AUTH, stream=True, timeout=60)
    lines = response.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: {")
    return response, lines


def test_with_an_api_key_set_a_wrong_or_missing_key_is_401(one_at_a_time_server, served_model):
    with pytest.raises(openai.AuthenticationError) as err:
        make_client(one_at_a_time_server, api_key="wrong").completions.create(model=served_model, prompt=PROMPT)
    assert err.value.status_code == 401 and err.value.type == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        make_client(one_at_a_time_server, api_key="wrong").models.list()
    assert requests.get(one_at_a_time_server.url + "/v1/models", timeout=10).status_code == 401

    client = make_client(one_at_a_time_server, api_key=API_KEY)
    assert client.models.list().data[0].id == served_model
    assert client.completions.create(model=served_model, prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_more_prompts_than_the_queue_holds_is_400(one_at_a_time_server, served_model):
    with pytest.raises(openai.BadRequestError) as err:
        make_client(one_at_a_time_server, api_key=API_KEY).completions.create(model=served_model, prompt=["a", "b"])
    assert err.value.param == "prompt" and "MAX_QUEUE=1" in err.value.message


def metric(server, name: str, **labels) -> float:
    """One sample of the server's Prometheus metrics."""
    text = requests.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    return next(s.value for s in samples if s.name == name and s.labels == labels)


def cancelled_requests(server) -> float:
    """The server's own count of generation requests dropped because their client went away."""
    return metric(server, "gpt_server_requests_cancelled_total")


def queue_full_refusals(server) -> float:
    return metric(server, "gpt_server_requests_refused_total", reason="queue_full")


def test_full_queue_is_refused_at_once_with_503_and_retry_after(one_at_a_time_server, served_model):
    server = one_at_a_time_server
    client = make_client(server, api_key=API_KEY)
    busy, _ = long_stream(server, served_model)  # holds the only place in the batch
    outcome = {}

    def in_thread(name, client):
        def run():
            outcome[name] = client.completions.create(model=served_model, prompt=PROMPT, max_tokens=2,
                                                      extra_body={"ignore_eos": True})
        thread = threading.Thread(target=run)
        thread.start()
        return thread

    waiting = in_thread("waiting", client)  # holds the only place in the queue
    wait_for_health(server, lambda h: h["batch_size"] == 1 and h["queue_size"] == 1, "a full batch and queue")
    full = {"batch_size": 1, "queue_size": 1}

    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model=served_model, prompt=PROMPT, max_tokens=2)
    assert err.value.status_code == 503
    assert err.value.code == "queue_full"
    assert err.value.response.headers["Retry-After"] == "1"
    # Refused at once: the long request still runs and the other one still waits.
    assert {k: v for k, v in requests.get(server.url + "/health", timeout=10).json().items() if k in full} == full

    with pytest.raises(openai.InternalServerError):  # streaming requests are refused the same way
        client.completions.create(model=served_model, prompt=PROMPT, max_tokens=2, stream=True)

    # The client's own retries (twice by default, after Retry-After) get through once there is room.
    refusals = queue_full_refusals(server)
    retrying = in_thread("retrying", make_client(server, api_key=API_KEY, max_retries=2))
    wait_until(lambda: queue_full_refusals(server) > refusals, "the first try refused")
    busy.close()  # going away frees the batch for the waiting request, then the queue for the retry
    for thread in (waiting, retrying):
        thread.join(60)
    assert outcome["waiting"].usage.completion_tokens == 2
    assert outcome["retrying"].usage.completion_tokens == 2


def test_disconnecting_a_stream_cancels_its_generation(one_at_a_time_server, served_model):
    server = one_at_a_time_server
    before = cancelled_requests(server)

    response, _ = long_stream(server, served_model)  # goes away after the first event
    response.close()
    # The first event may reach the client a moment before its row counts in the batch: an empty batch
    # alone would not say the engine has seen the cancellation, its count does.
    wait_until(lambda: cancelled_requests(server) == before + 1, "the request cancelled, not run to its end")
    wait_for_health(server, lambda h: h["batch_size"] == 0 and h["queue_size"] == 0, "an empty batch")
    assert cancelled_requests(server) == before + 1

    # The server goes on serving.
    assert greedy(make_client(server, api_key=API_KEY), served_model, max_tokens=3).usage.completion_tokens >= 1


def test_disconnecting_while_waiting_for_a_whole_answer_cancels_it(one_at_a_time_server, served_model):
    server = one_at_a_time_server
    before = cancelled_requests(server)

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps({"model": served_model, **LONG_REQUEST}),
                       headers={"Content-Type": "application/json", **AUTH})
    wait_for_health(server, lambda h: h["batch_size"] == 1, "the request running")
    connection.close()
    wait_for_health(server, lambda h: h["batch_size"] == 0 and h["queue_size"] == 0, "an empty batch")
    assert cancelled_requests(server) == before + 1  # cancelled, not run to its end


# ---- min_p and per-request validation (in process) -----------------------------------------------


def test_min_p_1_keeps_only_the_most_likely_token(client, model):
    """min_p=1 keeps the tokens as likely as the most likely one: hot sampling becomes greedy."""
    hot = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=2.0, seed=1)
    sampled = client.completions.create(**hot).choices[0].text
    kept = client.completions.create(**hot, extra_body={"min_p": 1.0}).choices[0].text
    assert kept == greedy(client, model).choices[0].text != sampled


def test_min_p_is_passed_on_and_seeded(client, model):
    def sample(min_p):
        return [c.text for c in client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=1.5,
                                                          n=3, seed=21, extra_body={"min_p": min_p}).choices]

    assert sample(0.8) == sample(0.8)
    assert sample(0.0) != sample(0.8) != sample(1.0)  # neither off nor greedy


@pytest.mark.parametrize("extra, param", [
    ({"top_k": 2**63}, "top_k"),
    ({"top_k": 10**40}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": True}, "min_p"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"repetition_penalty": 5e-324}, "repetition_penalty"),  # would make the logits infinite
    ({"repetition_penalty": 1e300}, "repetition_penalty"),
    ({"temperature": float("nan")}, "temperature"),
    ({"seed": 2**64}, "seed"),
    ({"stop": ["x" * 257]}, "stop"),
    ({"prompt": "a lone \ud800 surrogate"}, "prompt"),
    ({"prompt": ["fine", "lone \udfff"]}, "prompt"),
    ({"stop": ["\ud800"]}, "stop"),
])
def test_out_of_range_and_malformed_values_are_refused_per_request(api, extra, param):
    """Refused before the engine sees them: a neighbour in the same batch never pays for them."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2, **extra})  # Python's JSON writes Infinity and NaN
    response = api.post("/v1/completions", data=body, content_type="application/json")
    assert response.status_code == 400, response.json
    assert response.json["error"]["param"] == param
    assert response.json["error"]["message"].startswith(param)
    # The engine still serves.
    assert api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_a_prompt_too_long_for_any_tokenization_is_refused_by_its_length(api):
    response = api.post("/v1/completions", json={"prompt": ["short", "a" * 1_500_000], "max_tokens": 2})
    assert response.status_code == 400 and response.json["error"]["param"] == "prompt.1"
    assert response.json["error"]["code"] == "context_length_exceeded"


def test_stop_length_is_a_setting(make_api):
    api = make_api(MAX_STOP_LENGTH=4)
    refused = api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": ["abcde"]})
    assert refused.status_code == 400 and "MAX_STOP_LENGTH" in refused.json["error"]["message"]
    assert api.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": ["abcd"]}).status_code == 200


def test_line_separators_in_events_survive_a_line_splitting_reader(api, model):
    """U+2028, U+2029 and U+0085 are JSON escapes on the wire: `splitlines()` still sees one line per event."""
    prompt = "one\u2028two\u2029three\x85four"
    response = api.post("/v1/completions", json={"model": model, "prompt": prompt, "echo": True, "max_tokens": 2,
                                                 "stream": True})
    raw = response.get_data(as_text=True)
    assert not {"\u2028", "\u2029", "\x85"} & set(raw)
    naive = [json.loads(line[len("data: "):]) for line in raw.splitlines() if line.startswith("data: {")]
    assert naive[0]["choices"][0]["text"] == prompt
    assert naive == sse.json_events([raw.encode()])
