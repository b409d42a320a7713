"""`POST /v1/chat/completions` through the official openai client and LangChain's ChatOpenAI.

Most tests run the openai client in process (its HTTP client over the app's WSGI interface, on the
shared engine); the client libraries are also run against a real server once, over real HTTP.
"""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from app.api.chat_template import BASE_MODEL_TEMPLATE
from app.settings import SettingsError
from tests.conftest import inprocess_openai, inprocess_settings

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one?"},
]
# What the base-model template makes of CONVERSATION.
TRANSCRIPT = "You answer in one word.\n\nUser: Name a colour.\nAssistant: Blue.\nUser: Another one?\nAssistant:"


@pytest.fixture(scope="module")
def tokenizer(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models.folders["gpt2"])


def test_a_base_model_gets_a_plain_transcript_ending_with_the_assistant_turn(client, model, tokenizer):
    answer = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=3, temperature=0)
    assert answer.object == "chat.completion"
    assert answer.usage.prompt_tokens == len(tokenizer(TRANSCRIPT).input_ids)
    [choice] = answer.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")


def test_chat_runs_the_completion_path_and_stops_at_the_next_turn(client, model, api):
    """The same seeded sampling as /v1/completions on the transcript, with the next turn's marker as a stop."""
    chat = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=24, temperature=1.0,
                                          seed=11, n=2)
    completion = api.post("/v1/completions", json={
        "prompt": TRANSCRIPT, "max_tokens": 24, "temperature": 1.0, "seed": 11, "n": 2, "stop": ["\nUser:"]}).json
    assert [c.message.content for c in chat.choices] == [c["text"] for c in completion["choices"]]
    assert [c.finish_reason for c in chat.choices] == [c["finish_reason"] for c in completion["choices"]]
    assert chat.usage.model_dump(exclude_none=True) == completion["usage"]


def test_the_same_seed_gives_the_same_answers_and_n_gives_n(client, model):
    def ask():
        return client.chat.completions.create(model=model, messages=CONVERSATION, max_completion_tokens=12,
                                              temperature=1.0, top_p=0.9, seed=5, n=3, presence_penalty=0.5)

    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1  # three samples, not one repeated


def test_stop_strings_cut_the_answer(client, model):
    full = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=16, temperature=1.0,
                                          seed=3).choices[0].message.content
    stop = full[len(full) // 2:][:2]
    assert stop.strip(), full
    cut = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=16, temperature=1.0,
                                         seed=3, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.index(stop)]
    assert cut.finish_reason == "stop"


def test_streamed_answer_is_the_same_text_with_usage_last(client, model):
    kwargs = dict(model=model, messages=CONVERSATION, max_tokens=16, temperature=1.0, seed=7, n=2)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    texts, roles, reasons = ["", ""], set(), {}
    for chunk in chunks[:-1]:
        assert chunk.object == "chat.completion.chunk" and chunk.usage is None
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.add((choice.index, choice.delta.role))
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert texts == [c.message.content for c in whole.choices]
    assert roles == {(0, "assistant"), (1, "assistant")}
    assert reasons == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_logprobs_cover_every_generated_token(client, model):
    answer = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=3)
    [choice] = answer.choices
    entries = choice.logprobs.content
    assert len(entries) == answer.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-5)


def test_streamed_logprobs_match(client, model):
    kwargs = dict(model=model, messages=CONVERSATION, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [e for chunk in client.chat.completions.create(**kwargs, stream=True) for c in chunk.choices
                if c.logprobs for e in c.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]


@pytest.mark.parametrize("field, value, words", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}], "function calling"),
    ("functions", [{"name": "f", "parameters": {}}], "function calling"),
    ("tool_choice", "required", "function calling"),
    ("response_format", {"type": "json_object"}, "json_object"),
])
def test_what_cannot_be_honoured_is_refused_by_name(client, model, field, value, words):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=2, **{field: value})
    error = refused.value.body
    assert error["param"] == field and "not supported" in error["message"] and words in error["message"]


def test_plain_text_response_format_and_text_parts_are_accepted(client, model, tokenizer):
    messages = [{"role": "developer", "content": "You answer in one word."},
                {"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=2, temperature=0,
                                            response_format={"type": "text"})
    expected = "You answer in one word.\n\nUser: Name a colour.\nAssistant:"
    assert answer.usage.prompt_tokens == len(tokenizer(expected).input_ids)


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": 2**63}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 1000}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 4, "min_tokens": 5}, "min_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_values_are_400_in_openai_shape(api, body, param):
    response = api.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param) or param in error["message"]


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="not-this-one", messages=CONVERSATION, max_tokens=2)


def test_chat_template_setting_replaces_the_template(make_api, tmp_path, tokenizer):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<assistant>{% endif %}")
    client = inprocess_openai(make_api(CHAT_TEMPLATE=str(template)))
    answer = client.chat.completions.create(model=client.models.list().data[0].id, messages=CONVERSATION[:2],
                                            max_tokens=2, temperature=0)
    expected = "<system>You answer in one word.\n<user>Name a colour.\n<assistant>"
    assert answer.usage.prompt_tokens == len(tokenizer(expected).input_ids)


@pytest.mark.parametrize("content, words", [(None, "no such file"), ("{% for %}", "not a valid Jinja template")])
def test_a_bad_chat_template_stops_the_boot_naming_it(tiny_models, tmp_path, content, words):
    path = tmp_path / "chat.jinja"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SettingsError) as refused:
        inprocess_settings(tiny_models, CHAT_TEMPLATE=str(path))
    assert "CHAT_TEMPLATE" in str(refused.value) and words in str(refused.value)


def test_the_base_model_template_is_a_valid_transformers_template(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, chat_template=BASE_MODEL_TEMPLATE, tokenize=False,
                                         add_generation_prompt=True)
    assert text == TRANSCRIPT


# ---- real HTTP: the client libraries against gunicorn --------------------------------------------


def test_openai_client_over_http(gpt2_server):
    client = openai.OpenAI(base_url=gpt2_server.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    plain = client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=12, temperature=1.0,
                                           seed=9, n=2, stop=["\n\n"], logprobs=True, top_logprobs=1)
    assert len(plain.choices) == 2 and all(len(c.logprobs.content) >= 1 for c in plain.choices)
    streamed = ["", ""]
    for chunk in client.chat.completions.create(model=model, messages=CONVERSATION, max_tokens=12, temperature=1.0,
                                                seed=9, n=2, stop=["\n\n"], stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == [c.message.content for c in plain.choices]


def test_langchain_chat_openai_invokes_and_streams(gpt2_server):
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    model = openai.OpenAI(base_url=gpt2_server.url + "/v1", api_key="unused").models.list().data[0].id
    chat = ChatOpenAI(model=model, base_url=gpt2_server.url + "/v1", api_key="unused", max_tokens=10,
                      temperature=1.0, seed=4, max_retries=0)
    messages = [SystemMessage("You answer in one word."), HumanMessage("Name a colour.")]
    answer = chat.invoke(messages)
    assert isinstance(answer.content, str)
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    streamed = "".join(chunk.content for chunk in chat.stream(messages))
    assert streamed == answer.content
