"""Greedy correctness vs HF for more architectures, at the engine level (one engine each; the
suite runs all three, about 100 s on 2 cores; choose others with a comma list, or none):

    VLM_MODEL_CORE_ARCHS=qwen2_vl pytest tests/service/model_core

Covers Qwen2-VL (flat patch rows, grid fields, M-RoPE; image and video), Mistral3/Pixtral
(non-contiguous is_embed: [IMG_BREAK] inside the range) and LLaVA-OneVision (anyres patches;
image and video). The reference is HF's own processor + `generate`, so the prompt vLLM's
renderer built (and the features crossing PromptToEngineInput) are checked too.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import pytest_asyncio

from vlm.testing.tiny_models import SPECS
from vlm.types import Sampling

from .conftest import _start, image
from .hf_reference import hf_greedy_from_media

pytestmark = pytest.mark.engine

ARCHS = [a for a in os.environ.get("VLM_MODEL_CORE_ARCHS", "qwen2_vl,mistral3,llava_onevision").split(",")
         if a and a != "none"]
N = 12
GREEDY = Sampling(temperature=0.0, max_tokens=N, ignore_eos=True)


@pytest_asyncio.fixture(scope="module", params=ARCHS or [pytest.param(None, marks=pytest.mark.skip(
    reason="VLM_MODEL_CORE_ARCHS=none"))])
async def harness(request, models_root):
    h = await _start(request.param, models_root)
    print(f"\n{request.param} engine start {h.start_seconds:.1f}s {h.engine.startup_seconds}")
    yield h
    await h.engine.close()


def video(seed: int, frames: int = 4, size: int = 56) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (frames, size, size, 3), dtype=np.uint8)


async def _tokens(h, prompt, rid):
    return [t async for c in h.engine.generate(rid, prompt, GREEDY) for t in c.token_ids]


async def test_images_match_hf(harness):
    h = harness
    tok = SPECS[h.arch].image_token
    for n in (1, 2):
        text = "USER: " + " ".join([tok] * n) + "\nWhat is in the picture? ASSISTANT:"
        imgs = [image(40 + k, (56 + 28 * k, 84)) for k in range(n)]
        prompt = h.prompt(text, image=imgs)
        hf_ids, hf_out = hf_greedy_from_media(str(h.model_dir), text, N, images=imgs)
        assert list(prompt.token_ids) == hf_ids
        got = await _tokens(h, prompt, f"img{n}")
        assert got == hf_out
        # hash-only replay gives the same tokens
        hash_only = dataclasses.replace(prompt, items=tuple(i.without_fields() for i in prompt.items))
        assert await _tokens(h, hash_only, f"img{n}-hash") == got


async def test_video_matches_hf(harness):
    h = harness
    tok = SPECS[h.arch].video_token
    if tok is None:
        pytest.skip(f"{h.arch} has no video support")
    text = f"USER: {tok}\nWhat happens in the video? ASSISTANT:"
    vid = video(7)
    prompt = h.prompt(text, video=[vid])
    hf_ids, hf_out = hf_greedy_from_media(str(h.model_dir), text, N, videos=[vid])
    assert list(prompt.token_ids) == hf_ids
    assert await _tokens(h, prompt, "vid") == hf_out
