"""Transport security end to end, with certificates made in a temporary directory:

client --TLS + token--> gateway --mTLS + token--> `vlm serve-model` process

The model service requires a client certificate signed by the test CA and its own token; the
gateway serves TLS and requires its token. Health stays open (TLS still applies)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import pytest_asyncio

from preprocessor_svc.app import PreprocessorApp
from preprocessor_svc.pool import PoolConfig
from preprocessor_svc.processing import ProcessorConfig
from tests.certs import make_certs
from tests.e2e.conftest import png
from vlm import types
from vlm.client import ModelClient, PreprocessorClient, check_health
from vlm.errors import UpstreamError
from vlm.security import ClientSecurity, ServerSecurity
from vlm.server import ServerOptions

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

GREEDY = types.Sampling(temperature=0.0, max_tokens=4, ignore_eos=True)
MODEL_TOKEN, GATEWAY_TOKEN = "model-secret-1", "gateway-secret-2"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def secure_model(llava_pipeline, certs, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("secure-model") / "model.log"
    env = {**os.environ, "VLM_AUTH_TOKEN": MODEL_TOKEN, "VLM_TLS_CLIENT_CA": str(certs.ca)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlm_cli.main", "serve-model", "--model", str(llava_pipeline.model_dir),
         "--port", str(port), "--metrics-port", "-1", "--max-model-len", "1024", "--enforce-eager",
         "--dtype", "float32", "--kv-cache-memory-bytes", str(128 << 20), "--grace", "1",
         "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )
    target = f"localhost:{port}"
    health_sec = ClientSecurity.from_files(str(certs.ca), str(certs.client_cert), str(certs.client_key))
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if await check_health(target, timeout=2, security=health_sec) == "SERVING":
                break
        except UpstreamError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        await asyncio.sleep(0.5)
    yield target
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def secure_gateway(llava_pipeline, certs, secure_model):
    app = await PreprocessorApp.start(
        ProcessorConfig(model=str(llava_pipeline.model_dir)),
        PoolConfig(workers=0),
        ServerOptions(metrics_port=None, grace_s=0.5, security=ServerSecurity(
            cert=certs.server_cert.read_bytes(), key=certs.server_key.read_bytes(), token=GATEWAY_TOKEN)),
        model_targets=(secure_model,),
        model_security=ClientSecurity(
            ca=certs.ca.read_bytes(), cert=certs.client_cert.read_bytes(), key=certs.client_key.read_bytes(),
            token=MODEL_TOKEN, tls=True),
    )
    yield f"localhost:{app.grpc.port}"
    await app.close()


def _chat(seed: int) -> types.PromptInput:
    return types.PromptInput(messages=(types.ChatMessage("user", (
        types.ChatPart(media=types.Media(types.Modality.IMAGE, png(seed))), types.ChatPart(text="Hi?"))),))


async def _generate(target: str, security: ClientSecurity) -> list[int]:
    async with PreprocessorClient(target, security=security) as client:
        return [t async for c in client.generate(_chat(7), GREEDY) for t in c.token_ids]


async def test_tls_and_tokens_end_to_end(secure_gateway, certs, llava_pipeline) -> None:
    ok = ClientSecurity(ca=certs.ca.read_bytes(), token=GATEWAY_TOKEN, tls=True)
    tokens = await _generate(secure_gateway, ok)
    # Same tokens as the plaintext pair of the same model.
    async with llava_pipeline.pre_client() as plain:
        assert tokens == [t async for c in plain.generate(_chat(7), GREEDY) for t in c.token_ids]


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_gateway_refuses_missing_or_wrong_token_but_health_is_open(secure_gateway, certs, token) -> None:
    sec = ClientSecurity(ca=certs.ca.read_bytes(), token=token, tls=True)
    with pytest.raises(UpstreamError) as err:
        await _generate(secure_gateway, sec)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in err.value.message
    assert await check_health(secure_gateway, security=sec) == "SERVING"


async def test_plaintext_client_cannot_talk_to_a_tls_server(secure_gateway) -> None:
    with pytest.raises(UpstreamError) as err:
        async with PreprocessorClient(secure_gateway, security=ClientSecurity(token=GATEWAY_TOKEN)) as c:
            await asyncio.wait_for(c.model_info(), 10)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


async def test_model_service_requires_a_client_certificate_from_its_ca(secure_model, certs) -> None:
    ca = certs.ca.read_bytes()
    cases = {
        "no client certificate": ClientSecurity(ca=ca, token=MODEL_TOKEN, tls=True),
        "certificate from another CA": ClientSecurity(
            ca=ca, cert=certs.rogue_cert.read_bytes(), key=certs.rogue_key.read_bytes(), token=MODEL_TOKEN),
    }
    for what, sec in cases.items():
        async with ModelClient(secure_model, security=sec) as client:
            with pytest.raises(UpstreamError) as err:
                await client.model_info(timeout=10)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, what
    # The right certificate but the gateway's token: UNAUTHENTICATED.
    sec = ClientSecurity(ca=ca, cert=certs.client_cert.read_bytes(), key=certs.client_key.read_bytes(),
                         token=GATEWAY_TOKEN)
    async with ModelClient(secure_model, security=sec) as client:
        with pytest.raises(UpstreamError) as err:
            await client.model_info(timeout=10)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
