"""Fuzzing the model service: hypothesis mutates valid `PreprocessedPrompt`s (their fields, then
maybe the serialized request bytes) and sends each to `llava_pipeline`'s real model service over
gRPC, with a deadline per call.

For every mutation:

* the call ends within the deadline (no hang) with OK, INVALID_ARGUMENT or FAILED_PRECONDITION
  (or, for bytes protobuf cannot parse, the UNKNOWN grpc answers before any handler runs; see
  `DESERIALIZER_GAP` in test_bad_input_corpus.py) — never INTERNAL or UNAVAILABLE (a crash);
* a refusal names a reason in the trailers, and a field unless the bytes were undecodable;
* an accepted call (its first chunk arrived: the request reached the engine) must be valid by
  an independent oracle written here from the model's facts (fingerprint, vocabulary, length,
  ranges, placeholder tokens, field spec of the base prompt, hash = `vlm.digest.item_digest`,
  known hashes): no mutation may reach the engine invalid. Accepted streams are cancelled after
  their first chunk, so a valid mutation costs one token.

Afterwards the service is SERVING, it reports exactly as many engine requests as were accepted,
and a good request still returns HF's greedy tokens.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass, field

import grpc
import pytest
import torch
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import engine_finished_requests, png
from tests.service.model_core.hf_reference import hf_greedy
from vlm import codec, convert, types
from vlm.client import PreprocessorClient, upstream_error
from vlm.common.v1 import generation_pb2 as gen_pb
from vlm.common.v1 import multimodal_pb2 as mm_pb
from vlm.digest import item_digest
from vlm.model.v1 import model_pb2
from vlm.server import channel_options

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

IMAGE = types.Modality.IMAGE
MODEL_GENERATE = "/vlm.model.v1.ModelService/Generate"
#: Per call: a refusal comes back in milliseconds, an accepted call after one token.
CALL_DEADLINE_S = 20.0
#: About 50 s on 2 shared cores (hypothesis runs some more calls than this: overruns, replays).
MAX_EXAMPLES = 500
#: vLLM's default VLLM_MAX_STOP_STRINGS.
MAX_STOP_STRINGS = 4
ALLOWED_REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}


# ---------------------------------------------------------------------------------------------
# The oracle: what a valid prompt for the tiny LLaVA is, independently of model_svc.validation
# ---------------------------------------------------------------------------------------------


@dataclass
class Facts:
    fingerprint: mm_pb.ModelFingerprint
    vocab_size: int
    max_model_len: int
    image_token: int
    #: The base prompt's one image field (name, layout, dtype, shape, keep_on_cpu) and the
    #: embedding positions every LLaVA item has.
    field_name: str
    field_spec: mm_pb.ItemField
    embeds: int
    #: (modality, hash) the model service holds verified features for.
    stored: set[tuple[int, str]] = field(default_factory=set)


def _digest_ok(item: mm_pb.MultiModalItem) -> bool:
    domain = convert.item_from_pb(item, field="item")
    return item_digest(domain.modality, domain.fields or {}) == item.hash


def invalid_because(req: model_pb2.GenerateRequest, facts: Facts) -> str | None:
    """Why `req` must not reach the engine, or None when it is valid."""
    p, s = req.prompt, req.sampling
    fp, want = p.fingerprint, facts.fingerprint
    # model_id is informational (a hub id on one side may be a local path on the other).
    if (fp.model_impl, fp.config_hash, fp.feature_dtype) != (want.model_impl, want.config_hash, want.feature_dtype):
        return "fingerprint"
    ids = list(p.token_ids)
    n = len(ids)
    if not 0 < n < facts.max_model_len:
        return f"{n} tokens"
    if any(t >= facts.vocab_size for t in ids):
        return "token outside the vocabulary"
    prev_end, covered = 0, [False] * n
    in_request = {(it.modality, it.hash) for it in p.items if it.fields}
    for i, item in enumerate(p.items):
        if item.modality != mm_pb.MODALITY_IMAGE:
            return f"items[{i}] modality {item.modality}"
        if not item.hash:
            return f"items[{i}] without hash"
        off, length = item.placeholder.offset, item.placeholder.length
        if off < prev_end or length < 1 or off + length > n:
            return f"items[{i}] range [{off}, {off + length}) after {prev_end} in {n}"
        mask = list(item.placeholder.is_embed)
        if mask and len(mask) != length:
            return f"items[{i}] is_embed length"
        positions = [off + j for j in range(length) if not mask or mask[j]]
        if len(positions) != facts.embeds:
            return f"items[{i}] has {len(positions)} embeds"
        if any(ids[k] != facts.image_token for k in positions):
            return f"items[{i}] embeds a text token"
        for k in range(off, off + length):
            covered[k] = True
        prev_end = off + length
        if item.fields:
            if set(item.fields) != {facts.field_name}:
                return f"items[{i}] fields {sorted(item.fields)}"
            f, spec = item.fields[facts.field_name], facts.field_spec
            if (f.layout, f.keep_on_cpu, f.tensor.dtype, list(f.tensor.shape), len(f.tensor.data)) != (
                spec.layout, spec.keep_on_cpu, spec.tensor.dtype, list(spec.tensor.shape), len(spec.tensor.data)
            ):
                return f"items[{i}] field spec"
            if not _digest_ok(item):
                return f"items[{i}] hash is not the digest"
        elif (item.modality, item.hash) not in facts.stored | in_request:
            return f"items[{i}] unknown hash"
    if any(t == facts.image_token and not covered[k] for k, t in enumerate(ids)):
        return "image token outside every range"
    if len(s.stop) > MAX_STOP_STRINGS:
        return "stop strings"
    if any(t >= facts.vocab_size for t in s.stop_token_ids):
        return "stop token outside the vocabulary"
    if s.HasField("max_tokens") and s.max_tokens >= 1 and n + s.max_tokens > facts.max_model_len:
        return "max_tokens over the context"
    # The other sampling values are vLLM's own `SamplingParams` checks: what it accepts is valid.
    return None


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------

UINT32_EDGES = [0, 1, 2, 3, 15, 16, 17, 18, 19, 20, 35, 480, 481, 1023, 1024, (1 << 31) - 1, 1 << 31, (1 << 32) - 1]
INT64_EDGES = [0, 1, -1, 3, 32, 1 << 31, -(1 << 31), (1 << 40), (1 << 63) - 1, -(1 << 63)]
FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 2.5, 1e-9, float("nan"), float("inf"), float("-inf")]),
    st.floats(width=32),
)


def uint32s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(UINT32_EDGES), st.integers(0, (1 << 32) - 1))


def _index(data: st.DataObject, size: int) -> int | None:
    return data.draw(st.integers(0, size - 1)) if size else None


def _item(data: st.DataObject, p: mm_pb.PreprocessedPrompt) -> mm_pb.MultiModalItem | None:
    i = _index(data, len(p.items))
    return None if i is None else p.items[i]


def _set_list(rep, values) -> None:
    del rep[:]
    rep.extend(values)


def m_token_set(data, p, s, ctx):
    k = _index(data, len(p.token_ids))
    if k is not None:
        p.token_ids[k] = data.draw(uint32s())


def m_token_delete(data, p, s, ctx):
    k = _index(data, len(p.token_ids))
    if k is not None:
        ids = list(p.token_ids)
        del ids[k]
        _set_list(p.token_ids, ids)


def m_token_insert(data, p, s, ctx):
    ids = list(p.token_ids)
    ids.insert(data.draw(st.integers(0, len(ids))), data.draw(st.one_of(st.just(ctx.image_token), uint32s())))
    _set_list(p.token_ids, ids)


def m_tokens_extend(data, p, s, ctx):
    p.token_ids.extend([data.draw(st.sampled_from([5, ctx.image_token]))] * data.draw(st.sampled_from([1, 16, 1100])))


def m_offset(data, p, s, ctx):
    if (item := _item(data, p)) is not None:
        item.placeholder.offset = data.draw(uint32s())


def m_length(data, p, s, ctx):
    if (item := _item(data, p)) is not None:
        item.placeholder.length = data.draw(uint32s())


def m_is_embed(data, p, s, ctx):
    if (item := _item(data, p)) is not None:
        n = data.draw(st.sampled_from([0, item.placeholder.length, item.placeholder.length + 1, 3]))
        n = min(n, 1 << 16)  # the length may be any uint32; the mask stays a sane message
        # Hypothesis cannot draw lists this long element by element: repeat a drawn pattern.
        pattern = data.draw(st.lists(st.booleans(), min_size=1, max_size=8))
        _set_list(item.placeholder.is_embed, (pattern * (n // len(pattern) + 1))[:n])


def m_modality(data, p, s, ctx):
    if (item := _item(data, p)) is not None:
        item.modality = data.draw(st.integers(0, 6))


def m_hash(data, p, s, ctx):
    if (item := _item(data, p)) is not None:
        item.hash = data.draw(st.one_of(
            st.sampled_from(["", "f" * 64, ctx.other_hash, *[it.hash for it in p.items]]),
            st.text(max_size=80),
        ))


def m_hash_only(data, p, s, ctx):
    if (item := _item(data, p)) is not None:
        item.ClearField("fields")


def m_field_name(data, p, s, ctx):
    if (item := _item(data, p)) is not None and item.fields:
        name = next(iter(item.fields))
        f = mm_pb.ItemField()
        f.CopyFrom(item.fields[name])
        del item.fields[name]
        new = data.draw(st.one_of(st.sampled_from(["", "image_sizes", "pixel_values_videos"]), st.text(max_size=20)))
        item.fields[new].CopyFrom(f)


def m_field_extra(data, p, s, ctx):
    if (item := _item(data, p)) is not None:
        item.fields["image_sizes"].CopyFrom(mm_pb.ItemField(
            tensor=codec.encode(torch.tensor([32, 32])), layout=mm_pb.FIELD_LAYOUT_BATCHED))


def _field(data, p) -> mm_pb.ItemField | None:
    item = _item(data, p)
    if item is None or not item.fields:
        return None
    return item.fields[data.draw(st.sampled_from(sorted(item.fields)))]


def m_layout(data, p, s, ctx):
    if (f := _field(data, p)) is not None:
        f.layout = data.draw(st.integers(0, 5))


def m_flat_dim(data, p, s, ctx):
    if (f := _field(data, p)) is not None:
        f.layout = data.draw(st.sampled_from([mm_pb.FIELD_LAYOUT_FLAT, f.layout]))
        f.flat_dim = data.draw(st.one_of(st.integers(-5, 5), st.sampled_from([-(1 << 31), (1 << 31) - 1])))


def m_keep_on_cpu(data, p, s, ctx):
    if (f := _field(data, p)) is not None:
        f.keep_on_cpu = not f.keep_on_cpu


def m_dtype(data, p, s, ctx):
    if (f := _field(data, p)) is not None:
        f.tensor.dtype = data.draw(st.integers(0, 12))


def m_shape(data, p, s, ctx):
    if (f := _field(data, p)) is not None:
        shape = list(f.tensor.shape)
        choice = data.draw(st.sampled_from(["dim", "drop", "add", "any"]))
        if choice == "dim" and shape:
            k = data.draw(st.integers(0, len(shape) - 1))
            shape[k] = data.draw(st.one_of(st.sampled_from(INT64_EDGES), st.integers(-4, 70)))
        elif choice == "drop" and shape:
            shape.pop()
        elif choice == "add":
            shape.append(data.draw(st.sampled_from([1, 2, 0])))
        else:
            shape = data.draw(st.lists(st.sampled_from(INT64_EDGES + [16, 48]), max_size=10))
        _set_list(f.tensor.shape, shape)


def m_data(data, p, s, ctx):
    if (f := _field(data, p)) is not None:
        raw = f.tensor.data
        choice = data.draw(st.sampled_from(["cut", "grow", "flip", "empty", "nan"]))
        if choice == "cut":
            f.tensor.data = raw[: data.draw(st.integers(0, max(len(raw) - 1, 0)))]
        elif choice == "grow":
            f.tensor.data = raw + data.draw(st.binary(min_size=1, max_size=8))
        elif choice == "flip" and raw:
            k = data.draw(st.integers(0, len(raw) - 1))
            f.tensor.data = raw[:k] + bytes([raw[k] ^ data.draw(st.integers(1, 255))]) + raw[k + 1:]
        elif choice == "nan":
            f.tensor.data = b"\x00\x00\xc0\x7f" * (len(raw) // 4)  # float32 NaN everywhere
        else:
            f.tensor.data = b""


def m_fingerprint(data, p, s, ctx):
    name = data.draw(st.sampled_from(["model_id", "model_impl", "config_hash", "feature_dtype"]))
    setattr(p.fingerprint, name, data.draw(st.one_of(
        st.sampled_from(["", "auto", "transformers", "float16", "bfloat16", "float32", "0" * 64]),
        st.text(max_size=70),
    )))


def m_items(data, p, s, ctx):
    items = [mm_pb.MultiModalItem() for _ in p.items]
    for a, b in zip(items, p.items):
        a.CopyFrom(b)
    choice = data.draw(st.sampled_from(["delete", "duplicate", "reverse", "clear"]))
    if choice == "delete" and items:
        del items[data.draw(st.integers(0, len(items) - 1))]
    elif choice == "duplicate" and items:
        items.append(items[data.draw(st.integers(0, len(items) - 1))])
    elif choice == "reverse":
        items.reverse()
    elif choice == "clear":
        items = []
    del p.items[:]
    p.items.extend(items)


def m_prompt_text(data, p, s, ctx):
    p.prompt_text = data.draw(st.text(max_size=40))


def m_sampling(data, p, s, ctx):
    name = data.draw(st.sampled_from([
        "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens", "stop",
        "stop_token_ids", "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs",
        "skip_special_tokens", "ignore_eos",
    ]))
    if name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
        setattr(s, name, data.draw(FLOATS))
    elif name == "top_k":
        s.top_k = data.draw(st.one_of(st.integers(-3, 3), st.sampled_from([-(1 << 31), (1 << 31) - 1])))
    elif name == "seed":
        s.seed = data.draw(st.sampled_from(INT64_EDGES))
    elif name == "max_tokens":
        s.max_tokens = data.draw(st.one_of(st.integers(0, 3), st.integers(1100, (1 << 32) - 1)))
    elif name == "min_tokens":
        s.min_tokens = data.draw(st.one_of(st.integers(0, 3), st.sampled_from([1100, (1 << 32) - 1])))
    elif name == "stop":
        _set_list(s.stop, data.draw(st.lists(st.text(max_size=4), max_size=7)))
    elif name == "stop_token_ids":
        _set_list(s.stop_token_ids, data.draw(st.lists(uint32s(), max_size=5)))
    elif name == "logprobs":
        s.logprobs = data.draw(st.one_of(st.integers(0, 25), st.sampled_from([(1 << 32) - 1])))
    elif name == "skip_special_tokens":
        s.skip_special_tokens = data.draw(st.booleans())
    else:
        s.ignore_eos = data.draw(st.booleans())


FIELD_MUTATIONS = [
    m_token_set, m_token_delete, m_token_insert, m_tokens_extend, m_offset, m_length, m_is_embed,
    m_modality, m_hash, m_hash_only, m_field_name, m_field_extra, m_layout, m_flat_dim, m_keep_on_cpu,
    m_dtype, m_shape, m_data, m_fingerprint, m_items, m_prompt_text, m_sampling,
]


def mutate_bytes(data: st.DataObject, raw: bytes) -> bytes:
    """One byte-level edit, biased to the first bytes (request id, fingerprint, token IDs, item
    headers): the tensor bytes that make up most of the message are covered by the field edits."""
    pos = data.draw(st.one_of(st.integers(0, min(len(raw), 400)), st.integers(0, len(raw))))
    choice = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "varint"]))
    if choice == "flip" and pos < len(raw):
        return raw[:pos] + bytes([raw[pos] ^ data.draw(st.integers(1, 255))]) + raw[pos + 1:]
    if choice == "truncate":
        return raw[:pos]
    if choice == "insert":
        return raw[:pos] + data.draw(st.binary(min_size=1, max_size=12)) + raw[pos:]
    if choice == "varint":
        return raw[:pos] + b"\xff" * data.draw(st.integers(1, 11)) + raw[pos:]
    return raw[:pos] + raw[pos + data.draw(st.integers(1, 64)):]


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class Fuzz:
    bases: list[mm_pb.PreprocessedPrompt]
    facts: Facts
    other_hash: str
    image_token: int
    channel: grpc.aio.Channel
    #: The engine's finished-request count when the fuzz started.
    engine_requests_before: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    accepted: int = 0
    examples: int = 0

    async def send(self, raw: bytes) -> tuple[str, grpc.aio.AioRpcError | None]:
        """'accepted' once the first chunk arrives (the stream is then cancelled), else the error."""
        call = self.channel.unary_stream(MODEL_GENERATE)(raw, timeout=CALL_DEADLINE_S)
        try:
            async for _ in call:
                return "accepted", None
            return "empty", None
        except grpc.aio.AioRpcError as err:
            return "refused", err
        finally:
            call.cancel()


def _parse(raw: bytes) -> model_pb2.GenerateRequest | None:
    try:
        return model_pb2.GenerateRequest.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError (and friends)
        return None


async def _prompt_pb(pre: PreprocessorClient, text: str, seeds: tuple[int, ...]) -> mm_pb.PreprocessedPrompt:
    prompt = await pre.preprocess(types.PromptInput(text=text, media=tuple(types.Media(IMAGE, png(s)) for s in seeds)))
    return mm_pb.PreprocessedPrompt.FromString(convert.encode_prompt(prompt).to_bytes())


async def _idle(pipeline) -> None:
    """Until the engine runs nothing (the cancelled streams' aborts have landed)."""
    async with pipeline.model_client() as model:
        for _ in range(100):
            load = await model.load()
            if (load.running, load.waiting) == (0, 0):
                return
            await asyncio.sleep(0.1)
    raise AssertionError(f"the engine is still busy: {load}")



@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fuzz(llava_pipeline):
    tok = "<image>"
    async with llava_pipeline.pre_client() as pre:
        one = await _prompt_pb(pre, f"{tok}\nDescribe.", (51,))
        two = await _prompt_pb(pre, f"A {tok}\nand{tok}\nB.", (52, 53))
        text = await _prompt_pb(pre, "Just some text.", ())
        other = await _prompt_pb(pre, f"{tok}\nDescribe.", (54,))
        info = await pre.model_info()
    (image,) = [m for m in info.modalities if m.modality is IMAGE]
    item = one.items[0]
    (name,) = item.fields
    facts = Facts(
        fingerprint=one.fingerprint, vocab_size=info.vocab_size, max_model_len=info.max_model_len,
        image_token=image.placeholder_token_ids[0], field_name=name, field_spec=item.fields[name],
        embeds=item.placeholder.length,
    )
    async with grpc.aio.insecure_channel(llava_pipeline.model_target, options=channel_options()) as channel:
        f = Fuzz([one, two, text], facts, other.items[0].hash, facts.image_token, channel)
        # The base prompts, unmutated, are accepted (and their items stored).
        for base in f.bases:
            req = model_pb2.GenerateRequest(request_id=uuid.uuid4().hex, prompt=base,
                                            sampling=gen_pb.SamplingParams(max_tokens=1))
            assert (await f.send(req.SerializeToString()))[0] == "accepted"
            facts.stored |= {(it.modality, it.hash) for it in base.items}
        await _idle(llava_pipeline)
        f.engine_requests_before = engine_finished_requests(llava_pipeline)
        yield f


@settings(
    max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
async def test_mutated_prompts_never_reach_the_engine_invalid(fuzz, data) -> None:
    fuzz.examples += 1
    base = fuzz.bases[data.draw(st.integers(0, len(fuzz.bases) - 1), label="base")]
    prompt = mm_pb.PreprocessedPrompt()
    prompt.CopyFrom(base)
    sampling = gen_pb.SamplingParams(temperature=0.0, max_tokens=1)
    for mutation in data.draw(st.lists(st.sampled_from(FIELD_MUTATIONS), min_size=0, max_size=3), label="mutations"):
        mutation(data, prompt, sampling, fuzz)
    raw = model_pb2.GenerateRequest(request_id=uuid.uuid4().hex, prompt=prompt, sampling=sampling).SerializeToString()
    if data.draw(st.sampled_from([False] * 5 + [True]), label="byte edit"):
        raw = mutate_bytes(data, raw)

    outcome, err = await asyncio.wait_for(fuzz.send(raw), CALL_DEADLINE_S + 10)
    request = _parse(raw)
    if outcome != "refused":
        fuzz.accepted += 1
        fuzz.outcomes["OK"] += 1
        assert outcome == "accepted", "a stream ended without a single chunk"
        assert request is not None, "undecodable bytes were accepted"
        why = invalid_because(request, fuzz.facts)
        assert why is None, f"an invalid prompt reached the engine: {why}"
        fuzz.facts.stored |= {(it.modality, it.hash) for it in request.prompt.items if it.fields}
        return
    code = err.code()
    fuzz.outcomes[code.name] += 1
    if request is None and code is grpc.StatusCode.UNKNOWN:
        # Undecodable bytes: grpc's own deserializer answers before any handler (the gap).
        assert "DecodeError" in (err.details() or ""), err.details()
        return
    assert code in ALLOWED_REFUSALS, (code, err.details())
    exc = upstream_error(err)
    assert exc.reason not in ("", "UPSTREAM"), err.details()
    if request is None:
        return  # refused as undecodable (once the deserializer gap is closed): no field needed
    assert exc.upstream_field, (code, err.details())
    if exc.reason == "MISSING_FEATURES":
        # Verified items of a request refused for unknown hashes were stored all the same.
        fuzz.facts.stored |= {(it.modality, it.hash) for it in request.prompt.items if it.fields}


async def test_after_the_fuzz_the_service_serves_exactly(fuzz, llava_pipeline) -> None:
    print(f"\nfuzz: {fuzz.examples} examples, outcomes {dict(fuzz.outcomes)}")
    assert fuzz.examples >= MAX_EXAMPLES // 2
    async with grpc.aio.insecure_channel(llava_pipeline.model_target) as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    await _idle(llava_pipeline)
    # Exactly the accepted mutations reached the engine (the count lands as each stream closes).
    for _ in range(50):
        reached = engine_finished_requests(llava_pipeline) - fuzz.engine_requests_before
        if reached >= fuzz.accepted:
            break
        await asyncio.sleep(0.1)
    assert reached == fuzz.accepted
    async with llava_pipeline.pre_client() as pre, llava_pipeline.model_client() as model:
        prompt = await pre.preprocess(
            types.PromptInput(text="<image>\nWhat is it?", media=(types.Media(IMAGE, png(55)),)))
        greedy = types.Sampling(temperature=0.0, max_tokens=8, ignore_eos=True)
        got = [t async for chunk in model.generate(prompt, greedy, hash_only=False) for t in chunk.token_ids]
    assert got == await asyncio.to_thread(hf_greedy, str(llava_pipeline.model_dir), prompt, 8)
