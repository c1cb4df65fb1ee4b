"""The server's Prometheus metrics (GET /metrics) and its one log line per generation.

Each app has its own registry (several apps can live in one process, as in the tests).
Counters are cumulative since the server started; the prompt-cache hit rate is
edgelm_prompt_cached_tokens_total / edgelm_prompt_tokens_total."""

from __future__ import annotations

import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger("edgelm.server")

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, scheduler_stats):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("edgelm_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=r)
        self.generations = Counter("edgelm_generations", "Generations finished, by stop reason", ["reason"],
                                   registry=r)
        self.prompt_tokens = Counter("edgelm_prompt_tokens", "Prompt tokens of finished generations", registry=r)
        self.cached_tokens = Counter("edgelm_prompt_cached_tokens",
                                     "Prompt tokens whose KV was reused from an earlier request", registry=r)
        self.generated_tokens = Counter("edgelm_generated_tokens", "Tokens generated", registry=r)
        self.prefill_seconds = Counter("edgelm_prefill_seconds", "Time spent in prefill", registry=r)
        self.decode_seconds = Counter("edgelm_decode_seconds", "Time spent decoding", registry=r)
        self.ttft = Histogram("edgelm_ttft_seconds", "Time to first token, from the start of generation",
                              buckets=TTFT_BUCKETS, registry=r)
        self.embedded_tokens = Counter("edgelm_embedding_tokens", "Tokens read by /v1/embeddings", registry=r)
        q = Gauge("edgelm_queue_depth", "Requests waiting for the worker", registry=r)
        q.set_function(lambda: scheduler_stats()["queued"])
        run = Gauge("edgelm_running", "Generations running (0 or 1)", registry=r)
        run.set_function(lambda: 1.0 if scheduler_stats()["running"] else 0.0)
        idle = Gauge("edgelm_cached_prefix_sessions", "Finished sessions kept for prompt-prefix reuse", registry=r)
        idle.set_function(lambda: scheduler_stats()["idle_sessions"])
        kv = Gauge("edgelm_cached_prefix_bytes", "KV bytes the kept sessions hold (--prefix-cache-mib bounds it)",
                   registry=r)
        kv.set_function(lambda: scheduler_stats()["cached_prefix_bytes"])

    def job_done(self, job, stats) -> None:
        """A generation finished (called on the worker thread): count it and log one line."""
        cached = job.cached_tokens
        self.generations.labels(stats.stop_reason).inc()
        self.prompt_tokens.inc(len(job.ids))
        self.cached_tokens.inc(cached)
        self.generated_tokens.inc(stats.generated_tokens)
        self.prefill_seconds.inc(stats.prefill_seconds)
        self.decode_seconds.inc(stats.decode_seconds)
        if stats.generated_tokens:
            self.ttft.observe(stats.ttft_seconds)
        log.info("%s choice=%d prompt=%d cached=%d generated=%d ttft=%.3fs prefill=%.1ftok/s decode=%.1ftok/s "
                 "stop=%s", job.request_id or f"job-{job.id}", job.index, len(job.ids), cached,
                 stats.generated_tokens, stats.ttft_seconds, stats.prefill_tok_s, stats.decode_tok_s,
                 stats.stop_reason)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
