"""Prometheus metrics of the preprocessor service (prefix `vlm_`, base units)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vlm.server import METRICS_PREFIX as P
from vlm.server import BaseMetrics

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0)


class PreprocessorMetrics(BaseMetrics):
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__("preprocessor", registry)
        r = self.registry
        self.preprocess_duration = Histogram(
            f"{P}_preprocess_duration_seconds",
            "Wall time to preprocess one prompt, by the modalities it contains "
            "(text, image, video, image+video, ...).",
            ["modality"], buckets=_DURATION_BUCKETS, registry=r)
        self.items = Counter(
            f"{P}_preprocess_items", "Multimodal items preprocessed, by modality.", ["modality"], registry=r)
        self.prompt_tokens = Counter(
            f"{P}_preprocess_prompt_tokens", "Prompt tokens produced (placeholders expanded).", registry=r)
        self.feature_bytes = Counter(
            f"{P}_preprocess_feature_bytes", "Bytes of item feature tensors produced.", registry=r)
        self.cache_hits = Counter(
            f"{P}_processor_cache_hits", "Items served from the processor cache.", registry=r)
        self.cache_misses = Counter(
            f"{P}_processor_cache_misses", "Items the processor had to process.", registry=r)
        self.queue_depth = Gauge(
            f"{P}_preprocess_queue_depth", "Prompts waiting for a worker process.", registry=r)
        self.in_flight = Gauge(
            f"{P}_preprocess_in_flight", "Prompts being processed by worker processes.", registry=r)

    def bind(self, preprocessor) -> None:
        """Read the queue gauges from the live preprocessor at scrape time."""
        self.queue_depth.set_function(lambda: preprocessor.stats()["queue_depth"])
        self.in_flight.set_function(lambda: preprocessor.stats()["in_flight"])

    def record(self, metrics) -> None:
        """Record one request's `processing.PreprocessMetrics`."""
        present = sorted(name for name, m in metrics.modalities.items() if m.items)
        self.preprocess_duration.labels("+".join(present) or "text").observe(
            metrics.queue_seconds + metrics.total_seconds
        )
        for name, m in metrics.modalities.items():
            if m.items:
                self.items.labels(name).inc(m.items)
            self.feature_bytes.inc(m.feature_bytes)
        self.prompt_tokens.inc(metrics.prompt_tokens)
        self.cache_hits.inc(metrics.cache_hits)
        self.cache_misses.inc(metrics.cache_misses)
