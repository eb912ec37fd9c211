"""The pool's side of a worker pipe speaks `multiprocessing.connection.Connection`'s framing: what
the event loop writes, the worker's `conn.recv()` reads, and what the worker's `send` /
`send_bytes` write, the event loop reads, in pieces of any size."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import threading
from multiprocessing.connection import Connection

import pytest

from preprocessor_svc.pool import _frame, _recv_frame


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
    header = ("ok", ("head", [("hash", b"bare")], None, 0.1))

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
