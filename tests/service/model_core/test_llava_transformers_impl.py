"""The same LLaVA served with vLLM's Transformers backend (model_impl="transformers")."""

from __future__ import annotations

import pytest

from vlm.errors import ModelMismatch
from vlm.types import Sampling

from .conftest import image
from .hf_reference import hf_greedy
from .test_llava_engine import GREEDY16, ONE, TWO, collect, tokens

pytestmark = pytest.mark.engine


async def test_transformers_backend_gives_the_same_tokens(llava, llava_transformers):
    info = llava_transformers.engine.model_info()
    assert info.fingerprint.model_impl == "transformers"
    assert info.fingerprint.config_hash != llava.engine.model_info().fingerprint.config_hash
    print(f"\nllava (transformers impl) engine start {llava_transformers.start_seconds:.1f}s")
    for text, images in ((ONE, [image(1)]), (TWO, [image(3), image(4)])):
        native = llava.prompt(text, image=images)
        backend = llava_transformers.prompt(text, image=images)
        assert backend.token_ids == native.token_ids
        got = tokens(await collect(llava_transformers.engine, backend, GREEDY16))
        assert got == tokens(await collect(llava.engine, native, GREEDY16))
        assert got == hf_greedy(str(llava.model_dir), native, 16)
    # A prompt prepared for the native implementation is refused.
    with pytest.raises(ModelMismatch):
        await collect(llava_transformers.engine, llava.prompt(ONE, image=[image(1)]), Sampling(max_tokens=1))
