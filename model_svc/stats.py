"""Request statistics and load bookkeeping of the model service (no Prometheus here).

* `RequestTimer`: one per generate() call; records time to first token, inter-token latencies
  (tokens that arrive together share the gap evenly) and end-to-end latency on a monotonic
  clock, and produces the `RequestStats` handed to the metrics hook.
* `MetricsHook`: what the engine calls, from the event loop, never raising into the request:
  `request_finished(RequestStats)` once per generate() call that reached the engine, and
  `feature_store_lookups(hits, misses)` per request that had hash-only items.
  `model_svc.metrics.ModelMetrics` implements it.
* `SchedulerView`: running / waiting requests and KV-cache usage from vLLM's scheduler stats,
  received by a `StatLoggerBase` passed to `AsyncLLM(stat_loggers=...)` (`stat_logger_factory`);
  as fresh as the engine's last step (the engine sends a final update when it goes idle).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from vlm.types import FinishReason


@dataclass(frozen=True)
class RequestStats:
    request_id: str
    finish_reason: FinishReason | None  # None: failed (see error)
    prompt_tokens: int
    cached_tokens: int
    generation_tokens: int
    time_to_first_token: float | None  # seconds; None if no token was generated
    inter_token_latencies: tuple[float, ...]
    e2e_latency: float
    error: str | None = None  # VlmError.reason of a failure


class MetricsHook(Protocol):
    def request_finished(self, stats: RequestStats) -> None: ...

    def feature_store_lookups(self, hits: int, misses: int) -> None: ...


class NullMetrics:
    def request_finished(self, stats: RequestStats) -> None:
        pass

    def feature_store_lookups(self, hits: int, misses: int) -> None:
        pass


class RequestTimer:
    """Per-request latency bookkeeping; `tokens(k)` per output that carried k new tokens."""

    __slots__ = ("_t0", "_first", "_last", "_itl")

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._first: float | None = None
        self._last = 0.0
        self._itl: list[float] = []

    def tokens(self, k: int) -> None:
        now = time.monotonic()
        if self._first is None:
            self._first = now
            self._itl.extend([0.0] * (k - 1))  # tokens that came with the first one
        else:
            self._itl.extend([(now - self._last) / k] * k)
        self._last = now

    def stats(
        self,
        request_id: str,
        *,
        finish_reason: FinishReason | None,
        prompt_tokens: int,
        cached_tokens: int,
        generation_tokens: int,
        error: str | None,
    ) -> RequestStats:
        return RequestStats(
            request_id=request_id,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            generation_tokens=generation_tokens,
            time_to_first_token=None if self._first is None else self._first - self._t0,
            inter_token_latencies=tuple(self._itl),
            e2e_latency=time.monotonic() - self._t0,
            error=error,
        )


class SchedulerView:
    """Latest scheduler stats per engine (data-parallel engines are summed)."""

    def __init__(self) -> None:
        self.by_engine: dict[int, tuple[int, int, float]] = {}

    def update(self, engine_idx: int, stats: Any) -> None:
        waiting = int(stats.num_waiting_reqs) + int(getattr(stats, "num_skipped_waiting_reqs", 0))
        self.by_engine[engine_idx] = (int(stats.num_running_reqs), waiting, float(stats.kv_cache_usage))

    def totals(self) -> tuple[int, int, float]:
        if not self.by_engine:
            return 0, 0, 0.0
        vals = list(self.by_engine.values())
        return (
            sum(v[0] for v in vals),
            sum(v[1] for v in vals),
            sum(v[2] for v in vals) / len(vals),
        )


def stat_logger_factory(view: SchedulerView) -> Any:
    """A vLLM `StatLoggerBase` class feeding `view` (pass it in `AsyncLLM(stat_loggers=[...])`)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _LoadLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):  # noqa: ANN001
            if scheduler_stats is not None:
                view.update(engine_idx, scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return _LoadLogger
