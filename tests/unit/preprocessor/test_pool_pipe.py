"""The pool's side of a worker pipe speaks `multiprocessing.connection.Connection`'s framing: what
the event loop writes, the worker's `conn.recv()` reads, and what the worker's `send` /
`send_bytes` write, the event loop reads, in pieces of any size. The reply slots (shared memory)
reach a worker process at its start and carry what it writes back to this one."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import socket
import threading
from multiprocessing.connection import Connection

import pytest

from preprocessor_svc.pool import _frame, _recv_frame, _ReplySlots


def _pair() -> tuple[socket.socket, Connection]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    return ours, Connection(theirs.detach())


async def test_the_worker_reads_what_the_loop_writes() -> None:
    ours, worker = _pair()
    loop = asyncio.get_running_loop()
    request = ({"text": "x" * 10, "media": os.urandom(300_000)}, None)  # larger than a socket buffer
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(worker.recv()))
    reader.start()
    await loop.sock_sendall(ours, _frame(pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)))
    await asyncio.to_thread(reader.join, 10)
    assert got == [request]
    ours.close()
    worker.close()


@pytest.mark.parametrize("size", [0, 1, 65_536, 3 << 20])
async def test_the_loop_reads_what_the_worker_writes(size: int) -> None:
    ours, worker = _pair()
    loop = asyncio.get_running_loop()
    blob = os.urandom(size)
    header = ("ok", ("head", [("hash", b"bare")], None, 0.1), None)

    def send() -> None:
        worker.send(header)
        worker.send_bytes(blob)

    writer = threading.Thread(target=send)
    writer.start()
    assert pickle.loads(await _recv_frame(loop, ours)) == header
    assert bytes(await _recv_frame(loop, ours)) == blob
    await asyncio.to_thread(writer.join, 10)
    ours.close()
    worker.close()


async def test_a_pipe_closed_mid_frame_is_an_eof() -> None:
    ours, worker = _pair()
    loop = asyncio.get_running_loop()
    worker._send(_frame(b"0123456789")[:8])  # the header and 4 of 10 bytes, then gone
    worker.close()
    with pytest.raises(EOFError, match="after 4 of 10 bytes"):
        await _recv_frame(loop, ours)
    ours.close()


def _write_in_child(slots: _ReplySlots, conn: Connection) -> None:
    """A worker's part: write what it is told into the slot it is told."""
    slot, blobs = conn.recv()
    conn.send(slots.write(slot, blobs))


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_reply_slots_carry_a_workers_bytes_back(method: str) -> None:
    slots = _ReplySlots.create(2, 1 << 20)
    assert slots is not None
    ctx = multiprocessing.get_context(method)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_write_in_child, args=(slots, child), daemon=True)
    proc.start()
    child.close()
    slots.close_fd()  # the worker holds its own mapping from here on
    blobs = [os.urandom(300_000), b"", os.urandom(5)]
    parent.send((1, blobs))
    lengths = parent.recv()
    proc.join(30)
    assert lengths == [300_000, 0, 5]
    assert slots.read(1, lengths) == blobs
    assert slots.read(0, [3]) == [b"\0\0\0"]  # slot 0 untouched
    with pytest.raises(RuntimeError, match="while it starts"):
        pickle.dumps(slots)  # the descriptor is gone once handed over
    slots.close()
    parent.close()


def test_reply_slots_refuse_what_does_not_fit() -> None:
    slots = _ReplySlots.create(2, 64)
    assert slots is not None
    assert slots.write(0, [b"x" * 40, b"y" * 25]) is None  # 65 > 64: the pipe carries it
    assert slots.write(1, [b"x" * 40, b"y" * 24]) == [40, 24]
    assert slots.read(1, [40, 24]) == [b"x" * 40, b"y" * 24]
    for slot, lengths in ((2, [1]), (-1, [1]), (0, [65]), (0, [40, 40]), (0, [-1, 2])):
        with pytest.raises(ValueError, match="out of bounds"):
            slots.read(slot, lengths)
    slots.close()


def test_without_memfd_replies_use_the_pipe(monkeypatch, caplog) -> None:
    def refused(*_args: object) -> int:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "memfd_create", refused)
    assert _ReplySlots.create(2, 1 << 20) is None
    assert "go through the pipe" in caplog.text
    assert _ReplySlots.create(2, 0) is None  # --reply-slot-bytes 0
