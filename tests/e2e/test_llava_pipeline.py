"""Preprocessor → model service over real gRPC on loopback, tiny LLaVA."""

from __future__ import annotations

import asyncio
import dataclasses
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.conftest import png
from tests.service.model_core.hf_reference import hf_greedy
from vlm import types
from vlm.errors import UpstreamError
from vlm.testing.tiny_models import SPECS

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

IMAGE = types.Modality.IMAGE


def _img(seed: int) -> types.Media:
    return types.Media(IMAGE, png(seed), "image/png")


def _text_prompt(n_images: int, seeds=(1, 2, 3), suffix: str = "Describe.") -> types.PromptInput:
    tok = SPECS["llava"].image_token
    text = "".join(f"{tok}\n" for _ in range(n_images)) + suffix
    return types.PromptInput(text=text, media=tuple(_img(s) for s in seeds[:n_images]))


GREEDY = types.Sampling(temperature=0.0, max_tokens=16, ignore_eos=True)


async def _collect(stream) -> tuple[list[int], str, types.Chunk]:
    ids, text, last = [], [], None
    async for chunk in stream:
        ids.extend(chunk.token_ids)
        text.append(chunk.text)
        last = chunk
    return ids, "".join(text), last


@pytest.mark.parametrize("n_images", [1, 2])
async def test_greedy_tokens_equal_hf(llava_pipeline, n_images: int) -> None:
    prompt_in = _text_prompt(n_images)
    async with llava_pipeline.pre_client() as pre:
        prompt = await pre.preprocess(prompt_in)
        assert [i.modality for i in prompt.items] == [IMAGE] * n_images
        ids, text, last = await _collect(pre.generate(prompt_in, GREEDY))
    expected = await asyncio.to_thread(hf_greedy, str(llava_pipeline.model_dir), prompt, 16)
    assert ids == expected
    assert last.finish_reason is types.FinishReason.LENGTH
    assert last.usage.prompt_tokens == len(prompt.token_ids)
    assert last.usage.completion_tokens == 16


async def test_chat_and_token_ids_inputs_reach_the_engine(llava_pipeline) -> None:
    async with llava_pipeline.pre_client() as pre:
        chat = types.PromptInput(messages=(
            types.ChatMessage("user", (types.ChatPart(media=_img(4)), types.ChatPart(text="What is it?"))),
        ))
        chat_prompt = await pre.preprocess(chat)
        ids_chat, _, _ = await _collect(pre.generate(chat, GREEDY))
        assert ids_chat == await asyncio.to_thread(hf_greedy, str(llava_pipeline.model_dir), chat_prompt, 16)

        # Tokens + media: the unexpanded token IDs of the same text.
        info = await pre.model_info()
        image_tok = next(m for m in info.modalities if m.modality is IMAGE).placeholder_token_ids[0]
        tokens = types.PromptInput(token_ids=(image_tok, 11, 12, 13), media=(_img(5),))
        tok_prompt = await pre.preprocess(tokens)
        assert tok_prompt.items[0].placeholder.length > 1
        ids_tok, _, _ = await _collect(pre.generate(tokens, GREEDY))
        assert ids_tok == await asyncio.to_thread(hf_greedy, str(llava_pipeline.model_dir), tok_prompt, 16)


async def test_second_request_goes_hash_only(llava_pipeline) -> None:
    # Long enough to fill whole KV blocks, which is what the prefix cache shares.
    prompt_in = _text_prompt(1, seeds=(9,), suffix="Describe the picture in detail. " * 40)
    metrics_url = f"http://127.0.0.1:{llava_pipeline.model.grpc.metrics_port}/metrics"

    def hits() -> float:
        body = urllib.request.urlopen(metrics_url).read().decode()
        line = next(l for l in body.splitlines() if l.startswith("vlm_feature_store_hits_total"))
        return float(line.split()[-1])

    async with llava_pipeline.pre_client() as pre:
        before = await asyncio.to_thread(hits)
        first, _, _ = await _collect(pre.generate(prompt_in, GREEDY))
        second, _, last = await _collect(pre.generate(prompt_in, GREEDY))
    assert first == second
    # The second request's item was resolved from the model service's feature store.
    assert await asyncio.to_thread(hits) == before + 1
    assert last.usage.cached_tokens > 0, last.usage  # and vLLM's prefix cache saw the same hash


async def test_unknown_hash_is_failed_precondition_listing_it(llava_pipeline) -> None:
    async with llava_pipeline.pre_client() as pre:
        prompt = await pre.preprocess(_text_prompt(1, seeds=(21,)))
    bogus = types.Prompt(
        prompt.fingerprint, prompt.token_ids,
        (types.Item(IMAGE, "f" * 64, prompt.items[0].placeholder, None),),
    )
    async with llava_pipeline.model_client() as model:
        with pytest.raises(UpstreamError) as exc:
            await _collect(model.generate(bogus, GREEDY, hash_only=False))
    assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert exc.value.reason == "MISSING_FEATURES"
    assert exc.value.missing_hashes == ("f" * 64,)


async def test_forged_hash_cannot_poison_the_caches(llava_pipeline) -> None:
    """B's features sent straight to the model service under A's hash are refused (the hash
    must be the digest of the fields), so a victim asking about A, first in full and then
    hash-only, gets HF's tokens for A."""
    prompt_a_in, prompt_b_in = _text_prompt(1, seeds=(31,)), _text_prompt(1, seeds=(32,))
    async with llava_pipeline.pre_client() as pre:
        a, b = await pre.preprocess(prompt_a_in), await pre.preprocess(prompt_b_in)
    assert a.items[0].hash != b.items[0].hash
    forged = types.Prompt(a.fingerprint, a.token_ids, (
        types.Item(IMAGE, a.items[0].hash, a.items[0].placeholder, b.items[0].fields),))
    async with llava_pipeline.model_client() as model:
        with pytest.raises(UpstreamError) as exc:
            await _collect(model.generate(forged, GREEDY, hash_only=False))
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.value.upstream_field == "prompt.items[0].hash"
        # Nothing was stored under A's hash: a hash-only A is still unknown.
        with pytest.raises(UpstreamError) as exc:
            await _collect(model.generate(dataclasses.replace(a, items=(a.items[0].without_fields(),)),
                                          GREEDY, hash_only=False))
        assert exc.value.reason == "MISSING_FEATURES"
    expected = await asyncio.to_thread(hf_greedy, str(llava_pipeline.model_dir), a, 16)
    async with llava_pipeline.pre_client() as pre:
        victim_full, _, _ = await _collect(pre.generate(prompt_a_in, GREEDY))
        victim_again, _, _ = await _collect(pre.generate(prompt_a_in, GREEDY))  # hash-only now
    assert victim_full == expected and victim_again == expected


async def test_bad_media_is_invalid_argument_and_service_stays_up(llava_pipeline) -> None:
    async with llava_pipeline.pre_client() as pre:
        bad = types.PromptInput(text=SPECS["llava"].image_token + " hi", media=(types.Media(IMAGE, b"\x89PNG\r\n\x1a\nbroken"),))
        with pytest.raises(UpstreamError) as exc:
            await pre.preprocess(bad)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "media[0]" in exc.value.message
        # Still serving.
        ids, _, _ = await _collect(pre.generate(_text_prompt(1), GREEDY))
        assert len(ids) == 16


async def test_health_and_metrics_of_both_services(llava_pipeline) -> None:
    """Every metric of the README's table, by value after known traffic: one image request,
    then the same image again (hash-only: a feature-store hit), 8 tokens each."""
    from prometheus_client.parser import text_string_to_metric_families

    for target in (llava_pipeline.pre_target, llava_pipeline.model_target):
        async with grpc.aio.insecure_channel(target) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

    def scrape(app) -> dict[tuple[str, tuple], float]:
        url = f"http://127.0.0.1:{app.grpc.metrics_port}/metrics"
        body = urllib.request.urlopen(url).read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(body) for s in fam.samples}

    def delta(after, before, name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        assert key in after, f"{name}{labels} not exported"
        return after[key] - before.get(key, 0.0)

    m0, p0 = await asyncio.to_thread(scrape, llava_pipeline.model), await asyncio.to_thread(scrape, llava_pipeline.pre)
    prompt_in = _text_prompt(1, seeds=(61,), suffix="Describe the picture in detail. " * 40)
    sampling = types.Sampling(temperature=0.0, max_tokens=8, ignore_eos=True)
    async with llava_pipeline.pre_client() as pre:
        prompt = await pre.preprocess(prompt_in)  # one more Preprocess
        for _ in range(2):
            await _collect(pre.generate(prompt_in, sampling))
    m1, p1 = await asyncio.to_thread(scrape, llava_pipeline.model), await asyncio.to_thread(scrape, llava_pipeline.pre)
    n_prompt = len(prompt.token_ids)
    gen = "/vlm.model.v1.ModelService/Generate"
    # Model service.
    assert delta(m1, m0, "vlm_grpc_requests_total", method=gen, code="OK") == 2
    assert delta(m1, m0, "vlm_grpc_request_duration_seconds_count", method=gen) == 2
    assert delta(m1, m0, "vlm_prompt_tokens_total") == 2 * n_prompt
    assert delta(m1, m0, "vlm_generation_tokens_total") == 16
    assert delta(m1, m0, "vlm_request_success_total", finished_reason="length") == 2
    assert delta(m1, m0, "vlm_time_to_first_token_seconds_count") == 2
    assert delta(m1, m0, "vlm_e2e_request_latency_seconds_count") == 2
    assert delta(m1, m0, "vlm_inter_token_latency_seconds_count") == 14
    assert delta(m1, m0, "vlm_prefix_cache_hit_tokens_total") > 0  # the second request's prefix
    assert delta(m1, m0, "vlm_feature_store_hits_total") == 1
    assert delta(m1, m0, "vlm_feature_store_misses_total") == 0
    assert m1[("vlm_feature_store_items", ())] >= 1 and m1[("vlm_feature_store_bytes", ())] > 0
    assert m1[("vlm_num_requests_running", ())] == 0 and m1[("vlm_num_requests_waiting", ())] == 0
    assert 0.0 <= m1[("vlm_kv_cache_usage_perc", ())] <= 1.0
    assert m1[("vlm_engine_healthy", ())] == 1.0
    assert any(k[0] == "vlm_build_info" for k in m1)
    for scraped in (m1, p1):  # request memory: every message released, the default budget
        assert scraped[("vlm_grpc_request_memory_bytes", ())] == 0
        assert scraped[("vlm_grpc_request_memory_waiting", ())] == 0
        assert scraped[("vlm_grpc_request_memory_limit_bytes", ())] == 8 * 64 * 1024 * 1024
    for scraped in (m1, p1):  # the profile's check strength, on both services
        assert scraped[("vlm_model_profile_field_checks", (("modality", "image"),))] == 1.0
        assert scraped[("vlm_model_profile_layout_check",
                        (("check", "reference"), ("modality", "image")))] == 1.0
    # Preprocessor.
    pre_gen = "/vlm.preprocessor.v1.PreprocessorService/Generate"
    assert delta(p1, p0, "vlm_grpc_requests_total", method=pre_gen, code="OK") == 2
    assert delta(p1, p0, "vlm_grpc_requests_total",
                 method="/vlm.preprocessor.v1.PreprocessorService/Preprocess", code="OK") == 1
    assert delta(p1, p0, "vlm_preprocess_duration_seconds_count", modality="image") == 3
    assert delta(p1, p0, "vlm_preprocess_items_total", modality="image") == 3
    assert delta(p1, p0, "vlm_preprocess_prompt_tokens_total") == 3 * n_prompt
    assert delta(p1, p0, "vlm_preprocess_feature_bytes_total") == 3 * prompt.items[0].nbytes
    assert (delta(p1, p0, "vlm_processor_cache_hits_total")
            + delta(p1, p0, "vlm_processor_cache_misses_total")) == 3
    assert delta(p1, p0, "vlm_preprocess_requests_total") == 3
    assert delta(p1, p0, "vlm_preprocess_failures_total") == 0
    assert p1[("vlm_preprocess_workers", ())] == 1 and p1[("vlm_preprocess_workers_ready", ())] == 1
    assert p1[("vlm_preprocess_queue_depth", ())] == 0 and p1[("vlm_preprocess_in_flight", ())] == 0
    assert p1[("vlm_preprocess_max_queue", ())] > 0 and p1[("vlm_processor_cache_bytes", ())] >= 0
    assert delta(p1, p0, "vlm_preprocess_worker_restarts_total") == 0
    assert delta(p1, p0, "vlm_preprocess_rejected_total") == 0
    replica = llava_pipeline.model_target
    assert delta(p1, p0, "vlm_gateway_replica_requests_total", replica=replica) == 2
    assert delta(p1, p0, "vlm_gateway_replica_affinity_hits_total", replica=replica) == 1
    assert delta(p1, p0, "vlm_gateway_replica_resends_total", replica=replica) == 0
    assert delta(p1, p0, "vlm_gateway_replica_failovers_total", replica=replica) == 0
    assert p1[("vlm_gateway_replica_up", (("replica", replica),))] == 1
    assert p1[("vlm_gateway_replica_in_flight", (("replica", replica),))] == 0


async def test_cancel_mid_stream_aborts_in_engine(llava_pipeline) -> None:
    long = types.Sampling(temperature=0.0, max_tokens=400, ignore_eos=True)
    async with llava_pipeline.pre_client() as pre:
        stream = pre.generate(_text_prompt(1), long)
        got = 0
        async for chunk in stream:
            got += len(chunk.token_ids)
            if got >= 2:
                break
        await stream.aclose()
    async with llava_pipeline.model_client() as model:
        for _ in range(100):
            load = await model.load()
            if load.running == 0 and load.waiting == 0:
                break
            await asyncio.sleep(0.1)
        assert (load.running, load.waiting) == (0, 0)


async def test_model_info_agrees_between_services(llava_pipeline) -> None:
    async with llava_pipeline.pre_client() as pre, llava_pipeline.model_client() as model:
        pre_info, model_info = await pre.model_info(), await model.model_info()
        load = await model.load()
    # One profile, derived by the same code on both sides: identical answers.
    assert pre_info == model_info
    assert model_info.fingerprint.model_impl == "auto" and len(model_info.fingerprint.config_hash) == 64
    assert model_info.fingerprint.feature_dtype == "float32"
    assert model_info.max_model_len == 1024 and model_info.vocab_size > 480
    assert model_info.eos_token_ids
    (image,) = [m for m in model_info.modalities if m.modality is IMAGE]
    assert image.placeholder_token_ids == (480,) and image.placeholder_text == "<image>"
    assert image.max_items_per_prompt >= 1
    assert 0.0 <= load.kv_cache_usage <= 1.0 and load.running == 0
    assert load.feature_store_items >= 1 and load.feature_store_bytes > 0


async def test_abort_rpc_stops_a_running_request(llava_pipeline) -> None:
    async with llava_pipeline.pre_client() as pre:
        prompt = await pre.preprocess(_text_prompt(1, seeds=(41,)))
    long = types.Sampling(temperature=0.0, max_tokens=900, ignore_eos=True)
    async with llava_pipeline.model_client() as model:
        stream = model.generate(prompt, long, request_id="abort-me")
        first = await anext(stream)
        assert await model.abort("abort-me") is True
        rest = [c async for c in stream]
        total = len(first.token_ids) + sum(len(c.token_ids) for c in rest)
        assert total < 900 and rest and rest[-1].finish_reason is types.FinishReason.ABORT
        assert await model.abort("abort-me") is False  # gone
        assert await model.abort("never-was") is False


async def test_preprocess_omits_fields_for_the_hashes_asked(llava_pipeline) -> None:
    prompt_in = _text_prompt(2, seeds=(43, 44))
    async with llava_pipeline.pre_client() as pre:
        full = await pre.preprocess(prompt_in)
        first, second = (i.hash for i in full.items)
        from vlm import convert
        from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb

        prompt_pb, media_pb = convert.prompt_input_to_pb(prompt_in)
        resp = await pre._stub.Preprocess(pre_pb.PreprocessRequest(
            prompt=prompt_pb, media=media_pb, omit_features_for_hashes=[second]))
    got = convert.prompt_from_pb(resp.prompt)
    assert [i.hash for i in got.items] == [first, second]
    assert got.items[0].fields is not None and got.items[1].fields is None
    assert got.token_ids == full.token_ids


async def test_model_service_errors_pass_through_the_gateway_with_their_field(llava_pipeline) -> None:
    """A check only the model service makes (a stop token outside the vocabulary) reaches the
    gateway's client with the same code and field."""
    info = llava_pipeline.model.engine.model_info()
    bad = types.Sampling(max_tokens=4, stop_token_ids=(info.vocab_size + 5,))
    async with llava_pipeline.pre_client() as pre:
        with pytest.raises(UpstreamError) as exc:
            await _collect(pre.generate(_text_prompt(1, seeds=(45,)), bad))
    assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.upstream_field == "sampling.stop_token_ids[0]"
