"""`vlm.sync_client`'s loop thread on plain coroutines and async generators (no servers): items
handed over as they arrive, leaving early cancels the producer before returning, errors and
Ctrl-C reach the caller, and it works under a running event loop (Jupyter's case)."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from vlm import types
from vlm.errors import UpstreamError
from vlm.sync_client import LoopThread, SyncPreprocessorClient


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    with LoopThread() as lt:
        yield lt


async def _forever(first: int, cleaned: threading.Event) -> AsyncIterator[int]:
    """Yields `first`, then waits forever; records when its clean-up ran."""
    try:
        yield first
        await asyncio.sleep(3600)
    finally:
        cleaned.set()


def test_items_are_handed_over_as_they_arrive(loop: LoopThread) -> None:
    released = threading.Event()

    async def producer() -> AsyncIterator[object]:
        yield "first"
        # Only the consumer, having received "first", can let the producer go on.
        yield await asyncio.to_thread(released.wait, 10)

    items = loop.iterate(producer())
    assert next(items) == "first"
    released.set()
    assert next(items) is True
    assert list(items) == []


def test_break_cancels_the_producer_before_the_loop_ends(loop: LoopThread) -> None:
    cleaned = threading.Event()
    for _ in loop.iterate(_forever(1, cleaned)):
        break
    assert cleaned.is_set()


def test_close_cancels_the_producer(loop: LoopThread) -> None:
    cleaned = threading.Event()
    items = loop.iterate(_forever(1, cleaned))
    assert next(items) == 1
    items.close()
    assert cleaned.is_set()


def test_producer_errors_reach_the_caller(loop: LoopThread) -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        raise ValueError("boom")

    got = []
    with pytest.raises(ValueError, match="boom"):
        for item in loop.iterate(failing()):
            got.append(item)
    assert got == [1]


def _interrupt_main_thread_soon() -> None:
    threading.Timer(0.3, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT)).start()


@pytest.fixture(autouse=True)
def _default_sigint():
    """Ctrl-C as a terminal delivers it: whatever an earlier test in the session installed
    (vLLM, a server's shutdown handler) must not turn the test's SIGINT into a hang."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_while_waiting_for_a_chunk_cancels_the_producer(loop: LoopThread) -> None:
    cleaned = threading.Event()
    items = loop.iterate(_forever(1, cleaned))
    assert next(items) == 1
    _interrupt_main_thread_soon()
    with pytest.raises(KeyboardInterrupt):
        next(items)
    assert cleaned.is_set()


def test_ctrl_c_while_waiting_for_a_call_cancels_it(loop: LoopThread) -> None:
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    _interrupt_main_thread_soon()
    with pytest.raises(KeyboardInterrupt):
        loop.run(slow())
    assert cancelled.wait(5)


def test_closed_loop_refuses_calls() -> None:
    lt = LoopThread()
    lt.close()
    lt.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        lt.run(asyncio.sleep(0))


def _dead_target() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_client_works_under_a_running_event_loop() -> None:
    """As in Jupyter, whose cells run inside an event loop: blocking calls still work, and the
    service's error arrives as the async client's UpstreamError."""

    async def cell() -> UpstreamError:
        with SyncPreprocessorClient(_dead_target()) as client:
            with pytest.raises(UpstreamError) as err:
                client.preprocess(types.PromptInput(text="hi"))
        return err.value

    assert asyncio.run(cell()).code == grpc.StatusCode.UNAVAILABLE
