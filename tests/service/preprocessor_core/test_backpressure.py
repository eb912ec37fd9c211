"""Backpressure over real gRPC: a full preprocessing queue and a full server answer
RESOURCE_EXHAUSTED at once (not after a wait), and the service keeps serving."""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from preprocessor_svc.app import PreprocessorApp
from preprocessor_svc.pool import PoolConfig
from preprocessor_svc.processing import ProcessorConfig
from vlm import types
from vlm.client import PreprocessorClient
from vlm.errors import UpstreamError
from vlm.server import ServerOptions
from vlm.testing.tiny_models import SPECS

pytestmark = pytest.mark.asyncio(loop_scope="function")


def _jpeg(seed: int, size=(1024, 768)) -> bytes:
    """A photo-sized JPEG that compresses like a photo (tens of KB): the time goes into
    preprocessing, not into moving the bytes."""
    w, h = size
    ramp = np.add.outer(np.arange(h), np.arange(w) * (1 + seed % 5)) % 256
    img = np.stack([ramp, ramp[::-1], np.full_like(ramp, seed * 17 % 256)], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _prompt(seed: int) -> types.PromptInput:
    return types.PromptInput(text=SPECS["llava"].image_token + "\nWhat is it?",
                             media=(types.Media(types.Modality.IMAGE, _jpeg(seed)),))


async def _timed(client: PreprocessorClient, prompt: types.PromptInput) -> tuple[float, UpstreamError | None]:
    t = time.monotonic()
    try:
        await client.preprocess(prompt)
    except UpstreamError as e:
        return time.monotonic() - t, e
    return time.monotonic() - t, None


async def test_full_queue_is_resource_exhausted_within_100ms(tiny_model) -> None:
    app = await PreprocessorApp.start(
        ProcessorConfig(model=str(tiny_model("llava")), cache_bytes=0),
        PoolConfig(workers=1, max_queue=1),
        ServerOptions(metrics_port=None, grace_s=0),
    )
    try:
        async with PreprocessorClient(f"127.0.0.1:{app.grpc.port}") as client:
            await client.preprocess(_prompt(0))  # connected and warm
            prompts = [_prompt(s) for s in range(1, 13)]
            results = await asyncio.gather(*(_timed(client, p) for p in prompts))
            refused = [(dt, e) for dt, e in results if e is not None]
            served = [dt for dt, e in results if e is None]
            assert refused and len(served) >= 2, results  # one in the worker, one queued
            for dt, e in refused:
                assert e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and e.reason == "QUEUE_FULL"
                assert dt < 0.1, f"refused after {dt * 1e3:.0f} ms"
            # Still serving once the burst is over.
            assert (await client.preprocess(_prompt(99))).items
    finally:
        await app.close()


async def test_concurrent_rpc_limit_is_resource_exhausted(tiny_model) -> None:
    app = await PreprocessorApp.start(
        ProcessorConfig(model=str(tiny_model("llava")), cache_bytes=0),
        PoolConfig(workers=1, max_queue=64),
        ServerOptions(metrics_port=None, grace_s=0, max_concurrent_rpcs=2),
    )
    try:
        async with PreprocessorClient(f"127.0.0.1:{app.grpc.port}") as client:
            prompts = [_prompt(s) for s in range(8)]
            results = await asyncio.gather(*(_timed(client, p) for p in prompts))
            codes = [e.code for _, e in results if e is not None]
            assert codes and set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, results
            assert sum(e is None for _, e in results) >= 2
    finally:
        await app.close()
