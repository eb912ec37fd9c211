"""vlm.server over a real gRPC server on 127.0.0.1:0: health, reflection, error mapping,
metrics exposition and graceful shutdown. The servicer is a minimal stand-in whose handlers
raise on purpose; the plumbing around it is the real one both services use."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from vlm import errors
from vlm.common.v1 import generation_pb2 as gen_pb
from vlm.model.v1 import model_pb2, model_pb2_grpc
from vlm.server import BaseMetrics, GrpcApp, ServerOptions, channel_options, error_detail_from_trailers

SERVICE = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name


class _Servicer(model_pb2_grpc.ModelServiceServicer):
    async def GetModelInfo(self, request, context):
        raise errors.InvalidArgument("bad thing", field="prompt.items[0].hash")

    async def GetLoad(self, request, context):
        return model_pb2.GetLoadResponse(running_requests=3)

    async def Abort(self, request, context):
        raise RuntimeError("boom")

    async def Generate(self, request, context):
        yield model_pb2.GenerateResponse(chunk=gen_pb.GenerationChunk(request_id="r", token_ids=[1]))
        raise errors.MissingFeatures(["aa", "bb"], field="prompt.items")


@pytest.fixture
async def app():
    app = GrpcApp("test", ServerOptions(grace_s=0.5), BaseMetrics("test"))
    app.add_service(model_pb2_grpc.add_ModelServiceServicer_to_server, _Servicer(), SERVICE)
    await app.start()
    yield app
    await app.stop(0)


async def test_health_serving_only_after_warmup(app: GrpcApp) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", SERVICE):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await app.set_serving(True)
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(app: GrpcApp) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def requests():
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for resp in stub.ServerReflectionInfo(requests()):
            names = {s.name for s in resp.list_services_response.service}
            break
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_unary_error_maps_to_status_with_detail(app: GrpcApp) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=channel_options()) as ch:
        stub = model_pb2_grpc.ModelServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.GetModelInfo(model_pb2.GetModelInfoRequest())
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "prompt.items[0].hash" in exc.value.details()
        detail = error_detail_from_trailers(exc.value.trailing_metadata())
        assert detail.reason == "INVALID_ARGUMENT" and detail.field == "prompt.items[0].hash"

        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Abort(model_pb2.AbortRequest(request_id="x"))
        assert exc.value.code() == grpc.StatusCode.INTERNAL

        # The server is still up and answers.
        assert (await stub.GetLoad(model_pb2.GetLoadRequest())).running_requests == 3


async def test_streaming_error_after_first_chunk(app: GrpcApp) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = model_pb2_grpc.ModelServiceStub(ch)
        call = stub.Generate(model_pb2.GenerateRequest())
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for resp in call:
                got.append(resp)
        assert len(got) == 1
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        detail = error_detail_from_trailers(exc.value.trailing_metadata())
        assert detail.reason == "MISSING_FEATURES" and list(detail.missing_hashes) == ["aa", "bb"]


async def test_metrics_endpoint_exposes_build_info_and_request_counts(app: GrpcApp) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = model_pb2_grpc.ModelServiceStub(ch)
        await stub.GetLoad(model_pb2.GetLoadRequest())
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetModelInfo(model_pb2.GetModelInfoRequest())
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics").read().decode()
    )
    assert 'vlm_build_info{' in body and 'service="test"' in body
    assert 'vlm_grpc_requests_total{code="OK",method="/vlm.model.v1.ModelService/GetLoad"} 1.0' in body
    assert 'vlm_grpc_requests_total{code="INVALID_ARGUMENT",method="/vlm.model.v1.ModelService/GetModelInfo"} 1.0' in body
    assert "vlm_grpc_request_duration_seconds_bucket" in body


async def test_graceful_stop_flips_health_and_closes() -> None:
    app = GrpcApp("test", ServerOptions(grace_s=0.5, metrics_port=None), BaseMetrics("test"))
    app.add_service(model_pb2_grpc.add_ModelServiceServicer_to_server, _Servicer(), SERVICE)
    await app.start()
    await app.set_serving(True)
    serving = asyncio.create_task(app.serve_until_signal())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        app.request_stop()
        second = await watch.read()
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await asyncio.wait_for(serving, 5)


class _Blocking(model_pb2_grpc.ModelServiceServicer):
    """Generate answers once `release` is set, and ends once `finish` is."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.finish = asyncio.Event()
        self.entered = 0

    async def Generate(self, request, context):
        self.entered += 1
        await self.release.wait()
        yield model_pb2.GenerateResponse(chunk=gen_pb.GenerationChunk(request_id=request.request_id))
        await self.finish.wait()
        yield model_pb2.GenerateResponse(chunk=gen_pb.GenerationChunk(request_id="end"))


async def test_request_memory_budget_holds_back_messages_until_there_is_room() -> None:
    """4 MiB messages, an 8 MiB budget: two 3 MiB requests are read and held (3 + 3 MiB), the
    third waits unread (reading it could bring 4 MiB more), a fourth finds the waiting room
    full and is RESOURCE_EXHAUSTED at once. Once the first two answer (their first message),
    their bytes are given back and the third is read, while all three streams are still open;
    every admitted request completes."""
    MiB = 1 << 20
    options = ServerOptions(grace_s=0.5, max_message_bytes=4 * MiB,
                            max_request_memory_bytes=8 * MiB, max_waiting_rpcs=1)
    metrics = BaseMetrics("test")
    servicer = _Blocking()
    app = GrpcApp("test", options, metrics)
    app.add_service(model_pb2_grpc.add_ModelServiceServicer_to_server, servicer, SERVICE)
    await app.start()

    def request(i: int) -> model_pb2.GenerateRequest:
        req = model_pb2.GenerateRequest(request_id=f"r{i}")
        req.prompt.items.add(hash="a" * (3 * MiB))
        return req

    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{app.port}", options=channel_options(8 * MiB)
        ) as ch:
            stub = model_pb2_grpc.ModelServiceStub(ch)

            async def generate(i: int) -> list[str]:
                return [r.chunk.request_id async for r in stub.Generate(request(i))]

            admitted = [asyncio.create_task(generate(i)) for i in range(2)]
            for _ in range(200):
                if servicer.entered == 2:
                    break
                await asyncio.sleep(0.01)
            waiting = asyncio.create_task(generate(2))
            for _ in range(200):
                if metrics.request_memory_waiting._value.get() == 1:
                    break
                await asyncio.sleep(0.01)
            assert servicer.entered == 2
            held = metrics.request_memory._value.get()
            assert 6 * MiB <= held < 7 * MiB  # two messages' own sizes
            assert metrics.request_memory_limit._value.get() == 8 * MiB

            loop = asyncio.get_running_loop()
            t = loop.time()
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await generate(3)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert loop.time() - t < 0.1 and "request memory" in exc.value.details()

            servicer.release.set()
            for _ in range(200):
                if servicer.entered == 3 and metrics.request_memory._value.get() == 0:
                    break
                await asyncio.sleep(0.01)
            assert servicer.entered == 3 and metrics.request_memory._value.get() == 0
            assert not any(t.done() for t in (*admitted, waiting))  # streams still open
            servicer.finish.set()
            assert await asyncio.gather(*admitted, waiting) == [["r0", "end"], ["r1", "end"], ["r2", "end"]]
        assert metrics.request_memory._value.get() == 0
        assert metrics.request_memory_waiting._value.get() == 0
    finally:
        await app.stop(0)
