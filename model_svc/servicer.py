"""ModelService servicer: convert the request, call the engine, convert back. Nothing else."""

from __future__ import annotations

import uuid

from model_svc.engine import Engine
from vlm import convert
from vlm.errors import Unavailable
from vlm.model.v1 import model_pb2, model_pb2_grpc
from vlm.server import request_id_var


class ModelServicer(model_pb2_grpc.ModelServiceServicer):
    def __init__(self, engine: Engine | None = None) -> None:
        self._ready = engine

    def attach(self, engine: Engine) -> None:
        """Start serving requests with a warmed-up engine."""
        self._ready = engine

    @property
    def _engine(self) -> Engine:
        if self._ready is None:
            raise Unavailable("the engine is warming up")
        return self._ready

    async def Generate(self, request, context):
        request_id = request.request_id or uuid.uuid4().hex
        request_id_var.set(request_id)
        engine = self._engine
        prompt = convert.prompt_from_pb(request.prompt, field="prompt")
        sampling = convert.sampling_from_pb(request.sampling)
        async for chunk in engine.generate(request_id, prompt, sampling):
            yield model_pb2.GenerateResponse(chunk=convert.chunk_to_pb(chunk))

    async def Abort(self, request, context):
        request_id_var.set(request.request_id)
        return model_pb2.AbortResponse(found=await self._engine.abort(request.request_id))

    async def GetModelInfo(self, request, context):
        return model_pb2.GetModelInfoResponse(info=convert.model_info_to_pb(self._engine.model_info()))

    async def GetLoad(self, request, context):
        load = self._engine.load()
        return model_pb2.GetLoadResponse(
            running_requests=load.running,
            waiting_requests=load.waiting,
            kv_cache_usage=load.kv_cache_usage,
            feature_store_items=load.feature_store_items,
            feature_store_bytes=load.feature_store_bytes,
        )
