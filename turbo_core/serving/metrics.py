"""The server's Prometheus metrics: requests and errors, latency, tokens, and the scheduler's
state — KV bytes in use (summed over sequences), running and waiting sequences, decode batch
sizes, time to first token and inter-token latency."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from turbo_core.serving.scheduler import Hooks, Scheduler

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STEP = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 1, 2, 5, 10, 30)
_BATCH = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)


class ServerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("turbo_requests_total", "HTTP requests", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("turbo_request_errors_total", "requests answered with an error",
                              ["endpoint", "status"], registry=r)
        self.latency = Histogram("turbo_request_latency_seconds", "completion latency",
                                 registry=r, buckets=_LATENCY)
        self.tokens = Counter("turbo_generated_tokens_total", "generated tokens", registry=r)
        self.kv_bytes = Gauge("turbo_kv_cache_bytes", "KV cache bytes the open sequences occupy",
                              registry=r)
        self.kv_peak = Gauge("turbo_kv_cache_bytes_peak", "most KV cache bytes in use so far",
                             registry=r)
        self.running = Gauge("turbo_sequences_running", "sequences prefilling or decoding",
                             registry=r)
        self.waiting = Gauge("turbo_sequences_waiting", "requests waiting for admission",
                             registry=r)
        self.batch = Histogram("turbo_decode_batch_size", "sequences per decode step",
                               registry=r, buckets=_BATCH)
        self.ttft = Histogram("turbo_time_to_first_token_seconds", "submit to first token",
                              registry=r, buckets=_LATENCY)
        self.finish = Counter("turbo_requests_finished_total", "requests by finish reason",
                              ["reason"], registry=r)
        self.itl = Histogram("turbo_inter_token_latency_seconds", "time between tokens",
                             registry=r, buckets=_STEP)

    def bind(self, scheduler: Scheduler) -> None:
        self.kv_bytes.set_function(lambda: scheduler.kv_bytes)
        self.kv_peak.set_function(lambda: scheduler.kv_bytes_peak)
        self.running.set_function(lambda: scheduler.running)
        self.waiting.set_function(lambda: scheduler.waiting)

    def hooks(self) -> Hooks:
        return Hooks(batch=self.batch.observe, ttft=self.ttft.observe, itl=self.itl.observe,
                     finished=lambda reason: self.finish.labels(reason).inc())

    def count(self, path: str, status: int) -> None:
        self.requests.labels(path, str(status)).inc()
        if status >= 400:
            self.errors.labels(path, str(status)).inc()

    def finished(self, tokens: int, seconds: float) -> None:
        self.tokens.inc(tokens)
        self.latency.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
