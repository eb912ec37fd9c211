"""Prometheus metrics of the preprocessor service (prefix `vlm_`, base units)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vlm.server import METRICS_PREFIX as P
from vlm.server import BaseMetrics

if TYPE_CHECKING:
    from preprocessor_svc.pool import PooledResult, Preprocessor
    from preprocessor_svc.replicas import ReplicaSet

_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0)


class _PoolCollector(Collector):
    """The worker pool's gauges and counters, read from `Preprocessor.stats()` at scrape time."""

    def __init__(self, preprocessor: Preprocessor) -> None:
        self._pre = preprocessor

    def collect(self) -> Iterator[Metric]:
        s = self._pre.stats()
        gauges = (
            ("preprocess_queue_depth", "Prompts waiting for a worker process.", s.queue_depth),
            ("preprocess_in_flight", "Prompts being processed by worker processes.", s.in_flight),
            ("preprocess_max_queue", "Prompts that may wait before RESOURCE_EXHAUSTED.", s.max_queue),
            ("preprocess_workers", "Worker processes configured.", s.workers),
            ("preprocess_workers_ready", "Worker processes ready (not restarting).", s.workers_ready),
            ("processor_cache_bytes", "Bytes held by the workers' processor caches.", s.cache_bytes),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{P}_{name}", doc, value=value)
        counters = (
            ("preprocess_requests", "Prompts submitted to the pool.", s.requests_total),
            ("preprocess_failures", "Prompts that failed in a worker (bad input included).", s.failed_total),
            ("preprocess_rejected", "Prompts refused because the queue was full.", s.rejected_total),
            ("preprocess_worker_restarts", "Worker processes restarted after dying or timing out.",
             s.worker_restarts_total),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(f"{P}_{name}", doc, value=value)


class _ReplicaCollector(Collector):
    """Per model replica (label `replica`: its address; bounded by the replica count)."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        replicas = self._replicas.replicas
        up = GaugeMetricFamily(f"{P}_gateway_replica_up",
                               "1 while the model replica is compatible and SERVING.", labels=["replica"])
        in_flight = GaugeMetricFamily(f"{P}_gateway_replica_in_flight",
                                      "Requests this gateway has in flight on the replica.", labels=["replica"])
        counters = {
            "requests": CounterMetricFamily(
                f"{P}_gateway_replica_requests", "Requests sent to the replica (retries included).",
                labels=["replica"]),
            "failovers": CounterMetricFamily(
                f"{P}_gateway_replica_failovers",
                "Requests that failed on the replica before their first token and were retried on another.",
                labels=["replica"]),
            "resends": CounterMetricFamily(
                f"{P}_gateway_replica_resends",
                "Items resent with their features after the replica answered MISSING_FEATURES.",
                labels=["replica"]),
            "affinity_hits": CounterMetricFamily(
                f"{P}_gateway_replica_affinity_hits",
                "Requests with media routed to the replica that was already sent their first item.",
                labels=["replica"]),
        }
        for r in replicas:
            up.add_metric([r.address], 1.0 if r.serving else 0.0)
            in_flight.add_metric([r.address], r.in_flight)
            for name, family in counters.items():
                family.add_metric([r.address], getattr(r.counters, name))
        yield up
        yield in_flight
        yield from counters.values()


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

    def bind(self, preprocessor: Preprocessor) -> None:
        """Export the pool's gauges and counters, read at scrape time."""
        self.bind_profile(preprocessor.profile)
        self.registry.register(_PoolCollector(preprocessor))

    def bind_replicas(self, replicas: ReplicaSet) -> None:
        """Export the gateway's per-replica gauges and counters, read at scrape time."""
        self.registry.register(_ReplicaCollector(replicas))

    def record(self, result: PooledResult) -> None:
        """Record one request's metrics."""
        m = result.metrics
        present = sorted(name for name, mm in m.modalities.items() if mm.items)
        self.preprocess_duration.labels("+".join(present) or "text").observe(
            result.queue_seconds + m.total_seconds + result.encode_seconds
        )
        for name, mm in m.modalities.items():
            if mm.items:
                self.items.labels(name).inc(mm.items)
            self.feature_bytes.inc(mm.feature_bytes)
        self.prompt_tokens.inc(m.prompt_tokens)
        self.cache_hits.inc(m.cache_hits)
        self.cache_misses.inc(m.cache_misses)
