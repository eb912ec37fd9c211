"""Load on the real llava pipeline: a 16-stream × 10 s soak (the suite's version of
`vlm bench soak`) and 50 streams cancelled mid-generation."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.soak import run_soak
from tests.e2e.conftest import png
from vlm import types
from vlm.client import PreprocessorClient
from vlm.testing.tiny_models import SPECS

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]


async def _until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_soak_16_streams_10_seconds_loses_nothing(llava_pipeline) -> None:
    res = await run_soak(llava_pipeline.pre_target, streams=16, seconds=10.0,
                         image_text=SPECS["llava"].image_token, max_tokens=8, request_timeout_s=60)
    s = res.summary()
    assert s["lost"] == 0 and s["hung"] == 0 and not s["unexpected"], s
    assert s["completed"] >= 16 and s["cancelled"] >= 1, s
    engine = llava_pipeline.model.engine
    await _until(lambda: engine.load().running == 0, 5, "no request left running")


async def test_cancelling_50_streams_frees_the_engine(llava_pipeline) -> None:
    engine = llava_pipeline.model.engine
    await _until(lambda: engine.load().running == 0, 10, "an idle engine")
    baseline_kv = engine.load().kv_cache_usage
    aborted = llava_pipeline.model.grpc.metrics.registry.get_sample_value(
        "vlm_request_success_total", {"finished_reason": "abort"}) or 0.0
    long = types.Sampling(temperature=0.0, max_tokens=900, ignore_eos=True)
    prompt = types.PromptInput(text=SPECS["llava"].image_token + "\nTell me everything.",
                               media=(types.Media(types.Modality.IMAGE, png(77)),))
    async with PreprocessorClient(llava_pipeline.pre_target) as client:
        streams = [client.generate(prompt, long) for _ in range(50)]
        await asyncio.gather(*(anext(s) for s in streams))  # every one is generating
        assert engine.load().running == 50
        await asyncio.gather(*(s.aclose() for s in streams))
        await _until(lambda: engine.load().running == 0, 5, "running back to 0")
    await _until(lambda: engine.load().kv_cache_usage <= baseline_kv, 5, "KV usage back to its baseline")
    # vLLM itself finished them as aborted (not the facade's bookkeeping).
    after = llava_pipeline.model.grpc.metrics.registry.get_sample_value(
        "vlm_request_success_total", {"finished_reason": "abort"})
    assert after == aborted + 50
