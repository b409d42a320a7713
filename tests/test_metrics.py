"""`GET /metrics` over HTTP: what a Prometheus user graphs after some traffic (the real server with one
place in the batch and one in the queue, so that refusals and waits happen at will; it wants an API
key, which every request here sends)."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests import sse
from tests.conftest import ONE_AT_A_TIME_KEY

AUTH = {"Authorization": f"Bearer {ONE_AT_A_TIME_KEY}"}
GENERATE = {"text": {"plain": "Hello world"}, "max_new_tokens": 6}
# Long enough to be caught running: 8 sequences of 1000 tokens (seconds, even for the tiny model).
LONG = {"text": {"plain": "Hello"}, "max_new_tokens": 1000, "do_sample": True, "seed": 1, "num_return_sequences": 8}


def scrape(server, **kwargs) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}."""
    response = requests.get(server.url + "/metrics", timeout=30, headers=AUTH, **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain"), response.headers
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def server(one_at_a_time_server):
    # One sequence at a time and one waiting request: the queue and refusals can be produced at will.
    return one_at_a_time_server


def test_metrics_after_a_short_load(server):
    before = scrape(server)
    prompt_tokens = completion_tokens = requests_done = sequences = 0
    for body in (GENERATE, {**GENERATE, "do_sample": True, "num_return_sequences": 2, "seed": 3}):
        answer = requests.post(server.url + "/generate", json=body, headers=AUTH, timeout=60).json()
        prompt_tokens += answer["usage"]["prompt_tokens"]
        completion_tokens += answer["usage"]["completion_tokens"]
        requests_done += 1
        sequences += len(answer["sentences"])
    with requests.post(server.url + "/generate_stream", json=GENERATE, headers=AUTH, stream=True,
                       timeout=60) as response:
        events = sse.json_events(sse.chunks_of(response))
    prompt_tokens += events[-1]["usage"]["prompt_tokens"]
    completion_tokens += events[-1]["usage"]["completion_tokens"]
    requests_done += 1
    sequences += 1
    completion = requests.post(server.url + "/v1/completions", json={"prompt": "Hi there", "max_tokens": 5},
                               headers=AUTH, timeout=60).json()
    prompt_tokens += completion["usage"]["prompt_tokens"]
    completion_tokens += completion["usage"]["completion_tokens"]
    requests_done += 1
    sequences += 1
    assert requests.get(server.url + "/v1/models/no-such-model", headers=AUTH, timeout=30).status_code == 404
    assert requests.post(server.url + "/generate", json={"text": {}}, headers=AUTH, timeout=30).status_code == 422

    after = scrape(server)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # Tokens and requests, exactly as the answers reported them.
    assert delta("gpt_server_prompt_tokens_total") == prompt_tokens
    assert delta("gpt_server_generation_tokens_total") == completion_tokens
    assert delta("gpt_server_requests_finished_total", outcome="finished") == requests_done
    assert delta("gpt_server_request_generation_tokens_sum") == completion_tokens
    # One observation per request for the per-request histograms ...
    for histogram in ("gpt_server_request_queue_duration_seconds", "gpt_server_time_to_first_token_seconds",
                      "gpt_server_request_duration_seconds"):
        assert delta(histogram + "_count") == requests_done, histogram
        assert delta(histogram + "_sum") > 0, histogram
    # ... and one per token after each sequence's first for the inter-token latency.
    assert delta("gpt_server_inter_token_latency_seconds_count") == completion_tokens - sequences
    assert delta("gpt_server_batch_forward_duration_seconds_count", method="prefill") == requests_done

    # HTTP requests by route template (never the raw path) and status.
    assert delta("gpt_server_http_requests_total", method="POST", route="/generate", status=200) == 2
    assert delta("gpt_server_http_requests_total", method="POST", route="/generate", status=422) == 1
    assert delta("gpt_server_http_requests_total", method="POST", route="/generate_stream", status=200) == 1
    assert delta("gpt_server_http_requests_total", method="POST", route="/v1/completions", status=200) == 1
    assert delta("gpt_server_http_requests_total", method="GET", route="/v1/models/<path:model_id>",
                 status=404) == 1
    assert not any("no-such-model" in str(labels) for _, labels in after)
    assert delta("gpt_server_http_request_duration_seconds_count", method="POST", route="/generate") == 3

    # The model and the engine's state, read live.
    info = [dict(labels) for name, labels in after if name == "gpt_server_model_info"]
    assert info == [{"model": "test-org/tiny-gpt2", "revision": "main", "device": "cpu", "dtype": "float32",
                     "context_length": "1024"}]
    assert value(after, "gpt_server_model_load_seconds") > 0
    assert value(after, "gpt_server_ready") == 1
    assert value(after, "gpt_server_queue_size") == 0
    assert value(after, "gpt_server_batch_size") == 0
    assert value(after, "gpt_server_batch_capacity") == 1
    assert value(after, "gpt_server_queue_capacity") == 1
    # The process's own figures come along.
    assert value(after, "process_resident_memory_bytes") > 0


def test_queue_and_batch_gauges_and_refusals(server):
    """A running request fills the batch, the next one waits, the third is refused."""
    before = scrape(server)
    running = requests.post(server.url + "/generate_stream", json=LONG, headers=AUTH, stream=True, timeout=120)
    lines = running.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line).startswith("data: ")  # it is generating

    waiting_answer = {}
    waiting = threading.Thread(target=lambda: waiting_answer.update(
        r=requests.post(server.url + "/generate", json=GENERATE, headers=AUTH, timeout=120)))
    waiting.start()
    busy = wait_for(lambda: (s := scrape(server)) and value(s, "gpt_server_queue_size") == 1 and s,
                    "the second request to wait in the queue")
    assert value(busy, "gpt_server_batch_size") == 8  # admitted alone, all its sequences together

    refused = requests.post(server.url + "/generate", json=GENERATE, headers=AUTH, timeout=60)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"

    running.close()  # the client goes away: the running request is cancelled, the waiting one runs
    waiting.join(120)
    assert waiting_answer["r"].status_code == 200

    after = wait_for(lambda: (s := scrape(server)) and value(s, "gpt_server_requests_cancelled_total") >
                     value(before, "gpt_server_requests_cancelled_total") and s, "the cancellation to be counted")
    assert value(after, "gpt_server_requests_refused_total", reason="queue_full") - \
        value(before, "gpt_server_requests_refused_total", reason="queue_full") == 1
    assert value(after, "gpt_server_requests_finished_total", outcome="cancelled") - \
        value(before, "gpt_server_requests_finished_total", outcome="cancelled") == 1
    assert value(after, "gpt_server_queue_size") == 0
    assert value(after, "gpt_server_http_requests_total", method="POST", route="/generate", status="503") >= 1


def test_every_counter_is_there_before_any_request(make_live_api):
    """Labelled counters start at 0, so rate() and alerts work from the first scrape (of a fresh app)."""
    samples = scrape(make_live_api())
    for reason in ("queue_full", "queue_timeout", "unauthorized", "shutting_down"):
        assert ("gpt_server_requests_refused_total", (("reason", reason),)) in samples
    for outcome in ("finished", "cancelled", "failed"):
        assert ("gpt_server_requests_finished_total", (("outcome", outcome),)) in samples
    assert ("gpt_server_requests_cancelled_total", ()) in samples
    assert not any(name.endswith("_created") for name, _ in samples)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine reports the missing model
def test_two_apps_in_one_process_have_their_own_metrics():
    """The registry belongs to the app: building a second app (tests, app factories) does not collide."""
    from app.factory import create_app
    from app.settings import load_settings

    settings = load_settings(model_id="test-org/not-on-disk", torch_threads=1)
    first = create_app(settings, exit_on_load_failure=False)
    second = create_app(settings, exit_on_load_failure=False)
    assert first.extensions["metrics"].registry is not second.extensions["metrics"].registry
    for app in (first, second):
        app.extensions["engine"].join(60)
        body = app.test_client().get("/metrics")
        assert body.status_code == 200
        assert b"gpt_server_ready 0.0" in body.data
