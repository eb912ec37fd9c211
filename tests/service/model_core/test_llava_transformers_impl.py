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


async def test_engine_death_turns_unavailable(llava_transformers):
    """Kill the engine-core process mid-stream (the last use of this session's engine)."""
    import asyncio
    import os
    import signal

    from vlm.errors import Unavailable

    engine = llava_transformers.engine
    prompt = llava_transformers.prompt(ONE, image=[image(1)])
    procs = engine._llm.engine_core.resources.engine_manager.processes
    assert engine.healthy and procs
    with pytest.raises(Unavailable):
        async for chunk in engine.generate("doomed", prompt, Sampling(temperature=0.0, max_tokens=500, ignore_eos=True)):
            if chunk.token_ids and procs[0].is_alive():
                os.kill(procs[0].pid, signal.SIGKILL)
    for _ in range(100):
        if not engine.healthy:
            break
        await asyncio.sleep(0.05)
    assert not engine.healthy and engine.errored
    assert engine.in_flight() == 0
    with pytest.raises(Unavailable):
        await engine.generate("after", prompt, GREEDY16).__anext__()
