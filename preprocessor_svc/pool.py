"""The preprocessor's async facade: a pool of worker processes, each with its own vLLM renderer.

    pre = await Preprocessor.start(ProcessorConfig(model="/models/llava"), PoolConfig(workers=4))
    result = await pre.preprocess_detailed(PromptInput(text="<image> What is this?", media=(img,)))
    result.prompt            # convert.EncodedPrompt: the PreprocessedPrompt wire bytes, per item
    await pre.close()

Each worker is a process started with `forkserver` (default; vLLM is imported once in the
fork server, which is a fresh single-threaded process) or `spawn` — never `fork`: torch and vLLM
are not fork-safe once this process has threads. Each worker builds its
`processing.Processor` once (vLLM config, tokenizer, HF processor, processor cache, model
profile), processes a dummy image, and then serves requests in order over a pipe. The event
loop never runs CPU work: a request goes to the least-loaded worker with room (each holds up to
`worker_depth` requests, so the next is already in its pipe when it finishes one) or waits
(FIFO). The event loop serves the pipes itself, non-blocking, with no helper thread: measured
with helper threads, each request's hand-offs waited for the GIL behind the event loop's gRPC
work, and a worker idled for milliseconds between requests. At most `max_queue` requests wait; beyond that
`ResourceExhausted` is raised at once. A worker that dies or exceeds `request_timeout_s` is
replaced in the background; its request fails with `Unavailable` (retryable).

One wire format: a worker encodes its result into the bytes that go on the wire
(`convert.encode_prompt`) before handing it over, and this process converts no tensor. The pipe
carries a small pickled header; the items' bytes go through shared memory (`_ReplySlots`, one
slot per request a worker may hold, `reply_slot_bytes` each), or, when they do not fit or
shared memory is off, through the pipe as raw messages after the header. Errors cross the
pipe as the `vlm.errors` exceptions themselves (they pickle with every attribute).

`workers=0` runs one `Processor` in this process on a single thread (tests, debugging), through
the same encode step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import mmap
import multiprocessing
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing import reduction
from typing import Any

import torch

from preprocessor_svc.media import media_with_paths
from preprocessor_svc.processing import PreprocessMetrics, Processor, ProcessorConfig
from vlm.convert import EncodedItem, EncodedPrompt, encode_prompt
from vlm.errors import Internal, ResourceExhausted, Unavailable, VlmError
from vlm.profile import ModelProfile
from vlm.process import freeze_gc_heap
from vlm.types import ModelInfo, Prompt, PromptInput

logger = logging.getLogger(__name__)

__all__ = ["PoolConfig", "PoolStats", "PooledResult", "Preprocessor"]


@dataclass(frozen=True)
class PoolConfig:
    """How requests are spread over worker processes."""

    #: Worker processes; 0 = process in this process, on one thread (tests, debugging).
    workers: int = 1
    #: Requests allowed to wait for a worker; beyond that, ResourceExhausted.
    max_queue: int = 64
    #: Torch intra-op threads per worker process. Workers are the unit of parallelism: one
    #: thread each leaves the cores to the other workers, the event loop and (on a shared host)
    #: the engine; measured on 2 cores, 2 threads per worker were slower, not faster.
    torch_threads: int = 1
    #: Requests handed to each worker process at once. With 2 (the default), a worker's next
    #: request is already in its pipe when it finishes one, so it does not idle while this
    #: process reads the result and sends more: `vlm bench preprocess` measured +13-17% images/s
    #: with 1 worker, and through the gateway (`vlm bench model`, 5 rounds each) the pair's TTFT
    #: stayed below `vllm serve`'s. Least-loaded dispatch fills idle workers first, so a second
    #: request waits behind a first only when every worker is busy. 1 hands a request only to an
    #: idle worker. The deadline below counts from the request's turn.
    worker_depth: int = 2
    #: Shared memory per request a worker holds, for the items' bytes of its reply (Linux
    #: memfd, mapped by this process and the worker; pages are used only as far as replies
    #: reach). Moving a reply through it instead of the pipe: measured 0.2-0.4 ms of CPU
    #: instead of 1.7-2.2 ms for 680 KB (a 1024x768 LLaVA image), 1.1 instead of 6.5 ms for
    #: 4.7 MB (Qwen2-VL). A reply that does not fit goes through the pipe. 0: always the pipe.
    reply_slot_bytes: int = 32 << 20
    #: Per-request processing deadline in a worker process (the worker is restarted after it).
    request_timeout_s: float | None = 120.0
    startup_timeout_s: float = 600.0
    #: How worker processes start: "forkserver" (vLLM imported once, workers forked from a
    #: clean single-threaded server; fast starts and restarts) or "spawn". Never "fork".
    start_method: str = "forkserver"

    def __post_init__(self) -> None:
        if self.start_method not in ("forkserver", "spawn"):
            raise ValueError("start_method must be 'forkserver' or 'spawn'")
        if self.workers < 0:
            raise ValueError("workers must be >= 0")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        if self.torch_threads < 1:
            raise ValueError("torch_threads must be >= 1")
        if self.worker_depth < 1:
            raise ValueError("worker_depth must be >= 1")
        if self.reply_slot_bytes < 0:
            raise ValueError("reply_slot_bytes must be >= 0")


@dataclass(frozen=True)
class PooledResult:
    prompt: EncodedPrompt
    metrics: PreprocessMetrics
    #: Worker time spent encoding the wire form (after `metrics.total_seconds`).
    encode_seconds: float
    #: Time waiting for a worker.
    queue_seconds: float
    #: Which worker ran it (index; -1 in-process).
    worker: int


@dataclass(frozen=True)
class PoolStats:
    """Gauges and cumulative counters (`*_total`) of the pool, for metrics."""

    workers: int
    workers_ready: int
    queue_depth: int
    in_flight: int
    max_queue: int
    cache_bytes: int
    requests_total: int
    succeeded_total: int
    failed_total: int
    rejected_total: int
    worker_restarts_total: int


def _run(processor: Processor, prompt: PromptInput, kwargs: Mapping[str, Any] | None) -> tuple:
    """Process one request and encode it: (EncodedPrompt, PreprocessMetrics, encode seconds)."""
    result = processor.process(prompt, kwargs, copy=False)  # encoded at once: one copy
    t0 = time.perf_counter()
    encoded = encode_prompt(result.prompt)
    return encoded, result.metrics, time.perf_counter() - t0


def _as_vlm_error(e: BaseException) -> VlmError:
    if isinstance(e, VlmError):
        return e
    return Internal(f"preprocessing failed: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# Worker process
# ---------------------------------------------------------------------------------------------


def _worker_main(
    config: ProcessorConfig, threads: int, conn: Any, index: int, slots: _ReplySlots | None
) -> None:
    """Entry point of a worker process."""
    try:
        # Workers are the unit of parallelism: split the cores between them instead of letting
        # each worker's torch use all of them (N workers x all-core thread pools oversubscribe).
        torch.set_num_threads(threads)
        processor = Processor(config)
        if config.warmup:
            processor.warmup()
        freeze_gc_heap()
        conn.send(("ready", processor.profile, processor.build_seconds))
    except BaseException as e:  # noqa: BLE001 - report any start-up failure to the parent
        logger.exception("preprocessor worker %d failed to start", index)
        with contextlib.suppress(Exception):
            conn.send(("failed", _as_vlm_error(e)))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # parent gone
        if msg is None:
            return
        prompt, kwargs, slot = msg
        try:
            encoded, metrics, encode_s = _run(processor, prompt, kwargs)
        except Exception as e:  # noqa: BLE001
            if not isinstance(e, VlmError):
                logger.exception("preprocessing failed in worker %d", index)
            reply, blobs = ("error", _as_vlm_error(e)), []
        else:
            # The items' bytes go into the request's shared-memory slot, or else follow the
            # pickled header as raw messages (send_bytes writes a large buffer as it is;
            # pickling would copy it first).
            header = (encoded.head, [(it.hash, it.bare) for it in encoded.items], metrics, encode_s)
            blobs = [it.full for it in encoded.items]
            lengths = None
            if slots is not None and slot is not None:
                lengths = slots.write(slot, blobs)
            reply = ("ok", header, lengths)
            if lengths is not None:
                blobs = []
        try:
            conn.send(reply)
            for blob in blobs:
                conn.send_bytes(blob)
        except (BrokenPipeError, OSError):
            return


class _ReplySlots:
    """Shared memory for one worker's replies: `count` slots of `size` bytes in one anonymous
    memfd, mapped by this process and by the worker.

    This process owns the slots: it hands a free slot to the worker with each request, reads
    the reply's items out of it (one copy, into the bytes that go on the wire) when the header
    arrives on the pipe, and only then frees it; so the worker never writes a slot this process
    is reading. The memfd has no name (nothing to guess, leak or clean up in /dev/shm) and is
    freed with the last mapping, also when the worker dies. The worker gets it at start,
    pickled the way multiprocessing passes a `Connection` (a duplicated descriptor).
    """

    def __init__(self, count: int, size: int, fd: int) -> None:
        self.count, self.size = count, size
        self.map = mmap.mmap(fd, count * size)
        self._fd: int | None = fd

    @classmethod
    def create(cls, count: int, size: int) -> _ReplySlots | None:
        """None where there is no memfd (not Linux, or refused, e.g. by a seccomp profile):
        replies then go through the pipe."""
        if count < 1 or size < 1 or not hasattr(os, "memfd_create"):
            return None
        fd = -1
        try:
            fd = os.memfd_create("vlm-preprocessor-replies", os.MFD_CLOEXEC)
            os.ftruncate(fd, count * size)
            return cls(count, size, fd)
        except BaseException as e:
            if fd >= 0:
                os.close(fd)
            if not isinstance(e, OSError):
                raise
            logger.warning("no shared memory for worker replies (%s); they go through the pipe", e)
            return None

    def __reduce__(self) -> tuple:
        if self._fd is None:
            raise RuntimeError("reply slots can only be handed to a worker while it starts")
        return _attach_slots, (reduction.DupFd(self._fd), self.count, self.size)

    def close_fd(self) -> None:
        """Drop the descriptor once the worker has its own (the mapping stays)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self.close_fd()
        self.map.close()

    def write(self, slot: int, blobs: list[bytes]) -> list[int] | None:
        """Worker: copy `blobs` into `slot`; their lengths, or None when they do not fit."""
        if sum(len(b) for b in blobs) > self.size:
            return None
        off = slot * self.size
        for b in blobs:
            self.map[off:off + len(b)] = b
            off += len(b)
        return [len(b) for b in blobs]

    def read(self, slot: int, lengths: list[int]) -> list[bytes]:
        """This process: the blobs the worker wrote into `slot` (checked against its bounds)."""
        if not (0 <= slot < self.count and all(n >= 0 for n in lengths) and sum(lengths) <= self.size):
            raise ValueError(f"reply out of bounds: slot {slot}, lengths {lengths}")
        out, off = [], slot * self.size
        for n in lengths:
            out.append(self.map[off:off + n])  # slicing an mmap copies into a bytes object
            off += n
        return out


def _attach_slots(dup: Any, count: int, size: int) -> _ReplySlots:
    """In the worker: map the slots from the duplicated descriptor, then close it."""
    fd = dup.detach()
    try:
        return _ReplySlots(count, size, fd)
    finally:
        os.close(fd)


class _WorkerLost(Exception):
    """The worker process died or was killed; it must be restarted."""


#: Imported once by the forkserver, so forked workers start without re-importing vLLM.
_FORKSERVER_PRELOAD = [
    "vllm",
    "vllm.engine.arg_utils",
    "vllm.renderers.registry",
    "preprocessor_svc.processing",
    "vlm.convert",
    "vlm.vllm_profile",
]


def _mp_context(method: str) -> Any:
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # The forkserver is a fresh single-threaded process (not a fork of this one); it
        # imports torch/vLLM once and forks each worker from that clean state. Has no effect
        # if this process's forkserver is already running.
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
    return ctx


def _frame(payload: bytes) -> bytes:
    """`payload` framed as `multiprocessing.connection.Connection` frames it (what the worker's
    `conn.recv()` reads)."""
    n = len(payload)
    head = struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n)
    return head + payload


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytearray:
    """`n` bytes from a non-blocking socket, received in place (one copy out of the kernel)."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


async def _recv_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytearray:
    """One frame written by the worker's `Connection.send` / `send_bytes`."""
    (n,) = struct.unpack("!i", await _recv_exactly(loop, sock, 4))
    if n == -1:
        (n,) = struct.unpack("!Q", await _recv_exactly(loop, sock, 8))
    return await _recv_exactly(loop, sock, n)


class _ProcessWorker:
    """One worker process and this process's end of its pipe.

    The pipe is served on the event loop, without helper threads: requests are written in
    ticket order (under `_send_lock`) and one reader task per process reads the replies, which
    come back in the same order, and resolves the oldest waiting call with each. A watchdog
    task stops the process when the request at the head of the line has been its for longer
    than `request_timeout_s`, or when the process has died without closing the pipe; either
    way every call it still owes fails with `_WorkerLost`.
    """

    def __init__(self, index: int, config: ProcessorConfig, pool: PoolConfig) -> None:
        self.index = index
        self.config = config
        self.pool = pool
        self._ctx = _mp_context(pool.start_method)
        self._abort = threading.Event()
        self.proc: Any = None
        #: This end of the pipe (non-blocking), from start() until stop() closes it.
        self._sock: socket.socket | None = None
        self.depth = pool.worker_depth
        #: Bumped at each start: calls of an earlier process fail instead of reading this one's.
        self.generation = 0
        #: Calls awaiting a reply from the current process, in the order they were sent, each
        #: with the reply slot it was given (None: its reply comes through the pipe).
        self._pending: collections.deque[tuple[asyncio.Future[tuple], int | None]] = collections.deque()
        #: The current process's reply slots (None: the pipe only) and those not in use.
        self._slots: _ReplySlots | None = None
        self._free_slots: list[int] = []
        #: When the call at the head of `_pending` became the worker's (monotonic).
        self._turn_since = 0.0
        self._head_changed = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        #: Why the current process was lost (set by `_lose`); from then on nothing is sent.
        self._lost_reason: str | None = None

    def abort(self) -> None:
        """Make a start() in progress (e.g. a restart) give up; used by close()."""
        self._abort.set()

    def _spawn(self) -> tuple[Any, Any, _ReplySlots | None, ModelProfile, float]:
        """Start the process and wait until its processor is built (blocking; on a thread)."""
        slots = _ReplySlots.create(self.depth, self.pool.reply_slot_bytes)
        try:
            proc, parent, profile, build_s = self._start_process(slots)
        except BaseException:
            if slots is not None:
                slots.close()
            raise
        return proc, parent, slots, profile, build_s

    def _start_process(self, slots: _ReplySlots | None) -> tuple[Any, Any, ModelProfile, float]:
        """`_spawn` without the reply slots' lifetime: the process, this end of its pipe, and
        what it reported once ready."""
        parent, child = self._ctx.Pipe(duplex=True)
        threads = self.pool.torch_threads
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.config, threads, child, self.index, slots),
            name=f"vlm-preprocessor-{self.index}",
            daemon=True,
        )
        try:
            proc.start()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        if slots is not None:
            slots.close_fd()
        deadline = time.monotonic() + self.pool.startup_timeout_s
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
                        f"{self.pool.startup_timeout_s} s"
                    )
            msg = parent.recv()
        except BaseException:
            _kill(proc)
            parent.close()
            raise
        if msg[0] != "ready":
            _kill(proc)
            parent.close()
            raise RuntimeError(f"preprocessor worker {self.index} failed to start: {msg[1].message}")
        return proc, parent, msg[1], msg[2]

    async def start(self) -> tuple[ModelProfile, float]:
        """Spawn the worker and wait until its processor is built."""
        proc, conn, slots, profile, build_s = await asyncio.to_thread(self._spawn)
        # The event loop serves the pipe from here on: a non-blocking socket of our own.
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        conn.close()
        sock.setblocking(False)
        self.generation += 1
        self.proc, self._sock = proc, sock
        self._slots, self._free_slots = slots, list(range(slots.count)) if slots else []
        self._pending = collections.deque()
        self._lost_reason = None
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._read_replies(sock, self._pending, self.generation)),
            loop.create_task(self._watch(proc, self._pending, self.generation)),
        ]
        return profile, build_s

    async def call(self, prompt: PromptInput, kwargs: Mapping[str, Any] | None) -> tuple:
        """Run one request (up to `depth` at once); see `_run`."""
        sock, pending, generation = self._sock, self._pending, self.generation
        if sock is None or self._lost_reason is not None:
            raise _WorkerLost(self._lost_reason or f"worker {self.index} is not running")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple] = loop.create_future()
        async with self._send_lock:  # whole frames, in the order of `pending`
            if self.generation != generation or self._lost_reason is not None:
                raise _WorkerLost(self._lost_reason or f"worker {self.index} was restarted")
            slot = self._free_slots.pop() if self._free_slots else None
            frame = _frame(pickle.dumps((prompt, dict(kwargs) if kwargs else None, slot),
                                        protocol=pickle.HIGHEST_PROTOCOL))
            if not pending:
                self._turn_since = time.monotonic()
                self._head_changed.set()
            pending.append((fut, slot))
            try:
                await loop.sock_sendall(sock, frame)
            except OSError as e:
                self._lose(generation, f"lost the connection to worker {self.index}: {e}")
        status, payload = await fut
        if status != "ok":
            raise payload
        return payload

    async def _read_replies(self, sock: socket.socket, pending: collections.deque, generation: int) -> None:
        """Hand each reply of this process to the oldest call waiting for one."""
        loop = asyncio.get_running_loop()
        slots = self._slots
        try:
            while True:
                reply = pickle.loads(await _recv_frame(loop, sock))
                if not pending:
                    raise EOFError("a reply nobody asked for")
                fut, slot = pending[0]
                if reply[0] == "ok":
                    _, (head, items, metrics, encode_s), lengths = reply
                    if lengths is None:
                        full = [await _recv_frame(loop, sock) for _ in items]
                    elif slots is None or slot is None:
                        raise ValueError("a reply in a shared-memory slot that was not given")
                    else:
                        full = slots.read(slot, lengths)
                    encoded = EncodedPrompt(head, tuple(
                        EncodedItem(h, f, bare) for (h, bare), f in zip(items, full, strict=True)))
                    reply = ("ok", (encoded, metrics, encode_s))
                if not pending or pending[0][0] is not fut:
                    raise EOFError("the worker was lost while its reply was read")
                pending.popleft()
                if slot is not None:
                    self._free_slots.append(slot)
                self._turn_since = time.monotonic()
                self._head_changed.set()
                if not fut.done():
                    fut.set_result(reply)
        except asyncio.CancelledError:
            raise
        except (EOFError, OSError, pickle.UnpicklingError, ValueError) as e:
            self._lose(generation, f"lost the connection to worker {self.index}: {e}")

    async def _watch(self, proc: Any, pending: collections.deque, generation: int) -> None:
        """Stop the process when the request at the head of the line passes its deadline (woken
        whenever the head changes, so the deadline is kept to the loop's resolution), or when
        it died without closing the pipe (checked every 0.25 s)."""
        timeout = self.pool.request_timeout_s
        while self.generation == generation and self._lost_reason is None:
            if not proc.is_alive():
                self._lose(generation, f"worker {self.index} exited with code {proc.exitcode}")
                return
            wait = 0.25
            if pending and timeout is not None:
                left = self._turn_since + timeout - time.monotonic()
                if left <= 0:
                    self._lose(generation, f"processing took longer than {timeout} s; worker "
                                           f"{self.index} was stopped")
                    return
                wait = min(wait, left)
            self._head_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._head_changed.wait(), wait)

    async def _send_stop(self, sock: socket.socket) -> None:
        async with self._send_lock:
            await asyncio.get_running_loop().sock_sendall(sock, _frame(pickle.dumps(None)))

    def _lose(self, generation: int, reason: str) -> None:
        """This process is gone or unusable: kill it and fail every call it owes."""
        if generation != self.generation or self._lost_reason is not None:
            return
        # No more sends. The socket itself is closed by stop(), once the tasks using it have
        # ended: closed now, its descriptor could be reused while the loop still watches it.
        self._lost_reason = reason
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()  # reaped by stop()
        while self._pending:
            fut, _ = self._pending.popleft()
            if not fut.done():
                fut.set_exception(_WorkerLost(reason))
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    async def stop(self, grace_s: float = 5.0) -> None:
        proc, sock = self.proc, self._sock
        if proc is None:
            return
        if grace_s > 0 and sock is not None and self._lost_reason is None and proc.is_alive():
            with contextlib.suppress(Exception):  # asked to exit; killed below if it does not
                await asyncio.wait_for(self._send_stop(sock), grace_s)
                await asyncio.to_thread(proc.join, grace_s)
        self._lose(self.generation, f"worker {self.index} was stopped")
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if sock is not None:
            sock.close()
            self._sock = None
        if self._slots is not None:
            self._slots.close()
            self._slots, self._free_slots = None, []
        await asyncio.to_thread(_kill, proc)
        self.proc = None


def _kill(proc: Any) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(5)


class _InlineWorker:
    """workers=0: the processor lives in this process and runs on one helper thread."""

    index = -1
    depth = 1
    generation = 1

    def __init__(self, config: ProcessorConfig) -> None:
        self.config = config
        self.processor: Processor | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm-preprocessor")

    async def start(self) -> tuple[ModelProfile, float]:
        def build() -> Processor:
            processor = Processor(self.config)
            if self.config.warmup:
                processor.warmup()
            return processor

        self.processor = await asyncio.get_running_loop().run_in_executor(self._thread, build)
        return self.processor.profile, self.processor.build_seconds

    async def call(self, prompt: PromptInput, kwargs: Mapping[str, Any] | None) -> tuple:
        assert self.processor is not None
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, _run, self.processor, prompt, kwargs)
        except VlmError:
            raise
        except Exception as e:  # noqa: BLE001
            logger.exception("preprocessing failed")
            raise _as_vlm_error(e) from e

    def abort(self) -> None:
        pass

    async def stop(self, grace_s: float = 0.0) -> None:
        if self.processor is not None:
            with contextlib.suppress(Exception):
                self.processor.renderer.shutdown()
        self.processor = None
        self._thread.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The facade
# ---------------------------------------------------------------------------------------------


class Preprocessor:
    """Async preprocessing service core; create with `await Preprocessor.start(config, pool)`."""

    def __init__(self, config: ProcessorConfig, pool: PoolConfig) -> None:
        self.config = config
        self.pool = pool
        self._workers: list[_ProcessWorker | _InlineWorker] = []
        #: Requests each worker holds now; a worker being restarted is in `_down`.
        self._load: dict[int, int] = {}
        self._down: set[int] = set()
        #: Requests waiting for a worker, first come first served.
        self._waiters: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._profile: ModelProfile | None = None
        self._closed = False
        self._restart_tasks: set[asyncio.Task[None]] = set()
        self._waiting = 0
        self._in_flight = 0
        self.build_seconds: list[float] = []
        self._requests = self._succeeded = self._failed = self._rejected = self._restarts = 0
        self._cache_bytes: dict[int, int] = {}

    @classmethod
    async def start(cls, config: ProcessorConfig, pool: PoolConfig | None = None) -> Preprocessor:
        """Start the workers (in parallel) and wait until each has processed a dummy image."""
        pool = pool or PoolConfig()
        self = cls(config, pool)
        if pool.workers == 0:
            self._workers = [_InlineWorker(config)]
        else:
            self._workers = [_ProcessWorker(i, config, pool) for i in range(pool.workers)]
        results = await asyncio.gather(*(w.start() for w in self._workers), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self._stop_all()
            raise failures[0]
        self._profile = results[0][0]
        self.build_seconds = [r[1] for r in results]
        self._load = {w.index: 0 for w in self._workers}
        return self

    async def __aenter__(self) -> Preprocessor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- API -----------------------------------------------------------------------------------

    @property
    def profile(self) -> ModelProfile:
        assert self._profile is not None
        return self._profile

    def model_info(self) -> ModelInfo:
        return self.profile.model_info()

    async def preprocess(
        self, prompt: PromptInput, processor_kwargs: Mapping[str, Any] | None = None
    ) -> Prompt:
        """The decoded domain prompt (library use and tests; the service forwards bytes)."""
        return (await self.preprocess_detailed(prompt, processor_kwargs)).prompt.decoded

    async def preprocess_detailed(
        self, prompt: PromptInput, processor_kwargs: Mapping[str, Any] | None = None
    ) -> PooledResult:
        """Preprocess one prompt into its wire form, with the metrics of this request.

        Raises the `vlm.errors` classes: InvalidArgument / InvalidMedia / LimitExceeded /
        PromptTooLong for bad requests, ResourceExhausted when the queue is full, Unavailable
        when closed or when the worker was lost mid-request (retry), Internal otherwise.
        """
        if self._closed:
            raise Unavailable("the preprocessor is shutting down")
        self._requests += 1
        try:
            for media, path in media_with_paths(prompt):
                self.config.media_limits.check_bytes(media.modality, len(media.data), f"{path}.data")
        except VlmError:
            self._failed += 1
            raise
        t0 = time.perf_counter()
        worker = None if self._waiters else self._least_loaded()
        if worker is not None:
            self._load[worker.index] += 1
        else:
            if self._waiting >= self.pool.max_queue:
                self._rejected += 1
                raise ResourceExhausted(
                    f"the preprocessing queue is full ({self._waiting} requests waiting for "
                    f"{len(self._workers)} workers); retry later"
                )
            worker = await self._wait_for_worker()
        queue_s = time.perf_counter() - t0
        self._in_flight += 1
        # Shielded: a caller that gives up does not take the worker's answer (and the room it
        # frees) with it; `_on_done` accounts for it when it arrives.
        call = asyncio.get_running_loop().create_task(worker.call(prompt, processor_kwargs))
        call.add_done_callback(partial(self._on_done, worker, worker.generation))
        try:
            encoded, metrics, encode_s = await asyncio.shield(call)
        except _WorkerLost as e:
            self._failed += 1
            raise Unavailable(f"preprocessing worker lost: {e}; retry") from None
        except VlmError:
            self._failed += 1
            raise
        except Exception as e:  # noqa: BLE001 - e.g. an unpicklable request
            self._failed += 1
            logger.exception("preprocessing failed")
            raise Internal(f"preprocessing failed: {type(e).__name__}: {e}") from e
        self._succeeded += 1
        self._cache_bytes[worker.index] = metrics.cache_bytes
        return PooledResult(encoded, metrics, encode_s, queue_s, worker.index)

    def stats(self) -> PoolStats:
        return PoolStats(
            workers=len(self._workers),
            workers_ready=len(self._workers) - len(self._down),
            queue_depth=self._waiting,
            in_flight=self._in_flight,
            max_queue=self.pool.max_queue,
            cache_bytes=sum(self._cache_bytes.values()),
            requests_total=self._requests,
            succeeded_total=self._succeeded,
            failed_total=self._failed,
            rejected_total=self._rejected,
            worker_restarts_total=self._restarts,
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            w.abort()
        for task in list(self._restart_tasks):
            task.cancel()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
        await self._stop_all()

    # -- internals -----------------------------------------------------------------------------

    async def _stop_all(self) -> None:
        await asyncio.gather(*(w.stop() for w in self._workers), return_exceptions=True)

    def _least_loaded(self) -> Any:
        """The running worker holding the fewest requests, if it has room for one more."""
        best = None
        for w in self._workers:
            if w.index in self._down or self._load[w.index] >= w.depth:
                continue
            if best is None or self._load[w.index] < self._load[best.index]:
                best = w
        return best

    async def _wait_for_worker(self) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        self._waiting += 1
        try:
            worker = await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.result() is not None:
                self._give_back(fut.result())  # granted just as the waiter was cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            raise
        finally:
            self._waiting -= 1
        if worker is None:  # woken by close()
            raise Unavailable("the preprocessor is shutting down")
        return worker

    def _give_back(self, worker: Any) -> None:
        """One request's room on `worker` is free again: hand it to the first waiter."""
        self._load[worker.index] -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self._waiters and not self._closed:
            worker = self._least_loaded()
            if worker is None:
                return
            fut = self._waiters.popleft()
            if fut.done():
                continue
            self._load[worker.index] += 1
            fut.set_result(worker)

    def _on_done(self, worker: Any, generation: int, fut: asyncio.Future[Any]) -> None:
        self._in_flight -= 1
        self._load[worker.index] -= 1
        exc = None if fut.cancelled() else fut.exception()
        if (isinstance(exc, _WorkerLost) and not self._closed and worker.index not in self._down
                and worker.generation == generation):
            logger.warning("%s; restarting it", exc)
            self._down.add(worker.index)
            task = asyncio.get_running_loop().create_task(self._restart(worker))
            self._restart_tasks.add(task)
            task.add_done_callback(self._restart_tasks.discard)
        else:
            self._dispatch()

    async def _restart(self, worker: _ProcessWorker) -> None:
        delay = 1.0
        try:
            while not self._closed:
                await worker.stop(0)
                try:
                    await worker.start()
                except Exception:  # noqa: BLE001
                    logger.exception("restarting preprocessor worker %d failed", worker.index)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 60.0)
                    continue
                self._restarts += 1
                if self._closed:
                    await worker.stop()
                return
        finally:
            self._down.discard(worker.index)
            self._dispatch()
