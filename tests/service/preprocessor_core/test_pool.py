"""The async facade: worker processes, queue bound, errors across processes, hash stability."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import pytest_asyncio

from preprocessor_svc.pool import Preprocessor
from preprocessor_svc.pool import PoolConfig
from preprocessor_svc.processing import ProcessorConfig
from tests.service.preprocessor_core.conftest import assert_matches_reference
from tests.unit.preprocessor.samples import image_bytes
from vlm.errors import InvalidArgument, InvalidMedia, ResourceExhausted, Unavailable
from vlm.types import Media, Modality, Prompt, PromptInput

IMG_A = image_bytes(64, 48, seed=11)
IMG_B = image_bytes(32, 80, seed=12)


def request(*images: bytes) -> PromptInput:
    return PromptInput(text="Look: " + " ".join("<image>" for _ in images), media=tuple(Media(Modality.IMAGE, d) for d in images))


@pytest_asyncio.fixture(scope="module")
async def pool(tiny_model):
    t0 = time.perf_counter()
    pre = await Preprocessor.start(ProcessorConfig(model=str(tiny_model("llava"))), PoolConfig(workers=2, max_queue=16))
    pre.start_seconds = time.perf_counter() - t0
    yield pre
    await pre.close()


async def test_workers_match_vllm_and_hashes_are_stable_across_processes(pool, arch_env):
    """Two spawned worker processes and this process compute identical items and hashes."""
    env = arch_env("llava")
    ref = env.ref_completion(
        {"prompt": request(IMG_A, IMG_B).text, "multi_modal_data": {"image": [env.ref_image(IMG_A), env.ref_image(IMG_B)]}}
    )
    in_process = env.processor.process(request(IMG_A, IMG_B))
    seen: dict[int, list[str]] = {}
    for _ in range(10):
        results = await asyncio.gather(*(pool.preprocess_detailed(request(IMG_A, IMG_B)) for _ in range(4)))
        for res in results:
            assert_matches_reference(res.prompt.decoded, ref)
            seen[res.worker] = list(res.prompt.hashes)
        if len(seen) == 2:
            break
    assert sorted(seen) == [0, 1], seen
    expected = [it.hash for it in in_process.prompt.items]
    assert all(hashes == expected for hashes in seen.values())
    assert pool.model_info() == env.processor.profile.model_info()
    assert pool.profile == env.processor.profile


async def test_errors_cross_the_process_boundary(pool):
    with pytest.raises(InvalidMedia) as info:
        await pool.preprocess(request(IMG_A, b"garbage"))
    assert info.value.field == "media[1].data"
    with pytest.raises(InvalidArgument) as info:
        await pool.preprocess(request(IMG_A), {"nope": 1})
    assert type(info.value) is InvalidArgument and info.value.field == "processor_options.kwargs.nope"
    with pytest.raises(InvalidArgument) as info:
        await pool.preprocess(PromptInput(text="<image><image>", media=(Media(Modality.IMAGE, IMG_A),)))
    assert info.value.field == "prompt.text"


async def test_stats(pool):
    await pool.preprocess(request(IMG_A))
    s = pool.stats()
    assert s.workers == s.workers_ready == 2
    assert s.queue_depth == 0 and s.in_flight == 0
    assert s.requests_total >= s.succeeded_total >= 1
    assert s.cache_bytes > 0


async def test_event_loop_not_blocked(pool):
    """While workers process, the loop keeps ticking."""
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    t = asyncio.create_task(ticker())
    imgs = [image_bytes(300, 300, seed=100 + i) for i in range(6)]
    await asyncio.gather(*(pool.preprocess(request(d)) for d in imgs))
    t.cancel()
    assert ticks > 3


async def test_dead_worker_is_replaced(pool):
    """A worker killed mid-service fails its request with Unavailable (retryable) and is
    replaced in the background."""
    victim = pool._least_loaded()  # the next worker to get a request
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.join(10)
    with pytest.raises(Unavailable):
        await pool.preprocess(request(IMG_A))
    assert pool.stats().workers_ready == 1
    other = await pool.preprocess_detailed(request(IMG_B))  # the surviving worker still serves
    assert other.worker != victim.index
    deadline = time.monotonic() + 120
    while pool.stats().workers_ready < 2:
        assert time.monotonic() < deadline, "the worker was not replaced"
        await asyncio.sleep(0.5)
    assert pool.stats().worker_restarts_total == 1
    await asyncio.gather(*(pool.preprocess(request(IMG_A)) for _ in range(4)))


async def test_spawned_worker_agrees(tiny_model, arch_env):
    """A worker started with `spawn` is a fresh interpreter (own imports, own PYTHONHASHSEED,
    unlike the forkserver's children, which share the server's): its hashes equal this
    process's. With the processor cache off (cache_bytes=0) hashes are still content hashes,
    not per-request IDs."""
    env = arch_env("llava")
    expected = [it.hash for it in env.processor.process(request(IMG_B, IMG_A)).prompt.items]
    pre = await Preprocessor.start(
        ProcessorConfig(model=str(tiny_model("llava")), warmup=False, cache_bytes=0),
        PoolConfig(workers=1, start_method="spawn"),
    )
    try:
        for _ in range(2):  # twice: no cache, so the second is processed again
            res = await pre.preprocess_detailed(request(IMG_B, IMG_A))
            assert res.worker == 0
            assert list(res.prompt.hashes) == expected
            assert (res.metrics.cache_hits, res.metrics.cache_misses) == (0, 0)
    finally:
        await pre.close()


@pytest_asyncio.fixture(scope="module")
async def inline(tiny_model):
    pre = await Preprocessor.start(ProcessorConfig(model=str(tiny_model("llava"))), PoolConfig(workers=0, max_queue=1))
    yield pre
    await pre.close()


async def test_inline_mode(inline, arch_env):
    env = arch_env("llava")
    res = await inline.preprocess_detailed(request(IMG_B))
    ref = env.ref_completion({"prompt": request(IMG_B).text, "multi_modal_data": {"image": [env.ref_image(IMG_B)]}})
    assert_matches_reference(res.prompt.decoded, ref)
    assert res.worker == -1


async def test_queue_bound(inline):
    """One request runs, max_queue=1 waits, the rest are refused at once."""
    results = await asyncio.gather(*(inline.preprocess(request(IMG_A)) for _ in range(4)), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["Prompt", "Prompt", "ResourceExhausted", "ResourceExhausted"]
    assert inline.stats().rejected_total == 2
    assert isinstance(results[2], ResourceExhausted)


async def test_close_refuses_and_wakes_waiters(tiny_model):
    pre = await Preprocessor.start(
        ProcessorConfig(model=str(tiny_model("llava")), warmup=False), PoolConfig(workers=0, max_queue=4)
    )
    tasks = [asyncio.create_task(pre.preprocess(request(IMG_A))) for _ in range(3)]
    await asyncio.sleep(0)
    await pre.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert any(isinstance(r, Unavailable) for r in results)
    with pytest.raises(Unavailable):
        await pre.preprocess(request(IMG_A))


async def test_each_worker_holds_two_requests_and_a_death_restarts_it_once(tiny_model):
    """--worker-depth 2: with one worker, two requests are in its hands at once (the second
    already in its pipe) and the rest wait. A worker killed with two requests outstanding
    fails what it had not answered with Unavailable, and is restarted once, not per request."""
    pre = await Preprocessor.start(
        ProcessorConfig(model=str(tiny_model("llava")), warmup=False, cache_bytes=0),
        PoolConfig(workers=1, max_queue=8, worker_depth=2),
    )
    try:
        imgs = [image_bytes(1024, 768, seed=300 + i) for i in range(4)]
        tasks = [asyncio.create_task(pre.preprocess_detailed(request(d))) for d in imgs]
        await asyncio.sleep(0)
        s = pre.stats()
        assert (s.in_flight, s.queue_depth) == (2, 2)
        assert [r.worker for r in await asyncio.gather(*tasks)] == [0, 0, 0, 0]

        victim = pre._workers[0]
        tasks = [asyncio.create_task(pre.preprocess(request(d))) for d in imgs[:2]]
        await asyncio.sleep(0)
        assert pre.stats().in_flight == 2
        os.kill(victim.proc.pid, signal.SIGKILL)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, Prompt | Unavailable) for r in results), results
        assert isinstance(results[-1], Unavailable), results
        deadline = time.monotonic() + 120
        while pre.stats().workers_ready < 1:
            assert time.monotonic() < deadline, "the worker was not replaced"
            await asyncio.sleep(0.2)
        assert pre.stats().worker_restarts_total == 1
        assert (await pre.preprocess_detailed(request(imgs[0]))).worker == 0
        assert pre.stats().in_flight == 0
    finally:
        await pre.close()


async def test_a_request_past_its_deadline_stops_the_worker_which_is_restarted(tiny_model):
    """--request-timeout: a request still unanswered when its time in the worker's hands runs
    out fails with Unavailable naming the timeout; the worker is replaced, and a caller that
    gave up meanwhile does not leave its room on the worker taken."""
    pre = await Preprocessor.start(
        ProcessorConfig(model=str(tiny_model("llava")), warmup=False, cache_bytes=0),
        PoolConfig(workers=1, max_queue=8, request_timeout_s=0.0),
    )
    try:
        with pytest.raises(Unavailable, match="longer than 0.0 s"):
            await pre.preprocess(request(image_bytes(1024, 768, seed=400)))
        deadline = time.monotonic() + 120
        while pre.stats().worker_restarts_total < 1:
            assert time.monotonic() < deadline, "the worker was not replaced"
            await asyncio.sleep(0.2)
        assert pre.stats().in_flight == 0
        assert pre._load == {0: 0}
    finally:
        await pre.close()


async def test_a_cancelled_caller_leaves_the_pipe_in_step(pool):
    """Callers that give up while their request is in a worker's hands: the worker's answers
    are still read (in order) and dropped, and the next callers get their own answers."""
    tasks = [asyncio.create_task(pool.preprocess_detailed(request(image_bytes(512, 384, seed=500 + i))))
             for i in range(4)]
    await asyncio.sleep(0.05)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    a, b = await asyncio.gather(pool.preprocess_detailed(request(IMG_A)), pool.preprocess_detailed(request(IMG_B)))
    assert a.prompt.hashes != b.prompt.hashes
    assert a.prompt.hashes == (await pool.preprocess_detailed(request(IMG_A))).prompt.hashes
    assert b.prompt.hashes == (await pool.preprocess_detailed(request(IMG_B))).prompt.hashes
    deadline = time.monotonic() + 30
    while pool.stats().in_flight:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def test_replies_through_shared_memory_and_through_the_pipe_are_the_same(pool, tiny_model):
    """The pool fixture's workers hand replies back through shared memory; a worker whose slots
    are too small for the reply (and one with none) sends the same bytes through its pipe."""
    shm = await pool.preprocess_detailed(request(IMG_A, IMG_B))
    for slot_bytes in (1024, 0):
        pre = await Preprocessor.start(
            ProcessorConfig(model=str(tiny_model("llava")), warmup=False),
            PoolConfig(workers=1, reply_slot_bytes=slot_bytes),
        )
        try:
            assert (pre._workers[0]._slots is None) == (slot_bytes == 0)
            piped = await pre.preprocess_detailed(request(IMG_A, IMG_B))
        finally:
            await pre.close()
        assert piped.prompt == shm.prompt
    assert len(shm.prompt.items) == 2 and all(len(it.full) > 1024 for it in shm.prompt.items)
    assert all(w._slots is not None and sorted(w._free_slots) == [0, 1] for w in pool._workers)
