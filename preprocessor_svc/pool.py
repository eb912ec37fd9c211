"""The preprocessor's async facade: a pool of worker processes, each with its own vLLM renderer.

    pre = await Preprocessor.start(PreprocessorConfig(model="/models/llava", workers=4))
    prompt = await pre.preprocess(PromptInput(text="<image> What is this?", media=(img,)))
    await pre.close()

Each worker is a process started with `forkserver` (default; vLLM is imported once in the
fork server, which is a fresh single-threaded process) or `spawn` — never `fork`: torch and vLLM
are not fork-safe once this process has threads. Each worker builds its
`processing.Processor` once (vLLM config, tokenizer, HF processor, processor cache), processes a
dummy image, and then serves requests one at a time over a pipe. The event loop never runs CPU
work: requests wait (FIFO) for an idle worker, and a helper thread per busy worker does the
blocking pipe I/O. At most `max_queue` requests wait; beyond that `ResourceExhausted` is raised
at once. A worker that dies or exceeds `request_timeout_s` is replaced in the background; its
request fails with `Unavailable` (retryable).

`workers=0` runs one `Processor` in this process on a single thread (tests, debugging).

Tensors cross the pipe as raw bytes (dtype, shape, data), not through torch's shared-memory
pickling, so no file descriptors or shared segments outlive a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import dataclasses
import logging
import multiprocessing
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

import vlm.errors as errors
from preprocessor_svc.processing import (
    PreprocessMetrics,
    PreprocessorConfig,
    PreprocessResult,
    Processor,
)
from vlm.errors import Internal, ResourceExhausted, Unavailable, VlmError
from vlm.types import (
    FieldLayout,
    Fingerprint,
    Item,
    ItemField,
    Modality,
    ModelInfo,
    Placeholder,
    Prompt,
    PromptInput,
)

logger = logging.getLogger(__name__)

__all__ = ["Preprocessor", "PreprocessorConfig", "PreprocessResult", "PreprocessMetrics"]


# ---------------------------------------------------------------------------------------------
# Wire format between the parent and a worker process
# ---------------------------------------------------------------------------------------------


def _pack_tensor(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    t = t.detach().cpu().contiguous()
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), data


def _unpack_tensor(packed: tuple[str, tuple[int, ...], bytes]) -> torch.Tensor:
    dtype_name, shape, data = packed
    dtype = getattr(torch, dtype_name)
    if not data:
        return torch.empty(shape, dtype=dtype)
    # bytearray: the tensor owns writable memory (a view over `bytes` would be read-only).
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _pack_result(res: PreprocessResult) -> tuple:
    p = res.prompt
    items = tuple(
        (
            it.modality.value,
            it.hash,
            (it.placeholder.offset, it.placeholder.length, it.placeholder.is_embed),
            None
            if it.fields is None
            else tuple(
                (name, f.layout.value, f.flat_dim, f.keep_on_cpu, _pack_tensor(f.data))
                for name, f in it.fields.items()
            ),
        )
        for it in p.items
    )
    fp = (p.fingerprint.model_id, p.fingerprint.model_impl, p.fingerprint.config_hash)
    return (fp, p.token_ids, items, p.prompt_text), res.metrics


def _unpack_result(packed: tuple) -> PreprocessResult:
    (fp, token_ids, items, prompt_text), metrics = packed
    out_items = []
    for modality, h, (offset, length, is_embed), fields in items:
        out_fields = None
        if fields is not None:
            out_fields = {
                name: ItemField(_unpack_tensor(t), FieldLayout(layout), flat_dim, keep_on_cpu)
                for name, layout, flat_dim, keep_on_cpu, t in fields
            }
        out_items.append(Item(Modality(modality), h, Placeholder(offset, length, is_embed), out_fields))
    prompt = Prompt(Fingerprint(*fp), tuple(token_ids), tuple(out_items), prompt_text)
    return PreprocessResult(prompt, metrics)


def _error_payload(e: BaseException) -> tuple[str, str, str | None]:
    if isinstance(e, VlmError):
        return type(e).__name__, e.message, e.field
    return "Internal", f"{type(e).__name__}: {e}", None


def _rebuild_error(payload: tuple[str, str, str | None]) -> VlmError:
    name, message, field = payload
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, VlmError)) or name == "MissingFeatures":
        cls = Internal
    return cls(message, field=field)


# ---------------------------------------------------------------------------------------------
# Worker process
# ---------------------------------------------------------------------------------------------


def _worker_main(config: PreprocessorConfig, conn: Any, index: int) -> None:
    """Entry point of a worker process (spawned)."""
    try:
        # Workers are the unit of parallelism: split the cores between them instead of letting
        # each worker's torch use all of them (N workers x all-core thread pools oversubscribe).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, config.workers)))
        processor = Processor(config, worker=index)
        if config.warmup:
            processor.warmup()
        conn.send(("ready", processor.model_info(), processor.build_seconds))
    except BaseException as e:  # noqa: BLE001 - report any start-up failure to the parent
        logger.exception("preprocessor worker %d failed to start", index)
        with contextlib.suppress(Exception):
            conn.send(("failed", _error_payload(e)))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent gone
        if msg is None:
            return
        prompt, kwargs = msg
        try:
            out = ("ok", _pack_result(processor.process(prompt, kwargs)))
        except VlmError as e:
            out = ("error", _error_payload(e))
        except Exception as e:  # noqa: BLE001
            logger.exception("preprocessing failed in worker %d", index)
            out = ("error", _error_payload(e))
        try:
            conn.send(out)
        except (BrokenPipeError, OSError):
            return


class _WorkerLost(Exception):
    """The worker process died or was killed; it must be restarted."""


#: Imported once by the forkserver, so forked workers start without re-importing vLLM.
_FORKSERVER_PRELOAD = [
    "vllm",
    "vllm.engine.arg_utils",
    "vllm.renderers.registry",
    "preprocessor_svc.processing",
]


def _mp_context(method: str) -> Any:
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # The forkserver is a fresh single-threaded process (not a fork of this one); it
        # imports torch/vLLM once and forks each worker from that clean state. Has no effect
        # if this process's forkserver is already running.
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


class _ProcessWorker:
    def __init__(self, index: int, config: PreprocessorConfig) -> None:
        self.index = index
        self.config = config
        self._ctx = _mp_context(config.start_method)
        self._abort = threading.Event()
        self.proc: Any = None
        self.conn: Any = None
        self.restarts = 0

    def abort(self) -> None:
        """Make a start() in progress (e.g. a restart) give up; used by close()."""
        self._abort.set()

    def start(self) -> tuple[ModelInfo, float]:
        """Spawn and wait until the worker's processor is built (blocking)."""
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.config, child, self.index),
            name=f"vlm-preprocessor-{self.index}",
            daemon=True,
        )
        proc.start()
        child.close()
        deadline = time.monotonic() + self.config.startup_timeout_s
        try:
            while not parent.poll(0.25):
                if self._abort.is_set():
                    raise RuntimeError(f"preprocessor worker {self.index}: start-up aborted")
                if not proc.is_alive():
                    raise RuntimeError(
                        f"preprocessor worker {self.index} exited with code {proc.exitcode} "
                        "during start-up"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"preprocessor worker {self.index} did not start within "
                        f"{self.config.startup_timeout_s} s"
                    )
            msg = parent.recv()
        except BaseException:
            _kill(proc)
            parent.close()
            raise
        if msg[0] != "ready":
            _kill(proc)
            parent.close()
            err = _rebuild_error(msg[1])
            raise RuntimeError(f"preprocessor worker {self.index} failed to start: {err.message}")
        self.proc, self.conn = proc, parent
        return msg[1], msg[2]

    def call(self, prompt: PromptInput, kwargs: Mapping[str, Any] | None) -> PreprocessResult:
        """Run one request (blocking; called on a helper thread)."""
        timeout = self.config.request_timeout_s
        proc, conn = self.proc, self.conn  # stop() (close, timeout) may clear the attributes
        if proc is None or conn is None:
            raise _WorkerLost(f"worker {self.index} is not running")
        try:
            conn.send((prompt, dict(kwargs) if kwargs else None))
            deadline = None if timeout is None else time.monotonic() + timeout
            while not conn.poll(0.25):
                if not proc.is_alive():
                    raise _WorkerLost(f"worker {self.index} exited with code {proc.exitcode}")
                if deadline is not None and time.monotonic() > deadline:
                    self.stop(grace_s=0)
                    raise _WorkerLost(
                        f"processing took longer than {timeout} s; worker {self.index} was stopped"
                    )
            status, payload = conn.recv()
        except (EOFError, OSError, ValueError) as e:  # ValueError: a closed Connection
            raise _WorkerLost(f"lost the connection to worker {self.index}: {e}") from None
        if status == "ok":
            return _unpack_result(payload)
        raise _rebuild_error(payload)

    def stop(self, grace_s: float = 5.0) -> None:
        proc, conn = self.proc, self.conn
        if proc is None:
            return
        if grace_s > 0 and proc.is_alive():
            with contextlib.suppress(Exception):
                conn.send(None)
            proc.join(grace_s)
        _kill(proc)
        with contextlib.suppress(Exception):
            conn.close()
        self.proc = self.conn = None


def _kill(proc: Any) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(5)


class _InlineWorker:
    """workers=0: the processor lives in this process and runs on one helper thread."""

    index = -1
    restarts = 0

    def __init__(self, config: PreprocessorConfig) -> None:
        self.config = config
        self.processor: Processor | None = None

    def start(self) -> tuple[ModelInfo, float]:
        self.processor = Processor(self.config, worker=-1)
        if self.config.warmup:
            self.processor.warmup()
        return self.processor.model_info(), self.processor.build_seconds

    def call(self, prompt: PromptInput, kwargs: Mapping[str, Any] | None) -> PreprocessResult:
        assert self.processor is not None
        try:
            return self.processor.process(prompt, kwargs)
        except VlmError:
            raise
        except Exception as e:  # noqa: BLE001
            logger.exception("preprocessing failed")
            raise _rebuild_error(_error_payload(e)) from e

    def abort(self) -> None:
        pass

    def stop(self, grace_s: float = 0.0) -> None:
        if self.processor is not None:
            with contextlib.suppress(Exception):
                self.processor.renderer.shutdown()
        self.processor = None


# ---------------------------------------------------------------------------------------------
# The facade
# ---------------------------------------------------------------------------------------------


class Preprocessor:
    """Async preprocessing service core; create with `await Preprocessor.start(config)`."""

    def __init__(self, config: PreprocessorConfig) -> None:
        self.config = config
        self._workers: list[_ProcessWorker | _InlineWorker] = []
        self._idle: asyncio.Queue[Any] = asyncio.Queue()
        self._threads = ThreadPoolExecutor(
            max_workers=max(1, config.workers), thread_name_prefix="vlm-preprocessor-io"
        )
        self._info: ModelInfo | None = None
        self._closed = False
        self._restart_tasks: set[asyncio.Task[None]] = set()
        self._waiting = 0
        self._in_flight = 0
        self._restarting = 0
        self.build_seconds: list[float] = []
        self._counters = dict.fromkeys(
            (
                "requests_total",
                "succeeded_total",
                "failed_total",
                "rejected_total",
                "worker_restarts_total",
                "cache_hits_total",
                "cache_misses_total",
            ),
            0,
        )
        self._cache_bytes: dict[int, int] = {}

    @classmethod
    async def start(cls, config: PreprocessorConfig) -> Preprocessor:
        """Start the workers (in parallel) and wait until each has processed a dummy image."""
        self = cls(config)
        if config.workers == 0:
            self._workers = [_InlineWorker(config)]
        else:
            self._workers = [_ProcessWorker(i, config) for i in range(config.workers)]
        results = await asyncio.gather(
            *(asyncio.to_thread(w.start) for w in self._workers), return_exceptions=True
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await asyncio.to_thread(self._stop_all)
            self._threads.shutdown(wait=False)
            raise failures[0]
        self._info = results[0][0]
        self.build_seconds = [r[1] for r in results]
        for w in self._workers:
            self._idle.put_nowait(w)
        return self

    async def __aenter__(self) -> Preprocessor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- API -----------------------------------------------------------------------------------

    def model_info(self) -> ModelInfo:
        assert self._info is not None
        return self._info

    async def preprocess(
        self, prompt: PromptInput, processor_kwargs: Mapping[str, Any] | None = None
    ) -> Prompt:
        return (await self.preprocess_detailed(prompt, processor_kwargs)).prompt

    async def preprocess_detailed(
        self, prompt: PromptInput, processor_kwargs: Mapping[str, Any] | None = None
    ) -> PreprocessResult:
        """Preprocess one prompt; returns the Prompt with the metrics of this request.

        Raises the `vlm.errors` classes: InvalidArgument / InvalidMedia / LimitExceeded /
        PromptTooLong for bad requests, ResourceExhausted when the queue is full, Unavailable
        when closed or when the worker was lost mid-request (retry), Internal otherwise.
        """
        if self._closed:
            raise Unavailable("the preprocessor is shutting down")
        self._counters["requests_total"] += 1
        if self._idle.empty() and self._waiting >= self.config.max_queue:
            self._counters["rejected_total"] += 1
            raise ResourceExhausted(
                f"the preprocessing queue is full ({self._waiting} requests waiting for "
                f"{len(self._workers)} workers); retry later"
            )
        t0 = time.perf_counter()
        self._waiting += 1
        try:
            worker = await self._idle.get()
        finally:
            self._waiting -= 1
        if worker is None:  # woken by close()
            raise Unavailable("the preprocessor is shutting down")
        queue_s = time.perf_counter() - t0
        loop = asyncio.get_running_loop()
        self._in_flight += 1
        fut = loop.run_in_executor(self._threads, worker.call, prompt, processor_kwargs)
        fut.add_done_callback(partial(self._on_done, worker))
        try:
            result: PreprocessResult = await asyncio.shield(fut)
        except _WorkerLost as e:
            self._counters["failed_total"] += 1
            raise Unavailable(f"preprocessing worker lost: {e}; retry") from None
        except VlmError:
            self._counters["failed_total"] += 1
            raise
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable request
            self._counters["failed_total"] += 1
            logger.exception("preprocessing failed")
            raise Internal(f"preprocessing failed: {type(e).__name__}: {e}") from e
        self._counters["succeeded_total"] += 1
        m = result.metrics
        self._counters["cache_hits_total"] += m.cache_hits
        self._counters["cache_misses_total"] += m.cache_misses
        self._cache_bytes[worker.index] = m.cache_bytes
        return dataclasses.replace(result, metrics=dataclasses.replace(m, queue_seconds=queue_s))

    def stats(self) -> dict[str, Any]:
        """Gauges and counters for metrics (cumulative counters end in `_total`)."""
        return {
            "workers": len(self._workers),
            "workers_ready": len(self._workers) - self._restarting,
            "queue_depth": self._waiting,
            "in_flight": self._in_flight,
            "max_queue": self.config.max_queue,
            "cache_bytes": sum(self._cache_bytes.values()),
            **self._counters,
        }

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.abort()
        for task in list(self._restart_tasks):
            task.cancel()
        for _ in range(self._waiting):
            self._idle.put_nowait(None)
        await asyncio.to_thread(self._stop_all)
        self._threads.shutdown(wait=False, cancel_futures=True)

    # -- internals -----------------------------------------------------------------------------

    def _stop_all(self) -> None:
        for w in self._workers:
            with contextlib.suppress(Exception):
                w.stop()

    def _on_done(self, worker: Any, fut: asyncio.Future[Any]) -> None:
        self._in_flight -= 1
        if fut.cancelled():
            exc: BaseException | None = None
        else:
            exc = fut.exception()
        if isinstance(exc, _WorkerLost) and not self._closed:
            logger.warning("%s; restarting it", exc)
            self._restarting += 1
            task = asyncio.get_running_loop().create_task(self._restart(worker))
            self._restart_tasks.add(task)
            task.add_done_callback(self._restart_tasks.discard)
        elif not self._closed:
            self._idle.put_nowait(worker)

    async def _restart(self, worker: _ProcessWorker) -> None:
        delay = 1.0
        try:
            while not self._closed:
                await asyncio.to_thread(worker.stop, 0)
                try:
                    await asyncio.to_thread(worker.start)
                except Exception:  # noqa: BLE001
                    logger.exception("restarting preprocessor worker %d failed", worker.index)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 60.0)
                    continue
                worker.restarts += 1
                self._counters["worker_restarts_total"] += 1
                if self._closed:
                    await asyncio.to_thread(worker.stop)
                else:
                    self._idle.put_nowait(worker)
                return
        finally:
            self._restarting -= 1
