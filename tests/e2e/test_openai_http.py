"""The gateway's OpenAI-compatible HTTP front door, driven by the unchanged `openai` SDK (sync and
async, streaming and not) over a real port, in front of `llava_pipeline`'s real model service.

The HTTP gateway is a second PreprocessorApp against the same model service (workers=0: its
processor runs in this process), with small limits so the error paths are cheap to reach; its
own gRPC port is the reference the HTTP answers are compared with.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time

import httpx
import openai
import pytest
import pytest_asyncio

from preprocessor_svc.app import PreprocessorApp
from preprocessor_svc.openai_http import body_limit
from preprocessor_svc.main import build_parser
from preprocessor_svc.media import MediaLimits
from preprocessor_svc.pool import PoolConfig
from preprocessor_svc.processing import ProcessorConfig
from tests.e2e.conftest import png
from vlm import types
from vlm.client import ModelClient, PreprocessorClient
from vlm.server import ServerOptions

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

SERVED = "tiny-llava"
MAX_BODY = 1 << 20
MAX_IMAGE = 64 << 10
QUESTION = "What is it?"
IMAGE = types.Modality.IMAGE


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def http_app(llava_pipeline):
    app = await PreprocessorApp.start(
        ProcessorConfig(
            model=str(llava_pipeline.model_dir), max_model_len=1024, dtype="float32",
            limit_mm_per_prompt={"image": 2}, media_limits=MediaLimits(max_image_bytes=MAX_IMAGE),
        ),
        PoolConfig(workers=0),
        ServerOptions(grace_s=1.0, max_message_bytes=MAX_BODY),
        model_targets=(llava_pipeline.model_target,),
        http_port=0,
        served_model_name=SERVED,
    )
    yield app
    await app.close()


def _base(app: PreprocessorApp) -> str:
    return f"http://127.0.0.1:{app.http.port}"


def _async_client(app: PreprocessorApp) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=_base(app) + "/v1", api_key="unused", max_retries=0)


def _sync_client(app: PreprocessorApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=_base(app) + "/v1", api_key="unused", max_retries=0)


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _messages(*images: bytes, url: str | None = None) -> list[dict]:
    urls = [url] if url is not None else [_data_url(img) for img in images]
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}]


def _chat_input(*images: bytes) -> types.PromptInput:
    parts = tuple(types.ChatPart(media=types.Media(IMAGE, img, "image/png")) for img in images)
    return types.PromptInput(messages=(types.ChatMessage("user", (*parts, types.ChatPart(text=QUESTION))),))


GREEDY = types.Sampling(temperature=0.0, max_tokens=8, ignore_eos=True)
GREEDY_HTTP = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True, "return_token_ids": True})


async def _grpc(app: PreprocessorApp, prompt: types.PromptInput) -> tuple[list[int], str, types.Chunk]:
    ids, text, last = [], [], None
    async with PreprocessorClient(f"127.0.0.1:{app.grpc.port}") as pre:
        async for chunk in pre.generate(prompt, GREEDY):
            ids.extend(chunk.token_ids)
            text.append(chunk.text)
            last = chunk
    return ids, "".join(text), last


async def test_chat_equals_the_grpc_path(http_app) -> None:
    ids, text, last = await _grpc(http_app, _chat_input(png(4)))
    async with _async_client(http_app) as client:
        resp = await client.chat.completions.create(model=SERVED, messages=_messages(png(4)), **GREEDY_HTTP)
    (choice,) = resp.choices
    assert choice.message.role == "assistant" and choice.message.content == text
    assert choice.token_ids == ids and len(ids) == 8
    assert choice.finish_reason == "length"
    assert resp.model == SERVED and resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.usage.prompt_tokens == last.usage.prompt_tokens
    assert resp.usage.completion_tokens == 8
    assert resp.usage.total_tokens == last.usage.prompt_tokens + 8

    def sync() -> openai.types.chat.ChatCompletion:
        with _sync_client(http_app) as client:  # max_completion_tokens: the newer name
            return client.chat.completions.create(
                model=SERVED, messages=_messages(png(4)), temperature=0, max_completion_tokens=8,
                extra_body={"ignore_eos": True})

    assert (await asyncio.to_thread(sync)).choices[0].message.content == text


async def test_chat_streaming_concatenates_to_the_same_text(http_app) -> None:
    _, text, last = await _grpc(http_app, _chat_input(png(5)))
    async with _async_client(http_app) as client:
        stream = await client.chat.completions.create(
            model=SERVED, messages=_messages(png(5)), stream=True,
            stream_options={"include_usage": True}, **GREEDY_HTTP)
        chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert sum(len(getattr(c.choices[0], "token_ids", None) or ()) for c in chunks if c.choices) == 8
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["length"]
    # include_usage: a last chunk with no choices carries the usage; the others carry null.
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == last.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])

    def sync_stream() -> tuple[str, int]:
        with _sync_client(http_app) as client:
            out = client.chat.completions.create(
                model=SERVED, messages=_messages(png(5)), stream=True, temperature=0, max_tokens=8,
                extra_body={"ignore_eos": True})
            got = list(out)
        return "".join(c.choices[0].delta.content or "" for c in got if c.choices), sum(c.usage is not None for c in got)

    assert await asyncio.to_thread(sync_stream) == (text, 0)  # no include_usage: no usage chunk


async def test_completions_text_and_token_ids(http_app) -> None:
    prompt = "Hello there, how are"
    ids, text, last = await _grpc(http_app, types.PromptInput(text=prompt))
    async with _async_client(http_app) as client:
        resp = await client.completions.create(model=SERVED, prompt=prompt, **GREEDY_HTTP)
        stream = await client.completions.create(
            model=SERVED, prompt=prompt, stream=True, stream_options={"include_usage": True}, **GREEDY_HTTP)
        chunks = [c async for c in stream]
        async with PreprocessorClient(f"127.0.0.1:{http_app.grpc.port}") as pre:
            prompt_ids = list((await pre.preprocess(types.PromptInput(text=prompt))).token_ids)
        by_ids = await client.completions.create(model=SERVED, prompt=prompt_ids, **GREEDY_HTTP)
    assert resp.choices[0].text == text and resp.choices[0].token_ids == ids
    assert resp.object == "text_completion" and resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == last.usage.prompt_tokens == len(prompt_ids)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert {c.object for c in chunks} == {"text_completion"}
    assert chunks[-1].usage.completion_tokens == 8
    assert by_ids.choices[0].token_ids == ids


async def test_logprobs_are_rendered_with_the_tokenizer(http_app) -> None:
    async with _async_client(http_app) as client:
        resp = await client.chat.completions.create(
            model=SERVED, messages=_messages(png(4)), logprobs=True, top_logprobs=2, **GREEDY_HTTP)
        cmpl = await client.completions.create(model=SERVED, prompt="Hello", logprobs=2, **GREEDY_HTTP)
    content = resp.choices[0].logprobs.content
    assert len(content) == 8
    for pos in content:
        assert len(pos.top_logprobs) == 2 and not pos.token.startswith("token_id:")
        assert pos.top_logprobs[0].token == pos.token  # greedy: the sampled token ranks first
        assert pos.logprob == pytest.approx(pos.top_logprobs[0].logprob, abs=1e-4)
        assert pos.bytes == list(pos.token.encode())
    lp = cmpl.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    assert lp.text_offset[0] == 0 and all(1 <= len(top) <= 2 for top in lp.top_logprobs)


async def test_models_health_and_metrics(http_app, llava_pipeline) -> None:
    async with _async_client(http_app) as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == [SERVED]
        assert models.data[0].max_model_len == 1024
        assert (await client.models.retrieve(SERVED)).id == SERVED
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("gpt-4o")
    async with httpx.AsyncClient(base_url=_base(http_app)) as http:
        health = await http.get("/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "serving" and body["model"] == SERVED
    (replica,) = body["replicas"]
    assert replica["address"] == llava_pipeline.model_target and replica["state"] == "serving"
    assert replica["target"] == llava_pipeline.model_target and "reason" in replica
    registry = http_app.grpc.metrics.registry
    assert registry.get_sample_value(
        "vlm_http_requests_total", {"path": "/v1/models", "status": "200"}) >= 1
    assert registry.get_sample_value(
        "vlm_http_requests_total", {"path": "/health", "status": "200"}) >= 1


def _image_parts(n: int) -> list[bytes]:
    return [png(30 + i) for i in range(n)]


BAD_CHAT = {
    "http_url": (dict(messages=_messages(url="http://example.com/cat.png")), 400, "INVALID_ARGUMENT",
                 "messages[0].content[0].image_url.url", "data: URL"),
    "file_url": (dict(messages=_messages(url="file:///etc/passwd")), 400, "INVALID_ARGUMENT",
                 "messages[0].content[0].image_url.url", "file://"),
    "not_base64": (dict(messages=_messages(url="data:image/png,rawbytes")), 400, "INVALID_ARGUMENT",
                   "messages[0].content[0].image_url.url", "base64"),
    "bad_base64": (dict(messages=_messages(url="data:image/png;base64,@@not base64@@")), 400,
                   "INVALID_MEDIA", "messages[0].content[0].image_url.url", "base64"),
    "oversize_image": (dict(messages=_messages(b"\x89PNG\r\n\x1a\n" + b"\0" * MAX_IMAGE)), 400,
                       "INVALID_MEDIA", "messages[0].content[0]", "exceeds the limit"),
    "too_many_images": (dict(messages=_messages(*_image_parts(3))), 413, "LIMIT_EXCEEDED", "messages",
                        "at most 2"),
    "too_many_images_streaming": (dict(messages=_messages(*_image_parts(3)), stream=True), 413,
                                  "LIMIT_EXCEEDED", "messages", "at most 2"),
    "unknown_model": (dict(messages=_messages(png(1)), model="gpt-4o"), 404, "MODEL_NOT_FOUND",
                      "model", "gpt-4o"),
    "missing_messages": (dict(), 400, "INVALID_ARGUMENT", "messages", "required"),
    "tools": (dict(messages=_messages(png(1)), tools=[{"type": "function", "function": {"name": "f"}}]),
              400, "INVALID_ARGUMENT", "tools", "not supported"),
    "n": (dict(messages=_messages(png(1)), n=2), 400, "INVALID_ARGUMENT", "n", "not supported"),
    "audio_part": (dict(messages=[{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]), 400,
        "INVALID_ARGUMENT", "messages[0].content[0].type", "input_audio"),
    "bad_temperature": (dict(messages=_messages(png(1)), temperature="hot"), 400, "INVALID_ARGUMENT",
                        "temperature", "number"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHAT))
async def test_bad_chat_requests_get_openai_errors(http_app, case: str) -> None:
    fields, status, kind, param, words = BAD_CHAT[case]
    async with httpx.AsyncClient(base_url=_base(http_app), timeout=60) as http:
        resp = await http.post("/v1/chat/completions", json={"model": SERVED, "max_tokens": 4, **fields})
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["type"], err["param"], err["code"]) == (kind, param, status)
    assert words in err["message"]


async def test_malformed_and_oversize_bodies(http_app) -> None:
    async with httpx.AsyncClient(base_url=_base(http_app), timeout=60) as http:
        bad_json = await http.post("/v1/chat/completions", content=b'{"model": ',
                                   headers={"content-type": "application/json"})
        too_big = await http.post("/v1/chat/completions", content=b" " * (body_limit(MAX_BODY) + 1))
        batch = await http.post("/v1/completions", json={"model": SERVED, "prompt": ["a", "b"]})
        no_route = await http.get("/v1/nothing")
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    assert too_big.status_code == 413 and too_big.json()["error"]["type"] == "LIMIT_EXCEEDED"
    assert batch.status_code == 400 and batch.json()["error"]["param"] == "prompt"
    assert no_route.status_code == 404 and no_route.json()["error"]["code"] == 404


async def test_sdk_raises_the_mapped_errors(http_app) -> None:
    async with _async_client(http_app) as client:
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model=SERVED, messages=_messages(url="https://example.com/cat.png"), max_tokens=4)
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="other", messages=_messages(png(1)), max_tokens=4)
    assert bad.value.status_code == 400 and "data: URL" in bad.value.message


async def _engine_idle(model: ModelClient) -> None:
    for _ in range(100):
        load = await model.load()
        if (load.running, load.waiting) == (0, 0):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the engine still holds requests: {load}")


async def test_client_disconnect_aborts_the_generation(http_app, llava_pipeline) -> None:
    registry = llava_pipeline.model.grpc.metrics.registry

    def aborted() -> float:
        return registry.get_sample_value("vlm_request_success_total", {"finished_reason": "abort"}) or 0.0

    before = aborted()
    body = {"model": SERVED, "messages": _messages(png(6)), "max_tokens": 900, "ignore_eos": True,
            "temperature": 0, "stream": True}
    async with httpx.AsyncClient(base_url=_base(http_app), timeout=60) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            assert resp.status_code == 200
            events = 0
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    events += 1
                    if events >= 2:
                        break
    async with llava_pipeline.model_client() as model:
        await _engine_idle(model)
    assert aborted() == before + 1
    (replica,) = http_app.replicas.statuses()
    assert replica.in_flight == 0

    # Not streaming: the client gives up once the engine runs its request.
    body["stream"] = False
    async with httpx.AsyncClient(base_url=_base(http_app), timeout=60) as http, \
            llava_pipeline.model_client() as model:
        post = asyncio.create_task(http.post("/v1/chat/completions", json=body))
        for _ in range(600):
            if (await model.load()).running:
                break
            await asyncio.sleep(0.05)
        assert not post.done()
        post.cancel()  # closes the connection
        with pytest.raises(asyncio.CancelledError):
            await post
        await _engine_idle(model)
    assert aborted() == before + 2


async def test_warm_up_health_and_the_grpc_ports_security(tmp_path) -> None:
    """The front door before a gateway is attached (503s), with the gRPC port's security: HTTPS
    with client certificates (mTLS) and the bearer token (the SDK's API key), /health open."""
    from preprocessor_svc.app import _start_http
    from preprocessor_svc.metrics import PreprocessorMetrics
    from tests.certs import make_certs
    from vlm.security import ServerSecurity

    certs = make_certs(tmp_path)
    security = ServerSecurity(cert=certs.server_cert.read_bytes(), key=certs.server_key.read_bytes(),
                              client_ca=certs.ca.read_bytes(), token="sekret")
    server = await _start_http(
        ProcessorConfig(model="/models/m"), ServerOptions(security=security, max_concurrent_rpcs=1),
        PreprocessorMetrics(), None, "127.0.0.1", 0, None)
    base = f"https://127.0.0.1:{server.port}"
    tls = ssl.create_default_context(cafile=str(certs.ca))
    tls.load_cert_chain(certs.client_cert, certs.client_key)
    try:
        async with httpx.AsyncClient(base_url=base, verify=tls, timeout=30) as http:
            health = await http.get("/health")  # no key needed for probes
            assert health.status_code == 503 and health.json()["status"] == "warming_up"
            body = {"model": "/models/m", "messages": [{"role": "user", "content": "hi"}]}
            no_key = await http.post("/v1/chat/completions", json=body)
            assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "UNAUTHENTICATED"
            wrong = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            key = {"Authorization": "Bearer sekret"}
            warming = await http.post("/v1/chat/completions", json=body, headers=key)
            assert warming.status_code == 503 and "warming up" in warming.json()["error"]["message"]
            models = await http.get("/v1/models", headers=key)
            assert models.json()["data"][0]["id"] == "/models/m"  # served name: the --model value

            # --max-concurrent-rpcs 1: while one request is in flight (its body still coming),
            # the next is refused at once, as RESOURCE_EXHAUSTED is on the gRPC port.
            release = asyncio.Event()

            async def slow_body():
                yield b'{"model": "/models/m", '
                await release.wait()
                yield b'"messages": [{"role": "user", "content": "hi"}]}'

            first = asyncio.create_task(http.post("/v1/chat/completions", content=slow_body(), headers=key))
            for _ in range(500):
                if server.in_flight:
                    break
                await asyncio.sleep(0.01)
            busy = await http.post("/v1/chat/completions", json=body, headers=key)
            release.set()
            assert busy.status_code == 429 and busy.json()["error"]["type"] == "QUEUE_FULL"
            assert (await first).status_code == 503 and server.in_flight == 0
        no_client_cert = ssl.create_default_context(cafile=str(certs.ca))
        with pytest.raises(httpx.HTTPError):  # mTLS: refused without a client certificate
            async with httpx.AsyncClient(verify=no_client_cert, timeout=30) as http:
                await http.get(base + "/health")
    finally:
        await server.stop(1.0)
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(verify=tls) as http:
            await http.get(base + "/health")


async def test_serve_preprocessor_http_flags() -> None:
    args = build_parser().parse_args(["--model", "m"])
    assert (args.http_port, args.http_host, args.served_model_name) == (None, "127.0.0.1", None)
    args = build_parser().parse_args(
        ["--model", "m", "--http-port", "8000", "--http-host", "0.0.0.0", "--served-model-name", "x"])
    assert (args.http_port, args.http_host, args.served_model_name) == (8000, "0.0.0.0", "x")


async def test_error_body_is_json_serialisable() -> None:
    from preprocessor_svc.openai_http import error_body
    from vlm.errors import LimitExceeded

    body = json.loads(error_body(LimitExceeded("too many", field="prompt.messages")).model_dump_json())
    assert body == {"error": {"message": "too many", "type": "LIMIT_EXCEEDED", "param": "messages", "code": 413}}


async def test_bodies_are_read_under_the_request_memory_budget() -> None:
    """The front door shares the gRPC port's request-memory budget: a body is read only once
    its declared length (else the body limit) fits; with the waiting room full, the next
    request is 429 at once, and every byte is given back afterwards."""
    from preprocessor_svc.app import _start_http
    from preprocessor_svc.metrics import PreprocessorMetrics
    from vlm.admission import RequestBudget

    budget = RequestBudget(1 << 20, 1 << 20, max_waiting=0)
    server = await _start_http(ProcessorConfig(model="/models/m"), ServerOptions(),
                               PreprocessorMetrics(), None, "127.0.0.1", 0, None, budget)
    body = {"model": "/models/m", "messages": [{"role": "user", "content": "hi"}]}
    release = asyncio.Event()

    async def slow_body():  # chunked: no declared length, so the whole budget is held
        yield b'{"model": "/models/m", '
        await release.wait()
        yield b'"messages": [{"role": "user", "content": "hi"}]}'

    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as http:
            first = asyncio.create_task(http.post("/v1/chat/completions", content=slow_body()))
            for _ in range(500):
                if budget.reserved:
                    break
                await asyncio.sleep(0.01)
            assert budget.reserved == 1 << 20
            t = time.monotonic()
            full = await http.post("/v1/chat/completions", json=body)
            assert time.monotonic() - t < 0.1
            assert full.status_code == 429 and "request memory" in full.json()["error"]["message"]
            release.set()
            assert (await first).status_code == 503  # parsed, then: no gateway attached yet
            assert budget.reserved == 0
            after = await http.post("/v1/chat/completions", json=body)
            assert after.status_code == 503 and budget.reserved == 0
    finally:
        await server.stop(1.0)
