"""Request-memory admission: a bound on the bytes of request messages a server holds at once.

grpc.aio reads a unary request's message before any handler, interceptor or its own
`maximum_concurrent_rpcs` can refuse the RPC, and HTTP/2's BDP probing lets each stream's window
grow to megabytes, so the transport buffers large messages ahead of the application. Neither the
message-size limit nor the RPC limit therefore bounds memory when many clients send large
messages at once (measured by `vlm bench memory`: about 2.8× each message, for every message
sent, however few RPCs were let through). `vlm.server` closes this in three steps:

1. BDP probing is off on the server (`ServerOptions.grpc_options`): a stream's receive window
   stays at HTTP/2's 64 KiB until its message is asked for, and then covers that message.
2. Methods with a unary request are registered as client-streaming handlers, so the message is
   read by `context.read()`, and only once a `RequestBudget` reservation is granted.
3. The reservation is the largest message the read can bring (`--max-message-bytes`) while it
   is read, then the message's own size until the RPC answers: a unary RPC's response, a
   streaming RPC's first message (by then the request has been turned into work that other
   limits bound: the preprocessing queue, the engine's, the feature store's bytes).

Waiting RPCs hold one HTTP/2 window each, no message. Beyond `max_waiting` of them a new RPC is
RESOURCE_EXHAUSTED at once; an RPC whose peer is gone or whose deadline passes while it waits
leaves the queue.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc

from vlm.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted


class RequestBudget:
    """Byte reservations granted first come, first served, up to `limit_bytes` at once.

    `on_change(reserved_bytes, waiting)` is called after each change (for gauges)."""

    def __init__(
        self,
        limit_bytes: int,
        message_bytes: int,
        *,
        max_waiting: int = 1024,
        receive_timeout_s: float = 60.0,
        on_change: Callable[[int, int], None] | None = None,
    ) -> None:
        if message_bytes <= 0 or limit_bytes < message_bytes:
            raise ValueError(
                f"the request memory limit ({limit_bytes} bytes) must hold at least one "
                f"maximum-size message ({message_bytes} bytes)"
            )
        self.limit_bytes = limit_bytes
        self.message_bytes = message_bytes
        self.max_waiting = max_waiting
        self.receive_timeout_s = receive_timeout_s
        self.reserved = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._on_change = on_change

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.reserved, len(self._waiters))

    async def reserve(self, n: int) -> None:
        """Wait until `n` bytes fit (in arrival order), then hold them."""
        if not self._waiters and self.reserved + n <= self.limit_bytes:
            self.reserved += n
            self._changed()
            return
        if len(self._waiters) >= self.max_waiting:
            raise ResourceExhausted(
                f"request memory: {self.reserved} of {self.limit_bytes} bytes held by requests in "
                f"flight and {len(self._waiters)} requests already waiting; retry later"
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        self._changed()
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as the waiter was cancelled
            else:
                self._waiters.remove(entry)
                self._wake()
                self._changed()
            raise

    def release(self, n: int) -> None:
        self.reserved -= n
        self._wake()
        self._changed()

    def _wake(self) -> None:
        while self._waiters and self.reserved + self._waiters[0][0] <= self.limit_bytes:
            n, fut = self._waiters.popleft()
            if not fut.done():
                self.reserved += n
                fut.set_result(None)

    @asynccontextmanager
    async def receive(
        self, context: grpc.aio.ServicerContext, parse: Callable[[bytes], Any] | None
    ) -> AsyncIterator[Received]:
        """Read the RPC's one request message under a reservation and parse it. The message's
        size stays held until `Received.release()` (a streaming RPC's first response) or the
        end of the block (the handler has returned)."""
        await self.reserve(self.message_bytes)
        held = Received(self, self.message_bytes)
        try:
            try:
                async with asyncio.timeout(self.receive_timeout_s):
                    raw = await context.read()
            except asyncio.TimeoutError:
                raise DeadlineExceeded(
                    f"request: the message did not arrive within {self.receive_timeout_s:g} s"
                ) from None
            if raw is grpc.aio.EOF:
                raise InvalidArgument("the request carries no message", field="request")
            held.shrink(len(raw))
            held.request = raw if parse is None else parse(raw)
            del raw
            yield held
        finally:
            held.release()


class Received:
    """A request read under a `RequestBudget`, and the bytes it holds there."""

    __slots__ = ("_budget", "_held", "request")

    def __init__(self, budget: RequestBudget, held: int) -> None:
        self._budget = budget
        self._held = held
        self.request: Any = None

    def shrink(self, size: int) -> None:
        self._budget.release(self._held - size)
        self._held = size

    def take(self) -> Any:
        """The request, handed over (this object keeps no reference to it)."""
        request, self.request = self.request, None
        return request

    def release(self) -> None:
        """Give the bytes back; idempotent."""
        if self._held:
            self._budget.release(self._held)
            self._held = 0
