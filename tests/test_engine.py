"""The continuous-batching engine, observed over HTTP.

Batched greedy output equals unbatched `model.generate`; per-request seeds repeat; stop strings
are cut; a full queue is refused at once; disconnected clients are dropped from the batch; a
failing step fails only the requests it concerns. The real server (`python -m app`) serves what
needs it: batching under gunicorn, disconnects, an engine whose death restarts the worker. Engine
settings (queue, batch limits) and injected faults are served by apps that `create_app` built in
process with an engine of their own. The engine's parts on their own (sampling maths, the batch
against unbatched runs for every architecture, the scheduler, the text filters) are tested in
process under tests/unit/.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import ROOT, batch_size, wait_until

PROMPTS = [
    "Hello",
    "Beautiful is better than ugly. Explicit is better than implicit.",
    "When Konrad Adenauer was elected chancellor in",
    "Simple is better than complex. Complex is better than complicated. Flat is better than nested.",
    "a",
]


def generate(url: str, prompt: str, **fields) -> dict:
    response = requests.post(url + "/generate", json={"text": {"plain": prompt}, **fields}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def stream(url: str, prompt: str, **fields) -> list[dict]:
    body = {"text": {"plain": prompt}, **fields}
    with requests.post(url + "/generate_stream", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith(b"data: ")]


def continuation(result: dict, prompt: str, index: int = 0) -> str:
    text = result["sentences"][index]["generated_text"]
    assert text.startswith(prompt)
    return text[len(prompt):]


class BatchWatcher:
    """Polls /health in the background and remembers the largest running batch it saw."""

    def __init__(self, url: str):
        self.url, self.largest, self._stop = url, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.largest = max(self.largest, requests.get(self.url + "/health", timeout=5).json()["batch_size"])
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()






def test_batched_greedy_equals_unbatched_generate(gpt2_server, tiny_models):
    """Prompts of different lengths decoded together give model.generate's tokens for each alone
    (every architecture is checked in process by tests/unit/test_engine_inline.py)."""
    server, arch = gpt2_server, "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.folders[arch])
    model = AutoModelForCausalLM.from_pretrained(tiny_models.folders[arch], dtype=torch.float32).eval()
    new_tokens = 40
    expected = {}
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        expected[prompt] = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    with BatchWatcher(server.url) as watcher, concurrent.futures.ThreadPoolExecutor(len(PROMPTS) * 2) as pool:
        # Each prompt twice, staggered, so requests join a batch that is already running.
        futures = {}
        for round_ in range(2):
            for prompt in PROMPTS:
                futures[pool.submit(generate, server.url, prompt, max_new_tokens=new_tokens)] = prompt
            time.sleep(0.05)
        results = [(futures[f], f.result()) for f in concurrent.futures.as_completed(futures)]
    assert watcher.largest >= 2, "the requests were never batched together"
    for prompt, result in results:
        assert continuation(result, prompt) == expected[prompt], prompt


def test_seeded_sampling_repeats_whatever_ran_before(gpt2_server):
    fields = dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, max_new_tokens=30, seed=1234)
    first = continuation(generate(gpt2_server.url, "Hello", **fields), "Hello")
    # Unrelated traffic in between, some of it concurrent with the repeat.
    generate(gpt2_server.url, "Explicit is better", do_sample=True, max_new_tokens=17)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(generate, gpt2_server.url, p, do_sample=True, max_new_tokens=25, top_k=0,
                             typical_p=0.9, repetition_penalty=1.3) for p in PROMPTS[:3]]
        again = pool.submit(generate, gpt2_server.url, "Hello", **fields)
        [f.result() for f in noise]
    assert continuation(again.result(), "Hello") == first
    other_seed = continuation(generate(gpt2_server.url, "Hello", **{**fields, "seed": 99}), "Hello")
    assert other_seed != first


def test_sequences_of_one_request_differ_and_repeat_with_seed(gpt2_server):
    fields = dict(do_sample=True, num_return_sequences=3, max_new_tokens=20, seed=7)
    one = generate(gpt2_server.url, "When", **fields)
    two = generate(gpt2_server.url, "When", **fields)
    texts = [s["generated_text"] for s in one["sentences"]]
    assert len(set(texts)) == 3
    assert texts == [s["generated_text"] for s in two["sentences"]]
    assert one["usage"]["completion_tokens"] == 60


def test_stop_string_is_cut_and_not_returned(gpt2_server):
    full = continuation(generate(gpt2_server.url, "Beautiful is", max_new_tokens=40), "Beautiful is")
    stop = full[10:13]
    cut = full[: full.index(stop)]
    result = generate(gpt2_server.url, "Beautiful is", max_new_tokens=40, stop=[stop, "never-appears"])
    assert continuation(result, "Beautiful is") == cut
    assert result["sentences"][0]["finish_reason"] == "stop"
    # Streaming releases exactly the same text: nothing of the stop string leaks out.
    events = stream(gpt2_server.url, "Beautiful is", max_new_tokens=40, stop=stop)
    assert "".join(e.get("text", "") for e in events if "index" in e) == cut
    assert events[-1]["finish_reasons"] == ["stop"]


def test_stream_matches_non_streamed_text_and_counts(gpt2_server):
    fields = dict(do_sample=True, seed=5, max_new_tokens=48, num_return_sequences=2)
    whole = generate(gpt2_server.url, "Flat is better than nested. 日本語", **fields)
    events = stream(gpt2_server.url, "Flat is better than nested. 日本語", **fields)
    for index in range(2):
        pieces = [e["text"] for e in events if e.get("index") == index]
        assert "".join(pieces) == continuation(whole, "Flat is better than nested. 日本語", index)
        assert [e["finish_reason"] for e in events if e.get("index") == index][-1] == "length"
    final = events[-1]
    assert final["done"] is True
    assert final["usage"] == whole["usage"]


def test_full_queue_is_refused_at_once(inprocess_server, tiny_models):
    server = inprocess_server(MODEL_ID=tiny_models.folders["gpt-neo"], MAX_BATCH_SIZE=1, MAX_QUEUE=1,
                              MAX_NEW_TOKENS=2000)
    long = dict(max_new_tokens=1500)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(generate, server.url, "Hello", **long)
        assert wait_until(lambda: batch_size(server.url) == 1)
        waiting = pool.submit(generate, server.url, "Hello", max_new_tokens=5)
        assert wait_until(lambda: requests.get(server.url + "/health").json()["queue_size"] == 1)
        started = time.monotonic()
        refused = requests.post(server.url + "/generate", json={"text": {"plain": "Hi"}}, timeout=30)
        refused_after = time.monotonic() - started
        assert refused.status_code == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "queue_full"
        assert "MAX_QUEUE" in refused.json()["error"]["message"]
        assert not running.done(), f"refusal took {refused_after:.2f} s: it waited for the running request"
        running.result(), waiting.result()


def test_request_waiting_too_long_is_refused(inprocess_server, tiny_models):
    server = inprocess_server(MODEL_ID=tiny_models.folders["gpt-neo"], MAX_BATCH_SIZE=1, QUEUE_TIMEOUT=0.5,
                              MAX_NEW_TOKENS=2000)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, server.url, "Hello", max_new_tokens=1500)
        assert wait_until(lambda: batch_size(server.url) == 1)
        late = requests.post(server.url + "/generate", json={"text": {"plain": "Hi"}}, timeout=60)
        assert late.status_code == 503
        assert late.json()["error"]["code"] == "queue_timeout"
        assert "Retry-After" in late.headers
        assert not running.done()
        running.result()


def test_batch_token_budget_is_enforced(inprocess_server):
    server = inprocess_server(MAX_BATCH_TOKENS=256)
    response = requests.post(server.url + "/generate", json={
        "text": {"plain": "Hello"}, "max_new_tokens": 100, "do_sample": True, "num_return_sequences": 3})
    assert response.status_code == 422
    assert "MAX_BATCH_TOKENS" in response.json()["error"]["message"]
    ok = requests.post(server.url + "/generate", json={"text": {"plain": "Hello"}, "max_new_tokens": 100})
    assert ok.status_code == 200


def test_disconnected_stream_leaves_the_batch(gpt2_server):
    body = {"text": {"plain": "Hello"}, "max_new_tokens": 900}
    response = requests.post(gpt2_server.url + "/generate_stream", json=body, stream=True, timeout=60)
    lines = response.iter_lines()
    next(line for line in lines if line.startswith(b"data: "))
    # (The first event may reach the client a moment before its row counts in the batch.)
    assert wait_until(lambda: batch_size(gpt2_server.url) == 1, timeout=5)
    response.close()
    assert wait_until(lambda: batch_size(gpt2_server.url) == 0, timeout=5)


def test_disconnected_plain_request_leaves_the_batch(gpt2_server):
    """A client that gives up on a non-streaming request is noticed while it waits in gunicorn."""
    body = json.dumps({"text": {"plain": "Hello"}, "max_new_tokens": 900}).encode()
    sock = socket.create_connection(("127.0.0.1", gpt2_server.port))
    sock.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert wait_until(lambda: batch_size(gpt2_server.url) == 1, timeout=10)
    sock.close()
    assert wait_until(lambda: batch_size(gpt2_server.url) == 0, timeout=5)
    assert generate(gpt2_server.url, "Still serving", max_new_tokens=5)["sentences"]


# The engine thread dies at 50 tokens; the worker exits to be replaced 3 s after that (not the server's
# 10 s): time enough for the checks of the dead engine's answers, which take milliseconds.
DYING = {"PYTHONPATH": f"{ROOT}:{ROOT / 'tests' / 'faults'}", "MAX_NEW_TOKENS": 2000, "FAULT_KILL_AT_LENGTH": 50,
         "FAULT_RESTART_AFTER_SECONDS": 3}


@pytest.fixture(scope="module", autouse=True)
def _boot_servers_early(boot_early):
    boot_early("test_dead_engine_makes_health_fail_then_the_worker_restarts", **DYING)


def _inprocess_fault_server(inprocess_server, **faults):
    """An in-process app with an engine of its own whose model fails as tests/faults describes."""
    server = inprocess_server(fresh=True, MAX_NEW_TOKENS=2000)
    server.inject_faults(**faults)
    return server


def test_failed_prefill_fails_only_its_request(inprocess_server, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.folders["gpt2"])
    poison = tokenizer(" Zebra").input_ids[-1]
    server = _inprocess_fault_server(inprocess_server, prompt_token=poison)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(generate, server.url, "Hello", max_new_tokens=600)
        assert wait_until(lambda: batch_size(server.url) == 1)
        failed = requests.post(server.url + "/generate", json={"text": {"plain": " Zebra Zebra Zebra"}})
        assert failed.status_code == 500
        assert "out of memory" in failed.json()["error"]["message"]
        assert running.result()["usage"]["completion_tokens"] == 600
    assert requests.get(server.url + "/health").status_code == 200


def test_failed_step_fails_its_batch_and_the_engine_goes_on(inprocess_server):
    server = _inprocess_fault_server(inprocess_server, at_length=300)
    failed = requests.post(server.url + "/generate", json={"text": {"plain": "Hello"}, "max_new_tokens": 400})
    assert failed.status_code == 500
    assert failed.json()["error"]["code"] == "generation_failed"
    assert batch_size(server.url) == 0
    assert generate(server.url, "Hello", max_new_tokens=50)["usage"]["completion_tokens"] == 50


def test_dead_engine_makes_health_fail_then_the_worker_restarts(start_server):
    server = start_server(shared=True, **DYING)
    response = requests.post(server.url + "/generate", json={"text": {"plain": "Hello"}, "max_new_tokens": 100})
    assert response.status_code == 503
    health = requests.get(server.url + "/health")
    assert health.status_code == 503
    assert health.json()["status"] == "failed"
    assert "killed" in health.json()["error"]
    refused = requests.post(server.url + "/generate", json={"text": {"plain": "Hello"}})
    assert refused.status_code == 503
    # Then the worker is replaced by a fresh one, which loads the model and serves again.
    assert wait_until(lambda: _health_status(server) == 200, timeout=120), server.log
    assert generate(server.url, "Hello", max_new_tokens=20)["usage"]["completion_tokens"] == 20


def _health_status(server) -> int | None:
    try:
        return requests.get(server.url + "/health", timeout=5).status_code
    except (requests.ConnectionError, requests.Timeout):  # the fresh worker is not listening yet
        return None
