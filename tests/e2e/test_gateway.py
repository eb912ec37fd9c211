"""The gateway over real gRPC with two real model replicas: the session's in-process llava
model service (R1) and a `vlm serve-model` process (R2) that the tests restart and kill.

The gateway runs with the preprocessor's default flags (`--dtype auto`, no max length, no item
limits) against replicas started with `--dtype float32`: it adopts them from the handshake.
The tests run in file order; R2 is restarted (same model), then killed mid-stream, then
restarted as another model (bfloat16 features), which the gateway refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from prometheus_client import generate_latest

from preprocessor_svc.app import REPLICA_HEALTH_PREFIX, PreprocessorApp
from preprocessor_svc.pool import PoolConfig
from preprocessor_svc.processing import ProcessorConfig
from preprocessor_svc.replicas import ReplicaState
from preprocessor_svc.routing import rendezvous_order
from tests.e2e.conftest import png
from tests.service.model_core.hf_reference import hf_greedy
from vlm import types
from vlm.client import ModelClient, PreprocessorClient, check_health
from vlm.errors import UpstreamError
from vlm.server import ServerOptions
from vlm.testing.tiny_models import build_tiny_model

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

VLM = [sys.executable, "-m", "vlm_cli.main"]
GREEDY = types.Sampling(temperature=0.0, max_tokens=6, ignore_eos=True)
LONG = types.Sampling(temperature=0.0, max_tokens=900, ignore_eos=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModelProcess:
    """`vlm serve-model` as users run it, on a fixed port so that it can come back there."""

    def __init__(self, model_dir: Path, log_dir: Path) -> None:
        self.model_dir = model_dir
        self.port = _free_port()
        self.metrics_port = _free_port()
        self.log_dir = log_dir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, dtype: str = "float32") -> None:
        self.starts += 1
        log = open(self.log_dir / f"model-{self.starts}.log", "wb")  # noqa: SIM115 - child owns it
        self.proc = subprocess.Popen(
            [*VLM, "serve-model", "--model", str(self.model_dir), "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--max-model-len", "1024", "--enforce-eager",
             "--dtype", dtype,
             "--seed", "0", "--kv-cache-memory-bytes", str(128 << 20), "--grace", "10"],
            stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # a kill takes the engine core with it, as a container's would
        )

    async def wait_serving(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            try:
                if await check_health(self.target, timeout=2) == "SERVING":
                    return
            except UpstreamError:
                pass
            await asyncio.sleep(0.5)
        raise AssertionError(f"{self.target} not SERVING: {self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: the service's own graceful stop; SIGKILL: the whole process group."""
        if self.proc is not None and self.proc.poll() is None:
            if sig == signal.SIGKILL:
                self.kill()
            else:
                self.proc.send_signal(sig)
            self.proc.wait(60)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def log_tail(self) -> str:
        return (self.log_dir / f"model-{self.starts}.log").read_text(errors="replace")[-3000:]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def r2(llava_pipeline, tmp_path_factory):
    proc = ModelProcess(llava_pipeline.model_dir, tmp_path_factory.mktemp("r2"))
    proc.start()
    await proc.wait_serving()
    yield proc
    proc.stop(signal.SIGKILL)
    proc.kill()  # whatever is left of the group (an engine core whose service already exited)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def gateway(llava_pipeline, r2):
    # Default preprocessor flags: dtype, max length and limits come from the replicas.
    app = await PreprocessorApp.start(
        ProcessorConfig(model=str(llava_pipeline.model_dir)),
        PoolConfig(workers=1),
        ServerOptions(metrics_port=None, grace_s=1.0),
        model_targets=(llava_pipeline.model_target, r2.target),
        resolve_interval_s=1.0,
    )
    yield app
    await app.close()


def _target(app: PreprocessorApp) -> str:
    return f"127.0.0.1:{app.grpc.port}"


def _chat(image: bytes, text: str = "Describe it.") -> types.PromptInput:
    return types.PromptInput(messages=(types.ChatMessage("user", (
        types.ChatPart(media=types.Media(types.Modality.IMAGE, image)),
        types.ChatPart(text=text),
    )),))


async def _image_homed_on(app: PreprocessorApp, address: str, start_seed: int) -> tuple[bytes, int]:
    """An image whose rendezvous home among both replicas is `address`."""
    addresses = [r.address for r in app.replicas.replicas]
    for seed in range(start_seed, start_seed + 64):
        image = png(seed)
        result = await app.gateway.preprocess(_chat(image))
        if rendezvous_order(result.prompt.hashes[0], addresses)[0] == address:
            return image, seed
    raise AssertionError("no image homed there")


async def _generate(target: str, prompt: types.PromptInput, sampling=GREEDY) -> list[types.Chunk]:
    async with PreprocessorClient(target) as client:
        return [c async for c in client.generate(prompt, sampling)]


def _tokens(chunks: list[types.Chunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def _until(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def _replica(app: PreprocessorApp, address: str):
    (r,) = [r for r in app.replicas.replicas if r.address == address]
    return r


async def test_default_flags_adopt_the_replicas_dtype_and_limits(gateway, llava_pipeline) -> None:
    fp = gateway.preprocessor.profile.fingerprint
    assert fp.feature_dtype == "float32"  # --dtype auto alone would give bfloat16 for this model
    assert gateway.preprocessor.model_info() == llava_pipeline.model.engine.model_info()
    assert await check_health(_target(gateway)) == "SERVING"
    for r in gateway.replicas.replicas:
        assert await check_health(_target(gateway), REPLICA_HEALTH_PREFIX + r.address) == "SERVING"
    # Token-exact with the session's pipeline (explicit float32 on both sides).
    prompt = _chat(png(1))
    assert _tokens(await _generate(_target(gateway), prompt)) == _tokens(
        await _generate(llava_pipeline.pre_target, prompt))


async def test_affinity_repeated_image_is_a_feature_store_hit_on_the_same_replica(
    gateway, llava_pipeline
) -> None:
    r1 = _replica(gateway, llava_pipeline.model_target)
    image, _ = await _image_homed_on(gateway, r1.address, 100)
    hits = llava_pipeline.model.grpc.metrics.feature_store_hits
    before_hits, before = hits._value.get(), r1.counters.affinity_hits
    first = await _generate(_target(gateway), _chat(image))
    second = await _generate(_target(gateway), _chat(image))
    assert _tokens(first) == _tokens(second)
    assert r1.counters.affinity_hits == before + 1  # the second went hash-only to the same replica
    assert hits._value.get() == before_hits + 1  # ... and was resolved from its feature store
    assert r1.counters.resends == 0
    exposition = generate_latest(gateway.grpc.metrics.registry).decode()
    assert f'vlm_gateway_replica_affinity_hits_total{{replica="{r1.address}"}}' in exposition
    assert f'vlm_gateway_replica_up{{replica="{r1.address}"}} 1.0' in exposition


async def test_text_only_requests_spread_by_load(gateway) -> None:
    before = {r.address: r.counters.requests for r in gateway.replicas.replicas}
    text = types.PromptInput(text="Tell me a story.")
    sampling = types.Sampling(temperature=0.0, max_tokens=48, ignore_eos=True)
    await asyncio.gather(*(_generate(_target(gateway), text, sampling) for _ in range(2)))
    after = {r.address: r.counters.requests for r in gateway.replicas.replicas}
    assert all(after[a] == before[a] + 1 for a in before), (before, after)


async def test_restarted_replica_gets_the_missing_items_resent(gateway, r2) -> None:
    replica = _replica(gateway, r2.target)
    image, _ = await _image_homed_on(gateway, replica.address, 200)
    first = await _generate(_target(gateway), _chat(image))
    assert replica.client.has_sent((await gateway.gateway.preprocess(_chat(image))).prompt.hashes[0])
    r2.stop()
    await _until(lambda: not replica.serving, 10, "the replica to be seen down")
    r2.start()
    await r2.wait_serving()
    await _until(lambda: replica.serving, 30, "the gateway to see the replica back")
    resends, requests = replica.counters.resends, replica.counters.requests
    second = await _generate(_target(gateway), _chat(image))
    assert _tokens(second) == _tokens(first)
    prompt = (await gateway.gateway.preprocess(_chat(image))).prompt.decoded
    assert _tokens(second) == await asyncio.to_thread(
        hf_greedy, str(r2.model_dir), prompt, GREEDY.max_tokens)  # the resent item is the right one
    assert replica.counters.resends == resends + 1  # hash-only → MISSING_FEATURES → resent once
    assert replica.counters.requests == requests + 1


async def test_deadline_and_cancel_reach_the_engine(gateway, llava_pipeline) -> None:
    r1 = _replica(gateway, llava_pipeline.model_target)
    image, _ = await _image_homed_on(gateway, r1.address, 300)
    engine = llava_pipeline.model.engine

    async with PreprocessorClient(_target(gateway)) as client:
        # Deadline: the model service gets the remaining time and stops the request itself.
        from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb
        from vlm import convert

        prompt_pb, media_pb = convert.prompt_input_to_pb(_chat(image))
        req = pre_pb.GenerateRequest(input=pre_pb.PreprocessRequest(prompt=prompt_pb, media=media_pb),
                                     sampling=convert.sampling_to_pb(LONG))
        call = client._stub.Generate(req, timeout=1.5)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: engine.load().running == 0, 3, "the engine request to end (deadline)")

        # Cancel after the first chunk: the engine request is aborted.
        stream = client.generate(_chat(image), LONG)
        await anext(stream)
        assert engine.load().running == 1
        await stream.aclose()
        await _until(lambda: engine.load().running == 0, 3, "the engine request to be aborted")


async def test_replica_killed_mid_stream_fails_fast_then_the_other_serves(gateway, r2) -> None:
    replica = _replica(gateway, r2.target)
    await _until(lambda: replica.serving, 30, "the replica to serve")
    image, _ = await _image_homed_on(gateway, replica.address, 400)
    async with PreprocessorClient(_target(gateway)) as client:
        stream = client.generate(_chat(image), LONG)
        await anext(stream)
        r2.kill()
        killed = time.monotonic()
        with pytest.raises(UpstreamError) as err:
            async for _ in stream:
                pass
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - killed < 2.0
    r2.proc.wait(10)
    await _until(lambda: not replica.serving, 5, "the replica to be seen down")
    others = [r for r in gateway.replicas.replicas if r is not replica]
    before = others[0].counters.requests
    chunks = await _generate(_target(gateway), _chat(image))
    assert len(_tokens(chunks)) == GREEDY.max_tokens
    assert others[0].counters.requests == before + 1
    assert await check_health(_target(gateway)) == "SERVING"
    assert await check_health(_target(gateway), REPLICA_HEALTH_PREFIX + replica.address) == "NOT_SERVING"

    # A replica the gateway still believes serving (its watch has not noticed yet) fails before
    # the first token: the request is retried once on the runner-up, and the replica is marked down.
    from vlm import convert
    from vlm.model.v1 import model_pb2

    prompt = (await gateway.gateway.preprocess(_chat(image))).prompt
    failovers, before = replica.counters.failovers, others[0].counters.requests
    replica._set(ReplicaState.SERVING, "stale: the health watch has not noticed yet")
    relay = gateway.gateway.relay(prompt, convert.sampling_to_pb(GREEDY), request_id="failover-1")
    raws = [raw async for raw in relay]  # routed at once, to the stale replica first
    tokens = [t for raw in raws for t in model_pb2.GenerateResponse.FromString(raw).chunk.token_ids]
    assert len(tokens) == GREEDY.max_tokens
    assert replica.counters.failovers == failovers + 1 and not replica.serving
    assert others[0].counters.requests == before + 1


async def test_sigterm_drains_the_in_flight_stream_and_stops_within_2s(gateway, r2) -> None:
    """SIGTERM on a model replica mid-stream: health NOT_SERVING at once, new requests
    UNAVAILABLE, the stream in flight completes, and the process exits 0 soon after it."""
    if r2.proc.poll() is not None:  # killed by the test before
        r2.start()
        await r2.wait_serving()
    replica = _replica(gateway, r2.target)
    await _until(lambda: replica.serving, 30, "the gateway to see the replica back")
    image, _ = await _image_homed_on(gateway, replica.address, 500)
    sampling = types.Sampling(temperature=0.0, max_tokens=300, ignore_eos=True)
    async with PreprocessorClient(_target(gateway)) as client:
        stream = client.generate(_chat(image), sampling)
        first = await anext(stream)
        r2.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # New connections are refused from the signal on; the gateway's health Watch sees it.
        await _until(lambda: not replica.serving, 1.0, "the gateway to see NOT_SERVING")
        async with ModelClient(r2.target) as direct:
            with pytest.raises(UpstreamError) as err:
                await direct.model_info(timeout=5)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
        rest = [c async for c in stream]
    ended = time.monotonic()
    assert len(first.token_ids) + sum(len(c.token_ids) for c in rest) == 300
    assert rest[-1].finish_reason is types.FinishReason.LENGTH
    assert await asyncio.to_thread(r2.proc.wait, 30) == 0
    assert time.monotonic() - ended < 2.0 + 0.5, "exit took too long after the last stream"
    assert ended - signalled < 10.0  # within the grace period (--grace 10)


async def test_replica_with_another_model_is_refused(gateway, r2, llava_pipeline, caplog) -> None:
    """R2 comes back with bfloat16 features: another fingerprint. The running gateway refuses
    it; a gateway whose only replica it is stays NOT_SERVING, says why, and fails requests with
    UNAVAILABLE at once."""
    caplog.set_level(logging.WARNING, logger="preprocessor_svc.replicas")
    r2.stop()  # stopped already when the whole module runs
    r2.start(dtype="bfloat16")
    await r2.wait_serving()
    replica = _replica(gateway, r2.target)
    await _until(lambda: replica.state is ReplicaState.INCOMPATIBLE, 30, "the refusal")
    assert "another model" in replica.reason and "bfloat16" in replica.reason
    assert any(r2.target in m and "bfloat16" in m and "float32" in m for m in caplog.messages)
    assert await check_health(_target(gateway), REPLICA_HEALTH_PREFIX + replica.address) == "NOT_SERVING"

    lonely = await PreprocessorApp.start(
        ProcessorConfig(model=str(llava_pipeline.model_dir), dtype="float32"),
        PoolConfig(workers=0),
        ServerOptions(metrics_port=None, grace_s=0.5),
        model_targets=(r2.target,),
    )
    try:
        await _until(lambda: lonely.replicas.replicas[0].state is ReplicaState.INCOMPATIBLE, 30, "refusal")
        assert await check_health(_target(lonely)) == "NOT_SERVING"
        started = time.monotonic()
        with pytest.raises(UpstreamError) as err:
            await _generate(_target(lonely), _chat(png(5)))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "another model" in err.value.message and r2.target in err.value.message
        assert time.monotonic() - started < 2.0
    finally:
        await lonely.close()
    # And the running gateway still serves on R1.
    assert len(_tokens(await _generate(_target(gateway), _chat(png(6))))) == GREEDY.max_tokens


async def test_gateway_for_other_model_files_waits_not_serving_and_says_why(
    llava_pipeline, e2e_models_root, caplog
) -> None:
    """A gateway for another model (qwen2_vl files) whose only replica serves llava: it never
    adopts that replica, stays NOT_SERVING, and its health and log name the replica and why."""
    caplog.set_level(logging.WARNING, logger="preprocessor_svc")
    other = await asyncio.to_thread(build_tiny_model, "qwen2_vl", e2e_models_root / "gw-qwen2_vl")
    port = _free_port()
    start = asyncio.ensure_future(PreprocessorApp.start(
        ProcessorConfig(model=str(other)),
        PoolConfig(workers=0),
        ServerOptions(port=port, metrics_port=None, grace_s=0.5),
        model_targets=(llava_pipeline.model_target,),
    ))
    target, entry = f"127.0.0.1:{port}", REPLICA_HEALTH_PREFIX + llava_pipeline.model_target
    try:
        await _until(lambda: any("another model" in m for m in caplog.messages), 30, "the refusal log")
        assert not start.done()
        assert await check_health(target) == "NOT_SERVING"
        assert await check_health(target, entry) == "NOT_SERVING"
        (line,) = {m for m in caplog.messages if "another model" in m}
        assert llava_pipeline.model_target in line and str(llava_pipeline.model_dir) in line
    finally:
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)


async def test_engine_death_turns_the_replica_not_serving(gateway, r2) -> None:
    """The engine core process dies under a running model service: its health turns
    NOT_SERVING, `vlm_engine_healthy` drops to 0, and requests get UNAVAILABLE, while the
    service process itself stays up to say so."""
    import psutil

    replica = _replica(gateway, r2.target)
    metrics_url = f"http://127.0.0.1:{r2.metrics_port}/metrics"

    def engine_healthy() -> float:
        import urllib.request

        body = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
        return float(next(l for l in body.splitlines() if l.startswith("vlm_engine_healthy ")).split()[1])

    assert await asyncio.to_thread(engine_healthy) == 1.0
    children = psutil.Process(r2.proc.pid).children(recursive=True)
    core = [p for p in children if "EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline())]
    assert core, [(p.name(), p.cmdline()) for p in children]
    for p in core:
        p.kill()
    deadline = time.monotonic() + 15
    while await check_health(r2.target, timeout=2) != "NOT_SERVING":
        assert time.monotonic() < deadline and r2.proc.poll() is None, r2.log_tail()
        await asyncio.sleep(0.2)
    assert await asyncio.to_thread(engine_healthy) == 0.0
    async with ModelClient(r2.target) as direct:
        with pytest.raises(UpstreamError) as err:
            async for _ in direct.generate(types.Prompt(replica.info.fingerprint, (1, 2, 3)), GREEDY):
                pass
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
