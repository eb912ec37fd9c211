"""Synchronous client library: `vlm.client` for code that does not run an event loop itself.

Each client runs the asyncio client on a private event loop in a daemon thread and blocks the
caller until the answer is back. The caller's thread may already run a loop of its own (Jupyter
does, and `asyncio.run` refuses there): the private loop never touches it.

- `SyncPreprocessorClient`: `preprocess`, `generate` (end to end), `model_info`.
- `SyncModelClient`: `generate` over a preprocessed prompt (hash-only resend, as
  `vlm.client.ModelClient`), `model_info`, `load`.
- `check_health`: the standard grpc.health.v1 Check.

`generate` returns an iterator that hands over each chunk as soon as it arrives. Leaving it early
(`break`, an exception in the loop body, Ctrl-C, `.close()`) cancels the RPC before the
iterator is gone, so the model service aborts the request instead of generating for nobody.
Errors are the async client's: `vlm.errors.UpstreamError` with the status code and reason.

    with SyncPreprocessorClient("127.0.0.1:50051") as client:
        for chunk in client.generate(types.PromptInput(text="Hi"), types.Sampling(max_tokens=16)):
            print(chunk.text, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from queue import SimpleQueue
from typing import Any, Generic, Self, TypeVar

from vlm import client, convert, types

T = TypeVar("T")
C = TypeVar("C", client.PreprocessorClient, client.ModelClient)

#: Marks the end of a forwarded stream in `LoopThread.iterate`'s hand-over queue.
_END = object()


class LoopThread:
    """An asyncio event loop in a daemon thread, driven by blocking calls from other threads.

    A daemon thread, so that a client nobody closed does not keep the interpreter alive.
    """

    def __init__(self, name: str = "vlm-sync-client") -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._loop.is_closed()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and return its result. If the wait is interrupted (Ctrl-C in
        the main thread), the coroutine is cancelled too rather than left running unobserved."""
        if self.closed:
            coro.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        """Iterate `items` from the calling thread. A task on the loop forwards each item the
        moment it arrives; leaving the iteration early cancels that task and waits until it has
        finished, so whatever `items` holds open (an RPC) is released when this returns."""
        handover: SimpleQueue[tuple[Any, BaseException | None]] = SimpleQueue()
        task = self.run(_start(_forward(items, handover)))
        try:
            while True:
                item, error = handover.get()
                if error is not None:
                    raise error
                if item is _END:
                    return
                yield item
        finally:
            if not self.closed:  # closing the loop has already cancelled every task
                self.run(_cancel(task))

    def close(self) -> None:
        """Cancel what still runs on the loop (as `asyncio.run` does at its end), then stop it."""
        if self.closed:
            return
        self.run(_cancel_all())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.create_task(coro)


async def _forward(items: AsyncIterator[Any], out: SimpleQueue[tuple[Any, BaseException | None]]) -> None:
    """Put each item of `items` into `out`, then `(_END, the exception that ended it or None)`:
    the consuming thread raises it there, where the caller can catch it."""
    try:
        async for item in items:
            out.put((item, None))
    except BaseException as exc:
        out.put((_END, exc))
        if isinstance(exc, asyncio.CancelledError):
            raise
    else:
        out.put((_END, None))


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.wait([task])


async def _cancel_all() -> None:
    loop = asyncio.get_running_loop()
    tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()


async def _make(factory: Callable[[], C]) -> C:
    # A grpc.aio channel belongs to the loop it is created on: create it there.
    return factory()


class _SyncClient(Generic[C]):
    """One async client and the loop thread it lives on; closing one closes both."""

    def __init__(self, factory: Callable[[], C]) -> None:
        self._loop = LoopThread()
        try:
            self._client: C = self._loop.run(_make(factory))
        except BaseException:
            self._loop.close()
            raise

    @property
    def target(self) -> str:
        return self._client.target

    def model_info(self) -> types.ModelInfo:
        return self._loop.run(self._client.model_info())

    def close(self) -> None:
        """Close the channel (cancelling any RPC still open), then the loop thread."""
        if not self._loop.closed:
            self._loop.run(self._client.close())
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SyncPreprocessorClient(_SyncClient[client.PreprocessorClient]):
    """Blocking client of `vlm.preprocessor.v1.PreprocessorService` (see the module doc)."""

    def __init__(self, target: str) -> None:
        super().__init__(lambda: client.PreprocessorClient(target))

    def preprocess(
        self,
        prompt: types.PromptInput,
        processor_kwargs: Mapping[str, Any] | None = None,
        *,
        request_id: str = "",
    ) -> types.Prompt:
        return self._loop.run(self._client.preprocess(prompt, processor_kwargs, request_id=request_id))

    def generate(
        self,
        prompt: types.PromptInput,
        sampling: types.Sampling,
        processor_kwargs: Mapping[str, Any] | None = None,
        *,
        request_id: str = "",
    ) -> Iterator[types.Chunk]:
        """Stream chunks end to end; the RPC starts at the first `next()`."""
        return self._loop.iterate(
            self._client.generate(prompt, sampling, processor_kwargs, request_id=request_id)
        )


class SyncModelClient(_SyncClient[client.ModelClient]):
    """Blocking client of `vlm.model.v1.ModelService` (see the module doc)."""

    def __init__(self, target: str, *, remember_hashes: int = 4096) -> None:
        super().__init__(lambda: client.ModelClient(target, remember_hashes=remember_hashes))

    def generate(
        self,
        prompt: types.Prompt | convert.EncodedPrompt,
        sampling: types.Sampling,
        *,
        request_id: str = "",
    ) -> Iterator[types.Chunk]:
        """Stream chunks for a preprocessed prompt; the RPC starts at the first `next()`."""
        return self._loop.iterate(self._client.generate(prompt, sampling, request_id=request_id))

    def load(self) -> types.Load:
        return self._loop.run(self._client.load())


def check_health(target: str, service: str = "", *, timeout: float = 5.0) -> str:
    """Return the health status name ("SERVING", "NOT_SERVING", ...) of `service` at `target`."""
    with LoopThread() as loop:
        return loop.run(client.check_health(target, service, timeout=timeout))
