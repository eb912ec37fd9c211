"""Prometheus metrics of the model service.

Names follow vLLM's own (`vllm:time_to_first_token_seconds` → `vlm_time_to_first_token_seconds`)
so vLLM dashboards carry over. Base units, `_total` counters, histograms for latencies, no
request IDs as labels.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vlm.server import METRICS_PREFIX as P
from vlm.server import BaseMetrics

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
                0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class ModelMetrics(BaseMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("model", registry)
        r = self.registry
        self.time_to_first_token = Histogram(
            f"{P}_time_to_first_token_seconds", "Time from request arrival to the first token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            f"{P}_inter_token_latency_seconds", "Time between consecutive output tokens.",
            buckets=_ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            f"{P}_e2e_request_latency_seconds", "Time from request arrival to its last token.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            f"{P}_prompt_tokens", "Prompt tokens processed (multimodal placeholders included).", registry=r)
        self.generation_tokens = Counter(
            f"{P}_generation_tokens", "Tokens generated.", registry=r)
        self.cached_prompt_tokens = Counter(
            f"{P}_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.", registry=r)
        self.request_success = Counter(
            f"{P}_request_success", "Finished requests, by finish reason.", ["finished_reason"], registry=r)
        self.num_requests_running = Gauge(
            f"{P}_num_requests_running", "Requests in the engine's running batch.", registry=r)
        self.num_requests_waiting = Gauge(
            f"{P}_num_requests_waiting", "Requests waiting to be scheduled.", registry=r)
        self.kv_cache_usage = Gauge(
            f"{P}_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", registry=r)
        self.feature_store_hits = Counter(
            f"{P}_feature_store_hits", "Hash-only items resolved from the feature store.", registry=r)
        self.feature_store_misses = Counter(
            f"{P}_feature_store_misses", "Hash-only items not held by the feature store.", registry=r)
        self.feature_store_bytes = Gauge(
            f"{P}_feature_store_bytes", "Bytes of item features held by the feature store.", registry=r)
        self.feature_store_items = Gauge(
            f"{P}_feature_store_items", "Items held by the feature store.", registry=r)
        self.engine_healthy = Gauge(
            f"{P}_engine_healthy", "1 while the engine is alive, 0 after it died.", registry=r)

    # -- model_svc.stats.MetricsHook ---------------------------------------------------------

    def request_finished(self, stats) -> None:
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_prompt_tokens.inc(stats.cached_tokens)
        self.generation_tokens.inc(stats.generation_tokens)
        if stats.time_to_first_token is not None:
            self.time_to_first_token.observe(stats.time_to_first_token)
        for gap in stats.inter_token_latencies:
            self.inter_token_latency.observe(gap)
        if stats.finish_reason is not None:
            self.e2e_request_latency.observe(stats.e2e_latency)
            self.request_success.labels(stats.finish_reason.value).inc()

    def feature_store_lookups(self, hits: int, misses: int) -> None:
        self.feature_store_hits.inc(hits)
        self.feature_store_misses.inc(misses)

    def bind(self, engine) -> None:
        """Read the load gauges from the live engine at scrape time."""
        self.bind_profile(engine.profile)
        self.num_requests_running.set_function(lambda: engine.load().running)
        self.num_requests_waiting.set_function(lambda: engine.load().waiting)
        self.kv_cache_usage.set_function(lambda: engine.load().kv_cache_usage)
        self.feature_store_bytes.set_function(lambda: engine.load().feature_store_bytes)
        self.feature_store_items.set_function(lambda: engine.load().feature_store_items)
        self.engine_healthy.set_function(lambda: 1.0 if engine.healthy else 0.0)
