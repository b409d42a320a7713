"""The original API (`POST /generate`, `POST /`, `POST /generate_stream`) over HTTP.

Every request goes over HTTP to the app served in process (`live_api`, on the shared engine that
loads each tiny model from its folder). Where the answer is deterministic it is compared with what
transformers' own `generate` makes of the same model files: that is what the original server
answered, so an old client sees the same text.
"""

from __future__ import annotations

import base64
import json
import re

import pytest
import requests
import torch

from tests import sse

PROMPT = "When Konrad Adenauer was elected chancellor in"
SHORT = "Hello world"


def post(server, body, path: str = "/generate", **kwargs) -> requests.Response:
    if "data" not in kwargs:
        kwargs["json"] = body
    return requests.post(server.url + path, timeout=120, **kwargs)


def generate(server, body: dict, path: str = "/generate") -> dict:
    response = post(server, body, path)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()


def texts(answer: dict) -> list[str]:
    return [sentence["generated_text"] for sentence in answer["sentences"]]


def sample(server, seed: int, **fields) -> str:
    body = {"text": {"plain": SHORT}, "max_length": 24, "do_sample": True, "seed": seed, **fields}
    return texts(generate(server, body))[0]


def assert_error(response: requests.Response, status: int, param: str | None, *words: str) -> dict:
    """A JSON error naming the field (`error.param`, in `error.message`, in `detail[0].loc`) and the words."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    body = response.json()
    error = body["error"]
    assert error["param"] == param, body
    assert error["type"] and error["code"], body
    if param is not None:
        assert param.split(".")[0] in error["message"], body
    for word in words:
        assert word.lower() in error["message"].lower(), body
    # The original's clients read FastAPI's `detail` list.
    assert isinstance(body["detail"], list) and body["detail"], body
    assert body["detail"][0]["loc"] == ["body", *(param.split(".") if param else [])], body
    assert body["detail"][0]["msg"], body
    return error


class Reference:
    """The model files the server loads, run by transformers' `generate` in this process."""

    def __init__(self, folder):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder).eval()

    def tokens(self, text: str) -> int:
        return len(self.tokenizer(text).input_ids)

    def generate(self, prompt: str, **kwargs) -> tuple[str, int]:
        """(full text with the prompt, total number of tokens) of one generation."""
        inputs = self.tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.generate(**inputs, pad_token_id=self.tokenizer.eos_token_id, **kwargs)
        return self.tokenizer.decode(out[0], skip_special_tokens=True), out.shape[1]

    def greedy(self, prompt: str, max_length: int, **kwargs) -> str:
        return self.generate(prompt, max_length=max_length, do_sample=False, **kwargs)[0]


@pytest.fixture(scope="session")
def reference(tiny_models):
    loaded: dict[str, Reference] = {}

    def get(arch: str = "gpt2") -> Reference:
        if arch not in loaded:
            loaded[arch] = Reference(tiny_models.folders[arch])
        return loaded[arch]

    return get


# ---- The response ---------------------------------------------------------------------------------


def test_response_has_the_original_shape(live_api, tiny_models):
    answer = generate(live_api, {"text": {"plain": SHORT}})
    assert answer["model"] == str(tiny_models.folders["gpt2"])  # the id of a model served from a folder
    assert isinstance(answer["s_elapsed"], str) and re.fullmatch(r"\d+\.\d\d", answer["s_elapsed"])
    assert len(answer["sentences"]) == 1
    assert answer["sentences"][0]["generated_text"].startswith(SHORT)


def test_post_to_root_is_the_same_as_generate(live_api):
    body = {"text": {"plain": PROMPT}, "max_length": 40}
    assert texts(generate(live_api, body, "/")) == texts(generate(live_api, body, "/generate"))


def test_old_clients_need_no_content_type(live_api):
    body = json.dumps({"text": {"plain": SHORT}, "max_length": 10})
    for headers in ({}, {"Content-Type": "application/x-www-form-urlencoded"}, {"Content-Type": "text/plain"}):
        response = post(live_api, None, data=body, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["sentences"][0]["generated_text"].startswith(SHORT)


def test_unknown_fields_are_ignored(live_api):
    answer = generate(live_api, {"text": {"plain": SHORT}, "max_length": 10, "callback_url": "x", "beams": 4})
    assert texts(answer)[0].startswith(SHORT)


# ---- Fields and their defaults --------------------------------------------------------------------


def test_defaults_are_greedy_with_20_tokens_in_total(live_api, reference):
    ref = reference()
    answer = generate(live_api, {"text": {"plain": SHORT}})
    assert texts(answer) == [ref.greedy(SHORT, max_length=20)]
    assert answer["sentences"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 20 - ref.tokens(SHORT)
    explicit = {"text": {"plain": SHORT}, "do_sample": False, "top_p": 100, "top_k": 50, "temperature": 1.0,
                "max_length": 20, "num_return_sequences": 1}
    assert texts(generate(live_api, explicit)) == texts(answer)


@pytest.mark.parametrize("max_length", [25, 31, 64])
def test_max_length_counts_the_prompt(live_api, reference, max_length):
    ref = reference()
    prompt_tokens = ref.tokens(PROMPT)
    expected, total = ref.generate(PROMPT, max_length=max_length, do_sample=False)
    assert total == max_length  # the model did not stop early: the full length is what is compared
    answer = generate(live_api, {"text": {"plain": PROMPT}, "max_length": max_length})
    assert texts(answer) == [expected]
    assert answer["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": max_length - prompt_tokens,
                               "total_tokens": max_length}


def test_greedy_is_repeatable(live_api):
    body = {"text": {"plain": PROMPT}, "max_length": 48}
    assert texts(generate(live_api, body)) == texts(generate(live_api, body))


def test_do_sample_samples(live_api, reference):
    greedy = reference().greedy(SHORT, max_length=24)
    unseeded = {texts(generate(live_api, {"text": {"plain": SHORT}, "max_length": 24, "do_sample": True}))[0]
                for _ in range(3)}
    assert len(unseeded) > 1
    assert any(sample(live_api, seed) != greedy for seed in (1, 2, 3))


def test_top_p_of_1_or_more_is_off(live_api):
    default = sample(live_api, 7)
    for top_p in (1, 1.0, 1.5, 100):
        assert sample(live_api, 7, top_p=top_p) == default


def test_top_p_accepts_fractions(live_api, reference):
    greedy = reference().greedy(SHORT, max_length=24)
    # The original read 0.9 as the integer 0 and so decoded greedily; here 0.9 keeps a real nucleus...
    assert any(sample(live_api, seed, top_p=0.9, top_k=0) != greedy for seed in (1, 2, 3))
    # ...and a tiny nucleus keeps only the most likely token.
    assert sample(live_api, 1, top_p=1e-9) == greedy


def test_top_k(live_api, reference):
    greedy = reference().greedy(SHORT, max_length=24)
    assert sample(live_api, 3, top_k=1) == greedy
    assert sample(live_api, 3) == sample(live_api, 3, top_k=50)  # 50 is the default
    assert any(sample(live_api, seed, top_k=0) != sample(live_api, seed) for seed in (1, 2, 3))


def test_min_p(live_api, reference):
    """min_p=1 keeps only the tokens as likely as the most likely one: hot sampling becomes greedy."""
    greedy = reference().greedy(SHORT, max_length=24)
    assert sample(live_api, 3, min_p=1.0, temperature=2.0, top_k=0) == greedy
    assert sample(live_api, 3, min_p=0.8, top_k=0) == sample(live_api, 3, min_p=0.8, top_k=0)


def test_temperature(live_api, reference):
    greedy = reference().greedy(SHORT, max_length=24)
    assert sample(live_api, 5, temperature=1e-5) == greedy
    assert sample(live_api, 5) == sample(live_api, 5, temperature=1.0)  # 1.0 is the default
    assert any(sample(live_api, seed, temperature=5.0) != sample(live_api, seed) for seed in (1, 2, 3))


def test_greedy_ignores_the_sampling_fields(live_api, reference):
    body = {"text": {"plain": SHORT}, "max_length": 24, "temperature": 0, "top_k": 3, "top_p": 0.1}
    assert texts(generate(live_api, body)) == [reference().greedy(SHORT, max_length=24)]


def test_num_return_sequences(live_api):
    body = {"text": {"plain": PROMPT}, "do_sample": True, "max_length": 40, "num_return_sequences": 3, "seed": 11}
    answer = generate(live_api, body)
    assert len(answer["sentences"]) == 3
    assert all(text.startswith(PROMPT) for text in texts(answer))
    assert len(set(texts(answer))) > 1
    usage = answer["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]
    assert usage["completion_tokens"] > 3 * 1  # counted over all three sequences


def test_the_original_example_body(live_api):
    body = {"text": {"plain": PROMPT}, "do_sample": True, "top_p": 100, "top_k": 50, "temperature": 0.6,
            "max_length": 128, "num_return_sequences": 3}
    answer = generate(live_api, body)
    assert len(answer["sentences"]) == 3
    assert all(text.startswith(PROMPT) for text in texts(answer))


# ---- text.in_64 -------------------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


@pytest.mark.parametrize("in_64, prompt", [
    ("SGVsbG8gd29ybGQhCg==", "Hello world!\n"),
    ("SGVsbG8gd29ybGQhCg", "Hello world!\n"),  # padding missing
    ("SGVsbG8g\nd29ybGQh\nCg==\n", "Hello world!\n"),  # wrapped lines, as GNU base64 prints them
    ("SGVs bG8g d29y bGQh Cg==", "Hello world!\n"),  # spaces
    ("\tSGVsbG8gd29ybGQhCg==\r\n", "Hello world!\n"),
    (base64.encodebytes("def add(a, b):\n    \"\"\"Grüße, 世界\"\"\"\n".encode()).decode(),
     "def add(a, b):\n    \"\"\"Grüße, 世界\"\"\"\n"),
])
def test_in_64_is_decoded_leniently(live_api, in_64, prompt):
    answer = generate(live_api, {"text": {"in_64": in_64}, "max_new_tokens": 8})
    assert texts(answer)[0].startswith(prompt)
    plain = generate(live_api, {"text": {"plain": prompt}, "max_new_tokens": 8})
    assert texts(answer) == texts(plain)


def test_in_64_raw_line_breaks_inside_the_json_string(live_api):
    # Old shell scripts paste `base64` output, line breaks and all, into the JSON string.
    body = '{"text": {"in_64": "SGVsbG8g\nd29ybGQh\nCg=="}, "max_length": 12}'
    response = post(live_api, None, data=body)
    assert response.status_code == 200, response.text
    assert response.json()["sentences"][0]["generated_text"].startswith("Hello world!\n")


def test_plain_wins_over_in_64(live_api):
    plain_only = generate(live_api, {"text": {"plain": SHORT}, "max_length": 16})
    both = generate(live_api, {"text": {"plain": SHORT, "in_64": b64("Goodbye moon")}, "max_length": 16})
    assert texts(both) == texts(plain_only)
    broken_in_64 = generate(live_api, {"text": {"plain": SHORT, "in_64": "%%% not base64"}, "max_length": 16})
    assert texts(broken_in_64) == texts(plain_only)


# ---- Additions the engine offers on /generate -------------------------------------------------------


def test_seed_makes_sampling_repeatable(live_api):
    body = {"text": {"plain": PROMPT}, "do_sample": True, "max_length": 48, "seed": 1234, "num_return_sequences": 2}
    first = texts(generate(live_api, body))
    assert texts(generate(live_api, body)) == first
    others = [texts(generate(live_api, {**body, "seed": seed})) for seed in (1, 2)]
    assert any(other != first for other in others)


def test_stop_strings_end_the_text_and_are_not_returned(live_api):
    body = {"text": {"plain": PROMPT}, "max_length": 64, "do_sample": True, "seed": 5}
    continuation = texts(generate(live_api, body))[0][len(PROMPT):]
    # A stop string that first appears well inside what this seed writes anyway.
    stop = next(piece for i in range(8, len(continuation) - 3)
                if (piece := continuation[i:i + 3]).isascii() and piece.isalnum() and continuation.index(piece) == i)
    cut = continuation[:continuation.index(stop)]
    for value in (stop, [stop], ["never written \x00", stop]):
        answer = generate(live_api, {**body, "stop": value})
        assert texts(answer) == [PROMPT + cut]
        assert answer["sentences"][0]["finish_reason"] == "stop"


def test_max_new_tokens_overrides_max_length(live_api, reference):
    ref = reference()
    answer = generate(live_api, {"text": {"plain": PROMPT}, "max_length": 5, "max_new_tokens": 12})
    assert answer["usage"]["completion_tokens"] == 12
    assert texts(answer) == [ref.greedy(PROMPT, max_length=ref.tokens(PROMPT) + 12)]


@pytest.mark.parametrize("penalty", [1.5, 0.7])
def test_repetition_penalty_as_transformers_applies_it(live_api, reference, penalty):
    ref = reference()
    answer = generate(live_api, {"text": {"plain": SHORT}, "max_length": 40, "repetition_penalty": penalty})
    assert texts(answer) == [ref.greedy(SHORT, max_length=40, repetition_penalty=penalty)]
    assert texts(answer) != [ref.greedy(SHORT, max_length=40)]


@pytest.mark.parametrize("top_k", [0, 5])
def test_typical_p(live_api, reference, top_k):
    # A tiny typical mass keeps one token per step, so sampling is deterministic and comparable;
    # with top_k the typical token is chosen among the top k, in transformers' order of filters.
    expected, _ = reference().generate(SHORT, max_new_tokens=20, do_sample=True, typical_p=1e-6, top_k=top_k)
    for seed in (1, 2):
        body = {"text": {"plain": SHORT}, "max_new_tokens": 20, "do_sample": True, "typical_p": 1e-6,
                "top_k": top_k, "seed": seed}
        assert texts(generate(live_api, body)) == [expected]
    assert sample(live_api, 4, typical_p=0.9) == sample(live_api, 4, typical_p=0.9)


# ---- /generate_stream --------------------------------------------------------------------------------


def stream_events(server, body: dict) -> list[dict]:
    with requests.post(server.url + "/generate_stream", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return sse.json_events(sse.chunks_of(response))


def test_generate_stream_sends_the_same_text_piece_by_piece(live_api, tiny_models):
    body = {"text": {"plain": PROMPT}, "max_length": 48}
    whole = generate(live_api, body)
    events = stream_events(live_api, body)
    *deltas, done = events
    assert PROMPT + "".join(event["text"] for event in deltas) == texts(whole)[0]
    assert len(deltas) > 1
    assert deltas[-1]["finish_reason"] == "length" and all(e["finish_reason"] is None for e in deltas[:-1])
    assert done["done"] is True and done["model"] == str(tiny_models.folders["gpt2"])
    assert re.fullmatch(r"\d+\.\d\d", done["s_elapsed"])
    assert done["usage"] == whole["usage"] and done["finish_reasons"] == ["length"]


def test_generate_stream_several_sequences(live_api):
    events = stream_events(live_api, {"text": {"plain": SHORT}, "max_length": 20, "do_sample": True,
                                         "num_return_sequences": 2, "seed": 3})
    assert {event["index"] for event in events[:-1]} == {0, 1}
    assert events[-1]["finish_reasons"] == ["length", "length"]


def test_generate_stream_refuses_bad_input_before_streaming(live_api):
    assert_error(post(live_api, {"text": {"in_64": "%%%"}}, "/generate_stream"), 422, "text.in_64", "base64")
    assert_error(post(live_api, None, "/generate_stream", data="{"), 400, None, "JSON")


# ---- Bad input -------------------------------------------------------------------------------------

GOOD = {"text": {"plain": SHORT}}

WRONG_TYPES = [
    ({"do_sample": "yes"}, "do_sample", "boolean"),
    ({"top_k": "many"}, "top_k", "integer"),
    ({"top_k": 1.5}, "top_k", "integer"),
    ({"top_p": "high"}, "top_p", "number"),
    ({"top_p": None}, "top_p", "number"),
    ({"temperature": "hot"}, "temperature", "number"),
    ({"max_length": "long"}, "max_length", "integer"),
    ({"max_length": [128]}, "max_length", "integer"),
    ({"max_length": True}, "max_length", "number"),
    ({"num_return_sequences": {}}, "num_return_sequences", "integer"),
    ({"max_new_tokens": "ten"}, "max_new_tokens", "integer"),
    ({"seed": "lucky"}, "seed", "integer"),
    ({"stop": 5}, "stop", "list"),
    ({"stop": ["ok", 5]}, "stop.1", "string"),
    ({"typical_p": []}, "typical_p", "number"),
    ({"repetition_penalty": "strong"}, "repetition_penalty", "number"),
    ({"text": {"plain": 5}}, "text.plain", "string"),
    ({"text": {"in_64": ["SGVsbG8="]}}, "text.in_64", "string"),
]

OUT_OF_RANGE = [
    ({"top_k": -1}, "top_k", "0"),
    ({"temperature": -0.5}, "temperature", "0"),
    ({"temperature": 0, "do_sample": True}, "temperature", "> 0"),
    ({"top_p": 0, "do_sample": True}, "top_p", "> 0"),
    ({"top_p": -0.5, "do_sample": True}, "top_p", "> 0"),
    ({"max_length": 0}, "max_length", "1"),
    ({"max_length": -5}, "max_length", "1"),
    ({"num_return_sequences": 0}, "num_return_sequences", "1"),
    ({"max_new_tokens": 0}, "max_new_tokens", "1"),
    ({"repetition_penalty": 0}, "repetition_penalty", "0"),
    ({"typical_p": 0}, "typical_p", "0"),
    ({"typical_p": -1}, "typical_p", "0"),
    ({"seed": -1}, "seed", "0"),
    ({"seed": 2**64}, "seed", "9223372036854775807"),
    # Per request, before the engine: none of these may fail a neighbour in the same batch.
    ({"repetition_penalty": 5e-324}, "repetition_penalty", "0.01"),
    ({"repetition_penalty": 1e9}, "repetition_penalty", "100"),
    ({"top_k": 2**63}, "top_k", "9223372036854775807"),
    ({"min_p": 1.5}, "min_p", "1"),
    ({"min_p": -0.1}, "min_p", "0"),
    ({"text": {"plain": "lone \ud800 surrogate"}}, "text.plain", "surrogate"),
    ({"stop": ["fine", "\udfff"]}, "stop", "surrogate"),
]

TEXT_SHAPES = [
    ({"text": "Hello"}, "text", "object"),
    ({"text": ["Hello"]}, "text", "object"),
    ({"text": None}, "text", "object"),
    ({"text": 42}, "text", "object"),
    ({"text": {}}, "text", "plain"),
    ({"text": {"plain": None}}, "text", "in_64"),
    ({"text": {"prompt": "Hello"}}, "text.prompt", ""),
    ({"text": {"plain": "Hello", "extra": 1}}, "text.extra", ""),
]

BASE64 = [
    ({"text": {"in_64": "this is not base64!"}}, "text.in_64", "base64"),
    ({"text": {"in_64": "SGVs=bG8="}}, "text.in_64", "base64"),
    ({"text": {"in_64": "A"}}, "text.in_64", "base64"),
    ({"text": {"in_64": base64.b64encode(b"\xff\xfe caf\xe9").decode()}}, "text.in_64", "UTF-8"),
    ({"text": {"in_64": base64.b64encode("Grüße".encode("utf-8")[:-2]).decode()}}, "text.in_64", "UTF-8"),
]

GREEDY_SEVERAL = [
    ({"num_return_sequences": 2}, "num_return_sequences", "do_sample"),
    ({"num_return_sequences": 3, "do_sample": False}, "num_return_sequences", "do_sample"),
]


@pytest.mark.parametrize("fields, param, word", WRONG_TYPES + OUT_OF_RANGE + TEXT_SHAPES + BASE64 + GREEDY_SEVERAL,
                         ids=lambda value: json.dumps(value) if isinstance(value, dict) else None)
def test_bad_fields_are_422_naming_the_field(live_api, fields, param, word):
    body = {**GOOD, **fields}
    for path in ("/generate", "/"):
        assert_error(post(live_api, body, path), 422, param, word)


def test_missing_text(live_api):
    assert_error(post(live_api, {"max_length": 10}), 422, "text", "required")


@pytest.mark.parametrize("raw", [
    '{"text": {"plain": "Hi"}, "top_p": NaN}',
    '{"text": {"plain": "Hi"}, "temperature": Infinity, "do_sample": true}',
    '{"text": {"plain": "Hi"}, "temperature": 1e400}',
    '{"text": {"plain": "Hi"}, "repetition_penalty": -Infinity}',
])
def test_non_finite_numbers_are_refused(live_api, raw):
    param = re.search(r'"(top_p|temperature|repetition_penalty)"', raw).group(1)
    assert_error(post(live_api, None, data=raw), 422, param, "finite")


@pytest.mark.parametrize("raw, word", [
    ("this is not JSON", "JSON"),
    ('{"text": {"plain": "unterminated', "JSON"),
    ("", "JSON"),
    (b"\xff\xfe\x00{", "JSON"),
    ('[{"text": {"plain": "Hi"}}]', "object"),
    ('"text"', "object"),
    ("null", "object"),
])
def test_a_body_that_is_not_a_json_object_is_400(live_api, raw, word):
    assert_error(post(live_api, None, data=raw), 400, None, word)


def test_max_length_must_exceed_the_prompt(live_api, reference):
    prompt_tokens = reference().tokens(PROMPT)
    for max_length in (1, prompt_tokens - 1, prompt_tokens):
        error = assert_error(post(live_api, {"text": {"plain": PROMPT}, "max_length": max_length}), 422,
                             "max_length", str(max_length), str(prompt_tokens))
        assert error["code"] == "max_length_too_small"
    assert generate(live_api, {"text": {"plain": PROMPT}, "max_length": prompt_tokens + 1})


def test_beyond_the_context_is_refused_naming_both_numbers(live_api, reference):
    ref = reference()
    assert_error(post(live_api, {**GOOD, "max_length": 1025}), 422, "max_length", "1024", "1025")
    assert_error(post(live_api, {**GOOD, "max_new_tokens": 1024}), 422, "max_new_tokens", "1024",
                 str(ref.tokens(SHORT) + 1024))
    long_prompt = "Hello world, here is a rather long prompt. " * 150
    prompt_tokens = ref.tokens(long_prompt)
    assert prompt_tokens > 1024
    error = assert_error(post(live_api, {"text": {"plain": long_prompt}, "max_length": prompt_tokens + 10}), 422,
                         "max_length", "1024", str(prompt_tokens + 10))
    assert error["code"] == "context_length_exceeded"
    # Exactly the context is allowed: refused only beyond it, never truncated.
    answer = generate(live_api, {"text": {"plain": SHORT}, "max_length": 1024})
    assert answer["usage"]["total_tokens"] <= 1024
    assert texts(answer)[0].startswith(SHORT)


def test_num_return_sequences_above_the_default_limit(live_api):
    assert_error(post(live_api, {**GOOD, "do_sample": True, "num_return_sequences": 9}), 422,
                 "num_return_sequences", "8", "MAX_NUM_RETURN_SEQUENCES")


def test_wrong_method_and_unknown_route_are_json(live_api):
    response = requests.get(live_api.url + "/generate", timeout=30)
    assert response.status_code == 405 and response.json()["error"]["message"]
    response = requests.post(live_api.url + "/generate/now", json=GOOD, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["message"]


@pytest.fixture(scope="module", autouse=True)
def errors_before(app_errors) -> int:
    """How many ERROR records other modules' deliberate failures (a missing model, say) left before this one."""
    return len(app_errors.records)


def test_the_server_still_serves_after_all_the_bad_input(live_api, app_errors, errors_before):
    """Runs after the error tests above: nothing they sent may have broken the engine or logged an error."""
    assert requests.get(live_api.url + "/health", timeout=30).status_code == 200
    answer = generate(live_api, {"text": {"plain": PROMPT}, "max_length": 32})
    assert texts(answer)[0].startswith(PROMPT)
    assert app_errors.lines()[errors_before:] == []


# ---- The limits ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits_server(make_live_api):
    return make_live_api(MAX_NEW_TOKENS=16, MAX_NUM_RETURN_SEQUENCES=2, MAX_BODY_BYTES=4096, MAX_STOP_SEQUENCES=1,
                         MAX_STOP_LENGTH=8)


def test_limits_are_enforced_naming_the_setting(limits_server):
    body = {"text": {"plain": SHORT}, "max_length": 12}
    assert generate(limits_server, {**body, "do_sample": True, "num_return_sequences": 2})
    assert_error(post(limits_server, {**body, "do_sample": True, "num_return_sequences": 3}), 422,
                 "num_return_sequences", "2", "3", "MAX_NUM_RETURN_SEQUENCES")
    assert generate(limits_server, {**body, "max_new_tokens": 16})
    assert_error(post(limits_server, {**body, "max_new_tokens": 17}), 422, "max_new_tokens", "16", "17",
                 "MAX_NEW_TOKENS")
    assert_error(post(limits_server, {**body, "max_length": 40}), 422, "max_length", "16", "MAX_NEW_TOKENS")
    assert generate(limits_server, {**body, "stop": ["x"]})
    assert_error(post(limits_server, {**body, "stop": ["x", "y"]}), 422, "stop", "1", "MAX_STOP_SEQUENCES")
    assert generate(limits_server, {**body, "stop": ["12345678"]})
    assert_error(post(limits_server, {**body, "stop": ["123456789"]}), 422, "stop", "8", "9", "MAX_STOP_LENGTH")


def test_a_body_over_the_size_limit_is_413(limits_server):
    body = json.dumps({"text": {"plain": "word " * 1000}, "max_length": 12})
    assert len(body) > 4096
    assert_error(post(limits_server, None, data=body), 413, None, "4096", "MAX_BODY_BYTES")
    assert generate(limits_server, {"text": {"plain": SHORT}, "max_length": 12})


# ---- Architectures and a local folder -------------------------------------------------------------------

CONTEXT = {"gpt2": 1024, "gpt-neo": 2048, "gptj": 2048}


@pytest.fixture(scope="module", params=["gpt2", "gpt-neo", "gptj"])
def model_server(request, make_live_api, tiny_models):
    """Each architecture, loaded from a local folder (MODEL_ID=/a/folder) by the production loader.
    Loading by repo id from the Hugging Face cache is the real servers' way (see test_engine.py)."""
    model_id = str(tiny_models.folders[request.param])
    return request.param, model_id, make_live_api(MODEL_ID=model_id)


def test_each_architecture_serves_the_original_api(model_server, reference):
    arch, model_id, server = model_server
    ref = reference(arch)
    health = requests.get(server.url + "/health", timeout=30).json()
    assert health["model"] == model_id and health["context_length"] == CONTEXT[arch]

    answer = generate(server, {"text": {"plain": PROMPT}, "max_length": 40})
    assert answer["model"] == model_id
    assert texts(answer) == [ref.greedy(PROMPT, max_length=40)]
    assert answer["usage"]["total_tokens"] == 40 or answer["sentences"][0]["finish_reason"] == "stop"

    encoded = generate(server, {"text": {"in_64": b64(PROMPT)}, "max_length": 40})
    assert texts(encoded) == texts(answer)

    sampled = generate(server, {"text": {"plain": PROMPT}, "do_sample": True, "top_k": 10, "temperature": 0.7,
                                "max_length": 48, "num_return_sequences": 2})
    assert len(sampled["sentences"]) == 2 and all(t.startswith(PROMPT) for t in texts(sampled))


def test_each_architecture_refuses_beyond_its_context(model_server, reference):
    arch, _, server = model_server
    context = CONTEXT[arch]
    assert_error(post(server, {**GOOD, "max_length": context + 1}), 422, "max_length", str(context),
                 str(context + 1))
    prompt = "Hello world, here is a rather long prompt. " * 300
    prompt_tokens = reference(arch).tokens(prompt)
    assert prompt_tokens > context
    assert_error(post(server, {"text": {"plain": prompt}, "max_length": prompt_tokens + 5}), 422, "max_length",
                 str(context), str(prompt_tokens + 5))
    assert generate(server, {**GOOD, "max_length": 24})
