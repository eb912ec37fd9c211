"""Engine facade logic (in-flight bookkeeping, abort-on-cancel, engine death) on a fake AsyncLLM."""

from __future__ import annotations

import asyncio

import pytest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.v1.engine.exceptions import EngineDeadError

from model_svc.engine import Engine
from model_svc.feature_store import FeatureStore
from vlm.profile import ModelProfile
from vlm.errors import AlreadyExists, InvalidArgument, Unavailable
from vlm.types import FinishReason, Fingerprint, Prompt, Sampling

FP = Fingerprint("fake", "auto", "h", "float32")


def _out(rid, tokens, finished=False, reason=None):
    comp = CompletionOutput(index=0, text="".join(f"<{t}>" for t in tokens), token_ids=tokens,
                            cumulative_logprob=None, logprobs=None, finish_reason=reason)
    return RequestOutput(rid, None, [1, 2], None, [comp], finished, num_cached_tokens=0)


class FakeLLM:
    """Mimics AsyncLLM.generate/abort: abort makes the stream end with an ABORT output."""

    def __init__(self, die_after: int | None = None) -> None:
        self.errored = False
        self.die_after = die_after
        self.aborts: list[str] = []
        self.generated: list[str] = []
        self.live: dict[str, asyncio.Event] = {}
        self.vllm_config = None
        self.shut_down = False

    async def generate(self, engine_input, params, request_id):
        self.generated.append(request_id)
        ev = self.live[request_id] = asyncio.Event()
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(0.002)
                if self.die_after is not None and i == self.die_after:
                    self.errored = True
                    raise EngineDeadError()
                if ev.is_set():
                    yield _out(request_id, [], True, "abort")
                    return
                last = i == params.max_tokens - 1
                yield _out(request_id, [10 + i], last, "length" if last else None)
        finally:
            self.live.pop(request_id, None)

    async def abort(self, request_id, internal=False):
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.aborts.extend(ids)
        for r in ids:
            if r in self.live:
                self.live[r].set()

    def shutdown(self, timeout=None):
        self.shut_down = True


class Recorder:
    def __init__(self):
        self.finished = []

    def request_finished(self, stats):
        self.finished.append(stats)

    def feature_store_lookups(self, hits, misses):
        pass


def make_engine(llm: FakeLLM | None = None):
    profile = ModelProfile(fingerprint=FP, vocab_size=100, max_model_len=1000, max_logprobs=5,
                           eos_token_ids=(1,))
    rec = Recorder()
    eng = Engine(llm or FakeLLM(), profile=profile, feature_store=FeatureStore(1000), metrics=rec)
    return eng, rec


PROMPT = Prompt(FP, (1, 2, 3))
S = Sampling(max_tokens=50, temperature=0.0)


async def test_stream_and_stats():
    eng, rec = make_engine()
    chunks = [c async for c in eng.generate("r", PROMPT, Sampling(max_tokens=4))]
    assert [c.token_ids for c in chunks] == [(10,), (11,), (12,), (13,)]
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    (st,) = rec.finished
    assert (st.finish_reason, st.generation_tokens, st.prompt_tokens, len(st.inter_token_latencies)) == (
        FinishReason.LENGTH, 4, 3, 3)
    assert eng.in_flight() == 0


async def test_duplicate_request_id():
    eng, _ = make_engine()
    stream = eng.generate("same", PROMPT, S)
    await stream.__anext__()
    with pytest.raises(AlreadyExists):
        await eng.generate("same", PROMPT, S).__anext__()
    await stream.aclose()
    assert eng.in_flight() == 0


async def test_consumer_stopping_early_aborts_once():
    llm = FakeLLM()
    eng, rec = make_engine(llm)
    stream = eng.generate("early", PROMPT, S)
    await stream.__anext__()
    await stream.__anext__()
    await stream.aclose()
    assert llm.aborts == ["early"]
    assert eng.in_flight() == 0
    assert rec.finished[-1].finish_reason is FinishReason.ABORT


async def test_task_cancellation_aborts():
    llm = FakeLLM()
    eng, _ = make_engine(llm)
    got_one = asyncio.Event()

    async def consume():
        async for _ in eng.generate("cancel", PROMPT, S):
            got_one.set()

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llm.aborts == ["cancel"]
    assert eng.in_flight() == 0


async def test_abort_gives_final_abort_chunk():
    llm = FakeLLM()
    eng, _ = make_engine(llm)
    chunks = []
    async for c in eng.generate("ab", PROMPT, S):
        chunks.append(c)
        if len(chunks) == 2:
            assert await eng.abort("ab")
    assert chunks[-1].finish_reason is FinishReason.ABORT
    assert chunks[-1].usage.completion_tokens == 2
    assert not await eng.abort("ab")
    assert not await eng.abort("never-seen")


async def test_engine_death_is_unavailable_and_unhealthy():
    llm = FakeLLM(die_after=2)
    eng, rec = make_engine(llm)
    assert eng.healthy
    with pytest.raises(Unavailable):
        async for _ in eng.generate("d", PROMPT, S):
            pass
    assert not eng.healthy and eng.errored
    assert llm.aborts == []  # a dead engine is not asked to abort
    assert rec.finished[-1].error == "UNAVAILABLE" and rec.finished[-1].finish_reason is None
    with pytest.raises(Unavailable):
        await eng.generate("d2", PROMPT, S).__anext__()


async def test_invalid_request_never_reaches_the_engine():
    llm = FakeLLM()
    eng, rec = make_engine(llm)
    with pytest.raises(InvalidArgument) as e:
        await eng.generate("bad", Prompt(FP, (1, 500)), S).__anext__()
    assert e.value.field == "prompt.token_ids[1]"
    assert llm.generated == [] and eng.in_flight() == 0 and rec.finished == []


async def test_close_aborts_in_flight_and_shuts_down():
    llm = FakeLLM()
    eng, _ = make_engine(llm)
    stream = eng.generate("open", PROMPT, S)
    await stream.__anext__()
    await eng.close()
    assert llm.shut_down and "open" in llm.aborts
    assert not eng.healthy
    with pytest.raises(Unavailable):
        await eng.generate("after", PROMPT, S).__anext__()
    await stream.aclose()
