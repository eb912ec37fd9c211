"""The model service's engine: vLLM's `AsyncLLM` behind a small domain facade.

    engine = await Engine.start(EngineConfig(engine_args, feature_store_bytes=1 << 30))
    engine.model_info()                      # ModelInfo (static)
    engine.load()                            # Load (running, waiting, KV usage, feature store)
    async for chunk in engine.generate(request_id, prompt, sampling): ...
    await engine.abort(request_id)           # True if it was in flight
    engine.healthy / engine.errored
    await engine.close()

vLLM does the serving: paged attention, continuous batching, chunked prefill, the vision
encoder and the merge of its embeddings at the `is_embed` positions, M-RoPE (Qwen2-VL), prefix
caching and the encoder cache (both keyed by the items' content hashes). The facade adds:

* validation before the engine (`validation.PromptValidator`; vLLM itself checks none of the
  multimodal consistency and completes wrong requests silently);
* hash-only items resolved from the feature store (`feature_store.FeatureStore`);
* the domain ⇄ vLLM conversions (`engine_input.PromptToEngineInput`, `SamplingToParams`,
  `output.OutputToChunk`); the HF processor never runs per request;
* abort-on-cancel in ONE place: the try/finally in `generate` aborts the engine request (its KV
  blocks are freed at once) whenever the stream ends without a finish: the consumer stopped
  iterating (`aclose()`, garbage collection), its task was cancelled (gRPC client gone), or an
  error occurred. `abort()` makes vLLM finish the stream with an ABORT chunk;
* engine death (`EngineDeadError`, or vLLM reporting `errored`) → in-flight and new generate()
  calls raise `vlm.errors.Unavailable`, and `healthy` turns False for good (the server should
  report NOT_SERVING and be restarted);
* a duplicate in-flight request_id → `AlreadyExists`.

Engine arguments are vLLM's own `AsyncEngineArgs` (tensor-parallel size, dtype, max model len,
KV-cache bytes / GPU memory utilisation, enforce-eager, model_impl, --limit-mm-per-prompt, ...):
`add_engine_cli_args(parser)` adds vLLM's usual flags plus this service's, and
`EngineConfig.from_cli_args(args)` builds the config from the parsed namespace. One default
differs from vLLM: `mm_processor_cache_gb=0` — the model service always hands the engine full
features (hash-only items are resolved here), so vLLM's engine-side processor cache would only
hold a second copy of them.

Stats for metrics: pass a `MetricsHook` (`EngineConfig.metrics`). The engine calls, from the
event loop, never raising into the request:

* `request_finished(RequestStats)` once per generate() call that reached the engine: finish
  reason (None if it failed), prompt / cached / generated tokens, time to first token, the
  inter-token latencies (one per generated token after the first; tokens that arrive together
  share the gap evenly), end-to-end latency (all seconds, measured by this facade from the
  generate() call, monotonic clock) and an error reason code for failures;
* `feature_store_lookups(hits, misses)` per request that had hash-only items.

Gauges (running / waiting / KV usage, feature-store items / bytes, health) are read with
`load()` and `healthy` when scraped. Running/waiting/KV usage come from vLLM's scheduler stats,
received by a custom `StatLoggerBase` passed to `AsyncLLM(stat_loggers=...)`; they are as fresh
as the engine's last step (the engine sends a final update when it goes idle).

Process model: `AsyncLLM` always runs its engine core in a child process (spawned; scripts need
an `if __name__ == "__main__"` guard); with `VLLM_ENABLE_V1_MULTIPROCESSING=0` the model runs
inside that engine-core process (no extra worker process). `Engine.start` blocks the event loop
while vLLM starts (as vLLM's own server does) and then runs one tiny multimodal generation as a
warm-up, so the first real request does not pay one-time kernel initialisation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from vlm.errors import (
    AlreadyExists,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
    VlmError,
)
from vlm.fingerprint import compute_fingerprint
from vlm.types import (
    Chunk,
    FinishReason,
    Fingerprint,
    Load,
    ModalityInfo,
    ModelInfo,
    Prompt,
    Sampling,
    Usage,
)

from vlm.vllm_mm import items_from_engine_input

from .engine_input import PromptToEngineInput, SamplingToParams
from .feature_store import FeatureStore, FeatureStoreStats
from .output import OutputToChunk
from .validation import Limits, ModelSpec, PromptValidator, derive_model_spec

log = logging.getLogger(__name__)

DEFAULT_FEATURE_STORE_BYTES = 1 << 30


# ------------------------------------------------------------------------------- metrics hook


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


# ------------------------------------------------------------------------------- configuration


@dataclass
class EngineConfig:
    engine_args: Any  # vllm.engine.arg_utils.AsyncEngineArgs
    feature_store_bytes: int = DEFAULT_FEATURE_STORE_BYTES
    limits: Limits = field(default_factory=Limits)
    metrics: MetricsHook | None = None
    warmup: bool = True

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace, **overrides: Any) -> EngineConfig:
        from vllm.engine.arg_utils import AsyncEngineArgs

        engine_args = AsyncEngineArgs.from_cli_args(args)
        limits = Limits(
            max_feature_bytes_per_prompt=args.max_feature_bytes_per_prompt,
            check_fixed_shapes=not args.no_strict_field_shapes,
        )
        kwargs: dict[str, Any] = dict(
            engine_args=engine_args, feature_store_bytes=args.feature_store_bytes, limits=limits
        )
        kwargs.update(overrides)
        return cls(**kwargs)


def add_engine_cli_args(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """vLLM's engine flags (`AsyncEngineArgs.add_cli_args`) plus this service's.

    Without a parser, a vLLM `FlexibleArgumentParser` (which understands vLLM's JSON-valued and
    dotted flags) is created.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    if parser is None:
        parser = FlexibleArgumentParser(description="vLM model service engine")
    parser = AsyncEngineArgs.add_cli_args(parser)
    group = parser.add_argument_group("model service")
    group.add_argument(
        "--feature-store-bytes", type=int, default=DEFAULT_FEATURE_STORE_BYTES,
        help="Bytes of item features kept for hash-only items (LRU); 0 disables.",
    )
    group.add_argument(
        "--max-feature-bytes-per-prompt", type=int, default=None,
        help="Refuse prompts whose feature tensors exceed this many bytes.",
    )
    group.add_argument(
        "--no-strict-field-shapes", action="store_true",
        help="Do not enforce the feature dimensions found fixed at start-up.",
    )
    parser.set_defaults(mm_processor_cache_gb=0)
    return parser


# ------------------------------------------------------------------------------- load tracking


class _SchedulerView:
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


def _stat_logger_factory(view: _SchedulerView) -> Any:
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


# ------------------------------------------------------------------------------- the engine


@dataclass
class _InFlight:
    request_id: str
    started: bool = False  # handed to vLLM
    aborted: bool = False


class Engine:
    """See the module docstring. Create with `await Engine.start(config)`."""

    def __init__(
        self,
        llm: Any,
        *,
        spec: ModelSpec,
        model_info: ModelInfo,
        feature_store: FeatureStore,
        limits: Limits | None = None,
        sampling_defaults: Mapping[str, Any] | None = None,
        metrics: MetricsHook | None = None,
        scheduler_view: _SchedulerView | None = None,
    ) -> None:
        self._llm = llm
        self._vllm_config = getattr(llm, "vllm_config", None)
        self._spec = spec
        self._info = model_info
        self._store = feature_store
        self._validator = PromptValidator(spec, limits)
        self._to_input = PromptToEngineInput()
        self._to_params = SamplingToParams(sampling_defaults)
        self._metrics = metrics or NullMetrics()
        self._sched = scheduler_view or _SchedulerView()
        self._inflight: dict[str, _InFlight] = {}
        self._dead = False
        self._closed = False
        self.startup_seconds: dict[str, float] = {}

    # -- construction --------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        config: EngineConfig | Any,
        *,
        model_impl: str | None = None,
        feature_store_bytes: int | None = None,
        limits: Limits | None = None,
        metrics: MetricsHook | None = None,
        warmup: bool | None = None,
    ) -> Engine:
        """Start vLLM, probe the processor, warm up. `config` may also be bare AsyncEngineArgs."""
        if not isinstance(config, EngineConfig):
            config = EngineConfig(engine_args=config)
        engine_args = config.engine_args
        if model_impl is not None:
            engine_args = dataclasses.replace(engine_args, model_impl=model_impl)
        fs_bytes = config.feature_store_bytes if feature_store_bytes is None else feature_store_bytes
        limits = limits or config.limits
        metrics = metrics or config.metrics
        do_warmup = config.warmup if warmup is None else warmup

        from vllm.v1.engine.async_llm import AsyncLLM

        timings: dict[str, float] = {}
        t0 = time.monotonic()
        fingerprint = await asyncio.to_thread(
            compute_fingerprint, engine_args.model, engine_args.model_impl,
            revision=engine_args.revision,
        )
        view = _SchedulerView()
        llm = AsyncLLM.from_engine_args(engine_args, stat_loggers=[_stat_logger_factory(view)])
        timings["engine"] = time.monotonic() - t0
        try:
            t1 = time.monotonic()
            renderer = llm.renderer
            join = getattr(renderer, "_join_mm_warmup", None)
            if join is not None:  # vLLM's background processor warm-up uses the same processor
                await asyncio.to_thread(join)
            encoder_budget = getattr(llm.input_processor, "mm_encoder_cache_size", 0) or None
            spec, dummies = await asyncio.to_thread(
                derive_model_spec, llm.vllm_config, renderer, fingerprint,
                encoder_cache_size=encoder_budget,
            )
            timings["probe"] = time.monotonic() - t1
            model_config = llm.vllm_config.model_config
            info = _model_info(engine_args, spec, fingerprint, renderer, model_config, limits)
            engine = cls(
                llm,
                spec=spec,
                model_info=info,
                feature_store=FeatureStore(fs_bytes),
                limits=limits,
                sampling_defaults=model_config.get_diff_sampling_param(),
                metrics=metrics,
                scheduler_view=view,
            )
            if do_warmup:
                t2 = time.monotonic()
                await engine._warmup(dummies)
                timings["warmup"] = time.monotonic() - t2
        except BaseException:
            llm.shutdown()
            raise
        engine.startup_seconds = timings
        log.info("engine ready: %s", ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
        return engine

    async def _warmup(self, dummies: Mapping[Any, Any]) -> None:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        if dummies:
            dummy = next(iter(dummies.values()))
            prompt = Prompt(
                fingerprint=self._spec.fingerprint,
                token_ids=tuple(int(t) for t in dummy["prompt_token_ids"]),
                items=items_from_engine_input(dummy),
            )
        else:
            prompt = Prompt(self._spec.fingerprint, token_ids=(0, 1, 2, 3))
        params = SamplingParams(
            max_tokens=2, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        async for _ in self._llm.generate(self._to_input(prompt), params, f"warmup-{uuid.uuid4().hex}"):
            pass

    # -- facts -----------------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    @property
    def vllm_config(self) -> Any:
        return self._vllm_config

    @property
    def feature_store(self) -> FeatureStore:
        return self._store

    def feature_store_stats(self) -> FeatureStoreStats:
        return self._store.stats()

    def load(self) -> Load:
        running, waiting, kv = self._sched.totals()
        return Load(
            running=running,
            waiting=waiting,
            kv_cache_usage=kv,
            feature_store_items=len(self._store),
            feature_store_bytes=self._store.nbytes,
        )

    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def errored(self) -> bool:
        """True once the engine died (never after a clean close)."""
        if self._dead or self._closed:
            return self._dead
        try:
            dead = bool(self._llm.errored)
        except Exception:  # noqa: BLE001 - a broken client is a dead engine
            dead = True
        if dead:
            self._dead = True
        return dead

    @property
    def healthy(self) -> bool:
        return not self._closed and not self.errored

    # -- generation ------------------------------------------------------------------------------

    def _prepare(self, prompt: Prompt, sampling: Sampling) -> tuple[Any, Any]:
        """Validate, resolve hash-only items, convert. Raises vlm.errors."""
        self._validator.validate_prompt(prompt)
        self._validator.validate_sampling(sampling, len(prompt.token_ids))
        params = self._to_params(sampling)
        items = prompt.items
        if any(it.fields is None for it in items):
            hits0, misses0 = self._store.hits, self._store.misses
            try:
                items = self._store.resolve(items)
            finally:
                self._call_hook(
                    "feature_store_lookups", self._store.hits - hits0, self._store.misses - misses0
                )
            self._validator.validate_resolved(items)
        else:
            self._store.resolve(items)  # stores them for later hash-only requests
        resolved = dataclasses.replace(prompt, items=tuple(items))
        return self._to_input(resolved), params

    async def generate(
        self, request_id: str, prompt: Prompt, sampling: Sampling
    ) -> AsyncIterator[Chunk]:
        """Stream the generation of one prompt. Errors are vlm.errors, raised on iteration."""
        if request_id in self._inflight:
            raise AlreadyExists(f"request {request_id!r} is already in flight", field="request_id")
        if not self.healthy:
            raise Unavailable("the engine is not serving" if not self._closed else "shutting down")
        state = _InFlight(request_id)
        self._inflight[request_id] = state
        t0 = time.monotonic()
        to_chunk = OutputToChunk(
            request_id, prompt_tokens=len(prompt.token_ids), top_logprobs=sampling.logprobs
        )
        stream = None
        finish: FinishReason | None = None
        cached = 0
        first_token_at: float | None = None
        last_token_at: float | None = None
        itl: list[float] = []
        error: str | None = None
        try:
            engine_input, params = self._prepare(prompt, sampling)
            if state.aborted:  # aborted while being validated
                finish = FinishReason.ABORT
                yield Chunk(request_id, finish_reason=FinishReason.ABORT,
                            usage=Usage(len(prompt.token_ids), 0, 0))
                return
            state.started = True
            stream = self._llm.generate(engine_input, params, request_id)
            async for out in stream:
                chunk = to_chunk(out)
                now = time.monotonic()
                if chunk.token_ids:
                    k = len(chunk.token_ids)
                    if first_token_at is None or last_token_at is None:
                        first_token_at = now
                        itl.extend([0.0] * (k - 1))  # tokens that came with the first one
                    else:
                        itl.extend([(now - last_token_at) / k] * k)
                    last_token_at = now
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
                    cached = chunk.usage.cached_tokens if chunk.usage else 0
                if not OutputToChunk.is_empty(chunk):
                    yield chunk
                if state.aborted and finish is None:
                    await self._abort_engine(request_id)
        except VlmError as e:
            error = e.reason
            raise
        except Exception as e:
            mapped = self._map_engine_error(e)
            error = mapped.reason
            raise mapped from e
        finally:
            self._inflight.pop(request_id, None)
            if state.started and finish is None:
                # The ONE place where an unfinished engine request is aborted: consumer gone
                # (aclose / GC), task cancelled, or an error. Frees its KV blocks at once.
                if not self._dead:
                    await self._abort_engine(request_id)
                if error is None:
                    finish = FinishReason.ABORT  # cancelled by the consumer
            if stream is not None:
                with contextlib.suppress(BaseException):
                    await stream.aclose()
            if state.started:
                self._call_hook(
                    "request_finished",
                    RequestStats(
                        request_id=request_id,
                        finish_reason=finish if error is None else None,
                        prompt_tokens=len(prompt.token_ids),
                        cached_tokens=cached,
                        generation_tokens=to_chunk.completion_tokens,
                        time_to_first_token=None if first_token_at is None else first_token_at - t0,
                        inter_token_latencies=tuple(itl),
                        e2e_latency=time.monotonic() - t0,
                        error=error,
                    ),
                )

    def _map_engine_error(self, e: Exception) -> VlmError:
        from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(e, EngineDeadError) or self.errored:
            self._dead = True
            return Unavailable("the engine died; the service must be restarted")
        if isinstance(e, VLLMValidationError):
            param = getattr(e, "parameter", None)
            return InvalidArgument(str(e), field=f"sampling.{param}" if param else None)
        if isinstance(e, GracefulHTTPError):
            return ResourceExhausted(str(e) or type(e).__name__)
        if isinstance(e, VLLMClientError):
            return InvalidArgument(str(e))
        log.exception("engine request failed")
        return Internal(f"the engine failed the request: {type(e).__name__}")

    async def _abort_engine(self, request_id: str) -> None:
        try:
            await asyncio.shield(self._llm.abort(request_id))
        except asyncio.CancelledError:
            pass  # the shielded abort still runs
        except Exception:  # noqa: BLE001
            log.warning("aborting %s in the engine failed", request_id, exc_info=True)

    async def abort(self, request_id: str) -> bool:
        """Abort an in-flight request; its stream ends with an ABORT chunk. False if unknown."""
        state = self._inflight.get(request_id)
        if state is None:
            return False
        state.aborted = True
        if state.started and not self._dead:
            await self._abort_engine(request_id)
        return True

    def _call_hook(self, name: str, *args: Any) -> None:
        try:
            getattr(self._metrics, name)(*args)
        except Exception:  # noqa: BLE001 - metrics must never break a request
            log.warning("metrics hook %s failed", name, exc_info=True)

    # -- shutdown --------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ids = [rid for rid, st in self._inflight.items() if st.started]
        for st in self._inflight.values():
            st.aborted = True
        if ids and not self._dead:
            with contextlib.suppress(Exception):
                await self._llm.abort(ids)
        await asyncio.sleep(0)
        llm, self._llm = self._llm, _ClosedLLM()
        llm.shutdown()
        # Drop vLLM's client now: its __del__ would otherwise shut down again at interpreter
        # exit, when the modules it needs are gone.
        del llm


class _ClosedLLM:
    errored = True

    async def abort(self, request_id: Any, internal: bool = False) -> None:
        return None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine closed")

    def shutdown(self, timeout: float | None = None) -> None:
        return None


# ------------------------------------------------------------------------------- model info


def _eos_ids(renderer: Any, model_config: Any) -> tuple[int, ...]:
    ids: list[int] = []
    try:
        eos = renderer.get_eos_token_id()
    except Exception:  # noqa: BLE001
        eos = None
    if isinstance(eos, int):
        ids.append(eos)
    gen = model_config.try_get_generation_config() or {}
    extra = gen.get("eos_token_id")
    for t in extra if isinstance(extra, (list, tuple)) else [extra]:
        if isinstance(t, int) and t not in ids:
            ids.append(t)
    return tuple(ids)


def _model_info(
    engine_args: Any,
    spec: ModelSpec,
    fingerprint: Fingerprint,
    renderer: Any,
    model_config: Any,
    limits: Limits,
) -> ModelInfo:
    modalities = []
    for m, ms in spec.modalities.items():
        cap = limits.max_items_per_prompt.get(m, ms.max_items)
        modalities.append(
            ModalityInfo(
                modality=m,
                placeholder_token_ids=tuple(sorted(ms.placeholder_token_ids)),
                placeholder_text=ms.placeholder_text,
                max_items_per_prompt=min(ms.max_items, cap),
            )
        )
    return ModelInfo(
        model_id=fingerprint.model_id,
        fingerprint=fingerprint,
        max_model_len=spec.max_model_len,
        vocab_size=spec.vocab_size,
        eos_token_ids=_eos_ids(renderer, model_config),
        modalities=tuple(modalities),
    )
