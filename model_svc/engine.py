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
  multimodal consistency and completes wrong requests silently), with reference layouts from
  the engine's own processor (`vlm.vllm_layout.ReferenceCache`; a never-seen media size is
  made on the "vlm-reference" thread first, everything else is cheap and runs inline);
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

Configuration (`model_svc.config`): vLLM's own `AsyncEngineArgs` plus this service's limits.
Request statistics and load (`model_svc.stats`): pass a `MetricsHook` (`EngineConfig.metrics`);
gauges (running / waiting / KV usage, feature-store items / bytes, health) are read with
`load()` and `healthy` when scraped.

The model facts (`profile`, a `vlm.profile.ModelProfile`) are derived at start-up by
`vlm.vllm_profile.build_profile` from the engine's own config and renderer — the same code the
preprocessor runs — and `model_info()` is `profile.model_info()`.

Process model: `AsyncLLM` always runs its engine core in a child process (spawned; scripts need
an `if __name__ == "__main__"` guard); with `VLLM_ENABLE_V1_MULTIPROCESSING=0` the model runs
inside that engine-core process (no extra worker process). `Engine.start` blocks the event loop
while vLLM starts (as vLLM's own server does) and then runs one tiny multimodal generation as a
warm-up, so the first real request does not pay one-time kernel initialisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vlm import vllm_errors
from vlm.errors import AlreadyExists, Internal, Unavailable, VlmError
from vlm.profile import ModelProfile
from vlm.types import Chunk, FinishReason, Load, ModelInfo, Prompt, Sampling, Usage
from vlm.vllm_mm import items_from_engine_input

from .config import EngineConfig, Limits
from .engine_input import PromptToEngineInput, SamplingToParams
from .feature_store import FeatureStore
from .output import OutputToChunk
from .stats import MetricsHook, NullMetrics, RequestTimer, SchedulerView, stat_logger_factory
from .validation import PromptValidator, References

log = logging.getLogger(__name__)

#: Seconds the engine core gets to tear down at close before it is killed (after the last stream).
ENGINE_SHUTDOWN_TIMEOUT_S = 1.0


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
        profile: ModelProfile,
        feature_store: FeatureStore,
        limits: Limits | None = None,
        sampling_defaults: Mapping[str, Any] | None = None,
        metrics: MetricsHook | None = None,
        scheduler_view: SchedulerView | None = None,
        references: References | None = None,
    ) -> None:
        self._llm = llm
        self._vllm_config = getattr(llm, "vllm_config", None)
        self._profile = profile
        self._info = profile.model_info()
        self._store = feature_store
        self._validator = PromptValidator(profile, limits, references=references)
        self._references = references
        # Reference layouts of never-seen sizes are made here, off the event loop.
        self._reference_pool = ThreadPoolExecutor(1, thread_name_prefix="vlm-reference")
        self._to_input = PromptToEngineInput()
        self._to_params = SamplingToParams(sampling_defaults, max_model_len=profile.max_model_len)
        self._metrics = metrics or NullMetrics()
        self._sched = scheduler_view or SchedulerView()
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

        from vlm.vllm_layout import ReferenceCache
        from vlm.vllm_profile import build_profile

        timings: dict[str, float] = {}
        t0 = time.monotonic()
        view = SchedulerView()
        llm = AsyncLLM.from_engine_args(engine_args, stat_loggers=[stat_logger_factory(view)])
        timings["engine"] = time.monotonic() - t0
        try:
            t1 = time.monotonic()
            renderer = llm.renderer
            join = getattr(renderer, "_join_mm_warmup", None)
            if join is not None:  # vLLM's background processor warm-up uses the same processor
                await asyncio.to_thread(join)
            profile, dummies = await asyncio.to_thread(
                build_profile, llm.vllm_config, renderer,
                model=engine_args.model, model_impl=engine_args.model_impl,
                revision=engine_args.revision,
            )
            timings["profile"] = time.monotonic() - t1
            encoder_budget = getattr(llm.input_processor, "mm_encoder_cache_size", 0) or None
            if limits.max_embeds_per_item is None and encoder_budget:
                limits = dataclasses.replace(limits, max_embeds_per_item=int(encoder_budget))
            processor = getattr(renderer, "mm_processor", None)
            engine = cls(
                llm,
                references=None if processor is None else ReferenceCache(
                    processor, llm.vllm_config.model_config.max_model_len),
                profile=profile,
                feature_store=FeatureStore(fs_bytes),
                limits=limits,
                sampling_defaults=llm.vllm_config.model_config.get_diff_sampling_param(),
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
                fingerprint=self._profile.fingerprint,
                token_ids=tuple(int(t) for t in dummy["prompt_token_ids"]),
                items=items_from_engine_input(dummy),
            )
        else:
            prompt = Prompt(self._profile.fingerprint, token_ids=(0, 1, 2, 3))
        params = SamplingParams(
            max_tokens=2, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA
        )
        async for _ in self._llm.generate(self._to_input(prompt), params, f"warmup-{uuid.uuid4().hex}"):
            pass

    # -- facts -----------------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        return self._info

    @property
    def profile(self) -> ModelProfile:
        return self._profile

    @property
    def vllm_config(self) -> Any:
        return self._vllm_config

    @property
    def feature_store(self) -> FeatureStore:
        return self._store

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

    async def _make_references(self, prompt: Prompt) -> None:
        """Reference layouts of never-seen media sizes, made on the reference thread (a
        processor run each) before the prompt is validated on the loop; the rest of validation
        is cheap and stays inline (a thread hop per request cost the pair about a third of its
        throughput at 4 concurrent requests, measured)."""
        refs = self._references
        if refs is None:
            return
        loop = asyncio.get_running_loop()
        for modality, size in self._validator.reference_sizes(prompt):
            if not refs.cached(modality, size):
                with contextlib.suppress(Exception):  # remembered; the validator reports it
                    await loop.run_in_executor(self._reference_pool, refs, modality, size)

    def _prepare(self, prompt: Prompt, sampling: Sampling) -> tuple[Any, Any]:
        """Validate, resolve hash-only items, convert. Raises vlm.errors."""
        self._validator.validate_prompt(prompt)
        self._validator.validate_sampling(sampling, len(prompt.token_ids))
        params = self._to_params(sampling, len(prompt.token_ids))
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
        timer = RequestTimer()
        to_chunk = OutputToChunk(
            request_id, prompt_tokens=len(prompt.token_ids), top_logprobs=sampling.logprobs
        )
        stream = None
        finish: FinishReason | None = None
        cached = 0
        error: str | None = None
        try:
            await self._make_references(prompt)
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
                if chunk.token_ids:
                    timer.tokens(len(chunk.token_ids))
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
            mapped = self._engine_error(e)
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
                    timer.stats(
                        request_id,
                        finish_reason=finish if error is None else None,
                        prompt_tokens=len(prompt.token_ids),
                        cached_tokens=cached,
                        generation_tokens=to_chunk.completion_tokens,
                        error=error,
                    ),
                )

    def _engine_error(self, e: Exception) -> VlmError:
        err = vllm_errors.translate(e, vllm_errors.GENERATION)
        if self.errored or isinstance(err, Unavailable):
            self._dead = True
            return Unavailable("the engine died; the service must be restarted")
        if err is None:
            log.exception("engine request failed")
            return Internal(f"the engine failed the request: {type(e).__name__}")
        return err

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
        # Requests are over: give the engine core a short window to tear down, then vLLM's
        # process manager kills it (its default waits 5 s for an idle CPU worker to notice).
        llm.shutdown(timeout=ENGINE_SHUTDOWN_TIMEOUT_S)
        # Drop vLLM's client now: its __del__ would otherwise shut down again at interpreter
        # exit, when the modules it needs are gone.
        del llm
        self._reference_pool.shutdown(wait=False, cancel_futures=True)


class _ClosedLLM:
    errored = True

    async def abort(self, request_id: Any, internal: bool = False) -> None:
        return None

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("engine closed")

    def shutdown(self, timeout: float | None = None) -> None:
        return None
