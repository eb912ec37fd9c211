"""The model service's engine core on a tiny LLaVA, through vLLM's AsyncLLM (CPU)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import pytest
import torch

from model_svc.engine import Engine
from vlm.errors import AlreadyExists, InvalidArgument, MissingFeatures, ModelMismatch
from vlm.fingerprint import compute_fingerprint
from vlm.types import Chunk, FinishReason, ItemField, Modality, Prompt, Sampling

from .conftest import image
from .hf_reference import hf_greedy

pytestmark = pytest.mark.engine

GREEDY16 = Sampling(temperature=0.0, max_tokens=16, ignore_eos=True)
_ids = itertools.count()


def rid(name: str) -> str:
    return f"{name}-{next(_ids)}"


async def collect(engine: Engine, prompt: Prompt, sampling: Sampling, request_id: str | None = None) -> list[Chunk]:
    return [c async for c in engine.generate(request_id or rid("req"), prompt, sampling)]


def tokens(chunks: list[Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


async def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        load = engine.load()
        if load.running == 0 and load.waiting == 0 and engine._llm.get_num_unfinished_requests() == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.load()}")


ONE = "USER: <image>\nWhat is in this image? ASSISTANT:"
TWO = "USER: <image> and <image>\nCompare the two pictures. ASSISTANT:"


# ------------------------------------------------------------------------------- model facts


def test_model_info(llava):
    info = llava.engine.model_info()
    tok = llava.tokenizer
    assert info.fingerprint == compute_fingerprint(str(llava.model_dir), "auto", feature_dtype="float32")
    assert info.vocab_size == len(tok)
    assert info.max_model_len == 1024
    assert tok.eos_token_id in info.eos_token_ids
    (img,) = info.modalities
    assert img.modality is Modality.IMAGE
    assert img.placeholder_token_ids == (tok.convert_tokens_to_ids("<image>"),)
    assert img.placeholder_text == "<image>"
    assert img.max_items_per_prompt >= 2
    # Start-up probe: LLaVA's CLIP pixels have a fixed shape, hence a fixed embed count.
    spec = llava.engine.profile.modalities[Modality.IMAGE]
    assert spec.fields["pixel_values"].shape == (3, 32, 32)
    assert spec.fixed_embed_count == 16
    print(f"\nllava engine start {llava.start_seconds:.1f}s {llava.engine.startup_seconds}")


# ------------------------------------------------------------------------------- correctness


async def test_one_image_matches_hf(llava):
    prompt = llava.prompt(ONE, image=[image(1)])
    chunks = await collect(llava.engine, prompt, GREEDY16)
    got = tokens(chunks)
    assert got == hf_greedy(str(llava.model_dir), prompt, 16)
    # The test can tell images apart: another image changes the output.
    other = tokens(await collect(llava.engine, llava.prompt(ONE, image=[image(2)]), GREEDY16))
    assert other != got
    final = chunks[-1]
    assert final.finish_reason is FinishReason.LENGTH and final.stop_reason is None
    assert final.usage.prompt_tokens == len(prompt.token_ids) and final.usage.completion_tokens == 16
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])


async def test_two_images_match_hf(llava):
    prompt = llava.prompt(TWO, image=[image(3), image(4)])
    assert len(prompt.items) == 2
    t0 = asyncio.get_running_loop().time()
    got = tokens(await collect(llava.engine, prompt, GREEDY16))
    elapsed = asyncio.get_running_loop().time() - t0
    print(f"\n16 tokens (2 images) in {elapsed:.2f}s")
    assert got == hf_greedy(str(llava.model_dir), prompt, 16)
    swapped = llava.prompt(TWO, image=[image(4), image(3)])
    assert tokens(await collect(llava.engine, swapped, GREEDY16)) != got


async def test_streamed_text_equals_full_decode(llava):
    prompt = llava.prompt(ONE, image=[image(5)])
    chunks = await collect(llava.engine, prompt, GREEDY16)
    assert text(chunks) == llava.tokenizer.decode(tokens(chunks), skip_special_tokens=True)


async def test_hash_only_second_request_same_tokens(llava):
    prompt = llava.prompt(ONE, image=[image(6)])
    first = tokens(await collect(llava.engine, prompt, GREEDY16))
    hits = llava.engine.feature_store.hits
    hash_only = dataclasses.replace(prompt, items=tuple(i.without_fields() for i in prompt.items))
    assert tokens(await collect(llava.engine, hash_only, GREEDY16)) == first
    assert llava.engine.feature_store.hits == hits + 1
    assert llava.metrics.lookups[-1] == (1, 0)


async def test_unknown_hashes_missing_features(llava):
    prompt = llava.prompt(TWO, image=[image(7), image(8)])
    items = tuple(
        dataclasses.replace(i.without_fields(), hash=f"unknown-{k}") for k, i in enumerate(prompt.items)
    )
    with pytest.raises(MissingFeatures) as e:
        await collect(llava.engine, dataclasses.replace(prompt, items=items), GREEDY16)
    assert e.value.missing_hashes == ("unknown-0", "unknown-1")
    assert e.value.field == "prompt.items"
    assert llava.engine.in_flight() == 0


async def test_prefix_cache_reports_cached_tokens(llava):
    long_text = "USER: <image>\n" + "Describe the picture in detail. " * 40 + "ASSISTANT:"
    prompt = llava.prompt(long_text, image=[image(9)])
    s = Sampling(temperature=0.0, max_tokens=2)
    first = (await collect(llava.engine, prompt, s))[-1].usage
    second = (await collect(llava.engine, prompt, s))[-1].usage
    assert first.prompt_tokens == second.prompt_tokens == len(prompt.token_ids)
    assert second.cached_tokens > 0


# ------------------------------------------------------------------------------- sampling


async def test_seeded_sampling_reproducible(llava):
    prompt = llava.prompt(ONE, image=[image(10)])
    s = Sampling(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    a = tokens(await collect(llava.engine, prompt, s))
    b = tokens(await collect(llava.engine, prompt, s))
    c = tokens(await collect(llava.engine, prompt, dataclasses.replace(s, seed=4321)))
    assert a == b
    assert a != c


async def test_max_tokens(llava):
    prompt = llava.prompt(ONE, image=[image(11)])
    chunks = await collect(llava.engine, prompt, Sampling(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert len(tokens(chunks)) == 5
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].usage.completion_tokens == 5


async def test_stop_token_id(llava):
    prompt = llava.prompt(ONE, image=[image(12)])
    full = tokens(await collect(llava.engine, prompt, GREEDY16))
    stop_id = full[6]
    cut = full.index(stop_id)
    chunks = await collect(llava.engine, prompt, dataclasses.replace(GREEDY16, stop_token_ids=(stop_id,)))
    assert tokens(chunks) == full[: cut + 1]
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert chunks[-1].stop_reason == stop_id


async def test_stop_string(llava):
    prompt = llava.prompt(ONE, image=[image(13)])
    full_text = text(await collect(llava.engine, prompt, Sampling(temperature=0.0, max_tokens=32, ignore_eos=True)))
    candidates = [
        full_text[i : i + 2]
        for i in range(3, len(full_text) - 2)
        if full_text[i : i + 2].isprintable() and "\ufffd" not in full_text[i : i + 2]
    ]
    assert candidates, f"no usable stop string in {full_text!r}"
    stop = candidates[0]
    chunks = await collect(
        llava.engine, prompt, Sampling(temperature=0.0, max_tokens=32, ignore_eos=True, stop=(stop,))
    )
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert chunks[-1].stop_reason == stop
    assert text(chunks) == full_text[: full_text.index(stop)]


async def test_logprobs(llava):
    prompt = llava.prompt(ONE, image=[image(14)])
    chunks = await collect(llava.engine, prompt, Sampling(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2))
    lps = [lp for c in chunks for lp in c.logprobs]
    assert len(lps) == 4
    for tid, lp in zip(tokens(chunks), lps, strict=True):
        assert lp.sampled.token_id == tid and lp.sampled.rank == 1 and lp.sampled.logprob <= 0
        assert [t.rank for t in lp.top] == [1, 2]
        assert lp.top[0].token_id == tid


async def test_sampling_errors_name_the_field(llava):
    prompt = llava.prompt(ONE, image=[image(15)])
    cases = {
        "sampling.temperature": Sampling(temperature=-1.0),
        "sampling.top_p": Sampling(top_p=0.0),
        "sampling.max_tokens": Sampling(max_tokens=0),
        "sampling.presence_penalty": Sampling(presence_penalty=5.0),
        "sampling.logprobs": Sampling(logprobs=10_000),
        "sampling.stop_token_ids[1]": Sampling(stop_token_ids=(1, 10_000_000)),
    }
    for field, sampling in cases.items():
        with pytest.raises(InvalidArgument) as e:
            await collect(llava.engine, prompt, sampling)
        assert e.value.field == field, (field, e.value)
    assert llava.engine.in_flight() == 0


# ------------------------------------------------------------------------------- validation


async def test_validation_on_real_engine(llava):
    prompt = llava.prompt(ONE, image=[image(16)])
    item = prompt.items[0]
    fp = prompt.fingerprint
    with pytest.raises(ModelMismatch) as e:
        await collect(llava.engine, dataclasses.replace(prompt, fingerprint=dataclasses.replace(fp, config_hash="0" * 64)), GREEDY16)
    assert e.value.field == "prompt.fingerprint"
    # Features prepared in another dtype (a preprocessor started with another --dtype).
    with pytest.raises(ModelMismatch) as e:
        await collect(llava.engine, dataclasses.replace(prompt, fingerprint=dataclasses.replace(fp, feature_dtype="bfloat16")), GREEDY16)
    assert e.value.field == "prompt.fingerprint" and "bfloat16" in e.value.message
    # A text token inside the range.
    ids = list(prompt.token_ids)
    ids[item.placeholder.offset + 3] = llava.token_ids("cat")[0]
    with pytest.raises(InvalidArgument) as e:
        await collect(llava.engine, dataclasses.replace(prompt, token_ids=tuple(ids)), GREEDY16)
    assert e.value.field == f"prompt.token_ids[{item.placeholder.offset + 3}]"
    # A range one token short.
    short = dataclasses.replace(item, placeholder=dataclasses.replace(item.placeholder, length=item.placeholder.length - 1))
    with pytest.raises(InvalidArgument) as e:
        await collect(llava.engine, dataclasses.replace(prompt, items=(short,)), GREEDY16)
    assert e.value.field == "prompt.items[0].placeholder.length"
    # Pixels of the wrong size (would crash the vision tower).
    bad = dataclasses.replace(
        item, fields={"pixel_values": ItemField(torch.zeros(3, 64, 64), item.fields["pixel_values"].layout)}
    )
    with pytest.raises(InvalidArgument) as e:
        await collect(llava.engine, dataclasses.replace(prompt, items=(bad,)), GREEDY16)
    assert e.value.field == "prompt.items[0].fields.pixel_values.tensor.shape"
    assert llava.engine.healthy


# ------------------------------------------------------------------------------- lifecycle


async def test_cancel_mid_stream_frees_the_request(llava):
    prompt = llava.prompt(ONE, image=[image(17)])
    s = Sampling(temperature=0.0, max_tokens=400, ignore_eos=True)
    request_id = rid("cancel")
    stream = llava.engine.generate(request_id, prompt, s)
    seen = 0
    async for chunk in stream:
        seen += len(chunk.token_ids)
        if seen >= 3:
            break
    assert llava.engine.load().running == 1
    await stream.aclose()  # the consumer stops early
    await wait_idle(llava.engine)
    assert llava.engine.load().kv_cache_usage == 0.0
    assert llava.engine.in_flight() == 0
    stats = llava.metrics.finished[-1]
    assert stats.request_id == request_id and stats.finish_reason is FinishReason.ABORT
    assert 3 <= stats.generation_tokens < 400


async def test_task_cancellation_aborts(llava):
    prompt = llava.prompt(ONE, image=[image(18)])
    s = Sampling(temperature=0.0, max_tokens=400, ignore_eos=True)
    started = asyncio.Event()

    async def consume():
        async for _ in llava.engine.generate(rid("task"), prompt, s):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(llava.engine)


async def test_abort_ends_stream_with_abort_chunk(llava):
    prompt = llava.prompt(ONE, image=[image(19)])
    request_id = rid("abort")
    chunks = []
    async for chunk in llava.engine.generate(request_id, prompt, Sampling(temperature=0.0, max_tokens=400, ignore_eos=True)):
        chunks.append(chunk)
        if len(chunks) == 2:
            assert await llava.engine.abort(request_id) is True
    assert chunks[-1].finish_reason is FinishReason.ABORT
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens < 400
    assert await llava.engine.abort(request_id) is False
    await wait_idle(llava.engine)


async def test_duplicate_in_flight_request_id(llava):
    prompt = llava.prompt(ONE, image=[image(20)])
    request_id = rid("dup")
    stream = llava.engine.generate(request_id, prompt, Sampling(temperature=0.0, max_tokens=100, ignore_eos=True))
    await stream.__anext__()
    with pytest.raises(AlreadyExists) as e:
        await collect(llava.engine, prompt, GREEDY16, request_id=request_id)
    assert e.value.field == "request_id"
    await stream.aclose()
    await wait_idle(llava.engine)
    # Once finished, the ID may be reused.
    assert len(tokens(await collect(llava.engine, prompt, GREEDY16, request_id=request_id))) == 16


async def test_concurrent_requests_batch(llava):
    prompts = [llava.prompt(ONE, image=[image(30 + k)]) for k in range(4)]
    t0 = asyncio.get_running_loop().time()
    solo = [tokens(await collect(llava.engine, p, GREEDY16)) for p in prompts]
    elapsed = asyncio.get_running_loop().time() - t0
    print(f"\n4 sequential x 16 tokens in {elapsed:.2f}s ({64 / elapsed:.0f} tok/s)")
    t0 = asyncio.get_running_loop().time()
    together = await asyncio.gather(*(collect(llava.engine, p, GREEDY16) for p in prompts))
    elapsed = asyncio.get_running_loop().time() - t0
    print(f"\n4 concurrent x 16 tokens in {elapsed:.2f}s ({64 / elapsed:.0f} tok/s)")
    assert [tokens(c) for c in together] == solo


async def test_request_stats_hook(llava):
    prompt = llava.prompt(ONE, image=[image(21)])
    request_id = rid("stats")
    await collect(llava.engine, prompt, GREEDY16, request_id=request_id)
    stats = llava.metrics.finished[-1]
    assert stats.request_id == request_id
    assert stats.finish_reason is FinishReason.LENGTH and stats.error is None
    assert stats.prompt_tokens == len(prompt.token_ids) and stats.generation_tokens == 16
    assert 0 < stats.time_to_first_token <= stats.e2e_latency
    assert len(stats.inter_token_latencies) == 15
    load = llava.engine.load()
    assert load.feature_store_items >= 1 and load.feature_store_bytes > 0


async def test_prompt_through_the_wire_format(llava):
    """Features decoded from protobuf are read-only views over the message bytes: still fine."""
    from vlm import convert
    from vlm.common.v1 import multimodal_pb2

    prompt = llava.prompt(TWO, image=[image(22), image(23)])
    direct = tokens(await collect(llava.engine, prompt, GREEDY16))
    wire = multimodal_pb2.PreprocessedPrompt.FromString(convert.encode_prompt(prompt).to_bytes())
    decoded = convert.prompt_from_pb(wire)
    assert tokens(await collect(llava.engine, decoded, GREEDY16)) == direct
