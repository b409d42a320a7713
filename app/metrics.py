"""Prometheus metrics of the one worker process, served at `GET /metrics`.

Every name starts with `gpt_server_`; names and units follow what TGI and vLLM users already graph
(seconds, `_total` counters, per-request histograms). The registry belongs to the app, not to
prometheus-client's global default, so several apps in one process never collide.

The engine reports through the `EngineObserver` hooks (called on the engine thread: each hook is a
few counter increments, nothing that could slow a decoding step). Queue size, batch size and the
model's details are read live from the engine at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Blueprint, Response, current_app
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from app.engine.observer import EngineObserver
from app.openapi import Body, documented

if TYPE_CHECKING:
    from app.engine import Engine

PREFIX = "gpt_server_"

bp = Blueprint("metrics", __name__)

# Latency buckets in seconds, wide enough for a big model on a small CPU (minutes per request).
QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80, 160)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 120, 240, 480, 960, 1920)
FORWARD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)

# Label values known in advance are created at start, so that rate() sees a 0 before the first event.
REFUSAL_REASONS = ("queue_full", "queue_timeout", "unauthorized", "shutting_down")
OUTCOMES = ("finished", "cancelled", "failed")
FORWARD_METHODS = ("prefill", "decode")

# HTTP methods are chosen by clients: anything else is counted as "other" to keep labels bounded.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics(EngineObserver):
    """The app's metrics; an `EngineObserver` for the engine, plus hooks for the HTTP layer."""

    def __init__(self) -> None:
        # No `_created` series beside each counter and histogram: they double the output and nobody
        # graphs them (a process-wide switch of prometheus-client; this process serves only this app).
        disable_created_metrics()
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)

        self.http_requests = Counter(
            PREFIX + "http_requests", "HTTP requests answered, by route template, method and status.",
            ["method", "route", "status"], registry=registry)
        self.http_duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "Time from receiving an HTTP request to the end of its response (streams included).",
            ["method", "route"], buckets=HTTP_BUCKETS, registry=registry)

        self.queue_duration = Histogram(
            PREFIX + "request_queue_duration_seconds",
            "Time a generation request waited in the queue before joining the batch.",
            buckets=QUEUE_BUCKETS, registry=registry)
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from a request's submission to its first generated token.",
            buckets=TTFT_BUCKETS, registry=registry)
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence (one observation per generated token).",
            buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram(
            PREFIX + "request_duration_seconds",
            "End-to-end time of a generation request, from submission to its last token.",
            buckets=E2E_BUCKETS, registry=registry)
        self.forward = Histogram(
            PREFIX + "batch_forward_duration_seconds",
            "Time of one model step over the batch: a prefill of new prompts or a decoding step.",
            ["method"], buckets=FORWARD_BUCKETS, registry=registry)
        self.request_prompt_tokens = Histogram(
            PREFIX + "request_prompt_tokens", "Prompt length of finished requests, in tokens.",
            buckets=TOKEN_BUCKETS, registry=registry)
        self.request_generation_tokens = Histogram(
            PREFIX + "request_generation_tokens",
            "Tokens generated per finished request (all its sequences together).",
            buckets=TOKEN_BUCKETS, registry=registry)

        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens processed (prefilled).", registry=registry)
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated, over all sequences.", registry=registry)
        self.finished_requests = Counter(
            PREFIX + "requests_finished",
            "Generation requests that left the batch, by outcome: finished, cancelled (client went away) "
            "or failed.", ["outcome"], registry=registry)
        self.cancelled_requests = Counter(
            PREFIX + "requests_cancelled",
            "Generation requests dropped because their client went away (waiting or running).",
            registry=registry)
        self.refused_requests = Counter(
            PREFIX + "requests_refused",
            "Requests turned away, by reason: queue_full, queue_timeout, unauthorized (no or a wrong API key) "
            "or shutting_down.", ["reason"], registry=registry)

        for reason in REFUSAL_REASONS:
            self.refused_requests.labels(reason)
        for outcome in OUTCOMES:
            self.finished_requests.labels(outcome)
        for method in FORWARD_METHODS:
            self.forward.labels(method)
        self._prefill = self.forward.labels("prefill")
        self._decode = self.forward.labels("decode")

    def watch(self, engine: "Engine") -> None:
        """Read the engine's live figures (queue, batch, model) at each scrape."""
        self.registry.register(_EngineCollector(engine))

    # ---- HTTP layer -------------------------------------------------------------------------------

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in KNOWN_METHODS else "other"
        self.http_requests.labels(method, route, str(status)).inc()
        self.http_duration.labels(method, route).observe(seconds)

    def refused(self, reason: str) -> None:
        """A request was turned away (also called by the engine: queue_full, queue_timeout)."""
        self.refused_requests.labels(reason).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    # ---- engine hooks (engine thread) ----------------------------------------------------------

    def admitted(self, waited_seconds: float) -> None:
        self.queue_duration.observe(waited_seconds)

    def prefilled(self, requests: int, prompt_tokens: int, seconds: float) -> None:
        self._prefill.observe(seconds)
        self.prompt_tokens.inc(prompt_tokens)

    def first_token(self, seconds_since_submit: float) -> None:
        self.ttft.observe(seconds_since_submit)

    def decoded(self, rows: int, seconds: float) -> None:
        # Each of the `rows` sequences waited `seconds` for its token: one observation per token,
        # as vLLM counts it, so a big batch weighs as much as the tokens it produced.
        self._decode.observe(seconds)
        for _ in range(rows):
            self.itl.observe(seconds)

    def cancelled(self) -> None:
        self.cancelled_requests.inc()

    def finished(self, outcome: str, prompt_tokens: int, completion_tokens: int, seconds: float) -> None:
        self.finished_requests.labels(outcome).inc()
        self.e2e.observe(seconds)
        self.generation_tokens.inc(completion_tokens)
        if outcome == "finished":
            self.request_prompt_tokens.observe(prompt_tokens)
            self.request_generation_tokens.observe(completion_tokens)


class _EngineCollector(Collector):
    """Gauges read from the engine when Prometheus scrapes: nothing to keep in step by hand."""

    def __init__(self, engine: "Engine"):
        self.engine = engine

    def collect(self):
        engine = self.engine
        yield _gauge("queue_size", "Generation requests waiting for a place in the batch.", engine.queue_size)
        yield _gauge("queue_capacity", "Most requests allowed to wait (MAX_QUEUE).", engine.max_queue)
        yield _gauge("batch_size", "Sequences being generated in the running batch.", engine.batch_size)
        yield _gauge("batch_capacity", "Most sequences decoded together (MAX_BATCH_SIZE).", engine.max_batch_size)
        yield _gauge("ready", "1 when the model is loaded and the engine is serving, else 0.", int(engine.ready))
        loaded = engine.loaded
        if loaded is not None:
            yield _gauge("model_load_seconds", "Seconds it took to load the model at boot.", loaded.load_seconds)
            info = InfoMetricFamily(PREFIX + "model", "The model being served and where it runs.")
            info.add_metric([], {
                "model": loaded.model_id,
                "revision": loaded.revision,
                "device": str(loaded.device),
                "dtype": loaded.dtype_name,
                "context_length": str(loaded.context_length),
            })
            yield info


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


@bp.get("/metrics")
@documented(
    "Prometheus metrics", "operations", always_served=True,
    description="Every metric is prefixed `gpt_server_`; see the README's Production section.",
    responses={200: Body("metrics in Prometheus text format", media={"text/plain": {"type": "string"}})},
)
def metrics():
    body, content_type = current_app.extensions["metrics"].exposition()
    return Response(body, content_type=content_type)
