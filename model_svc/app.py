"""Assembles the model service: engine + servicer + gRPC app (used by `main` and tests)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass

from model_svc.config import EngineConfig
from model_svc.engine import Engine
from model_svc.metrics import ModelMetrics
from model_svc.servicer import ModelServicer
from vlm.model.v1 import model_pb2, model_pb2_grpc
from vlm.process import freeze_gc_heap
from vlm.server import GrpcApp, ServerOptions

log = logging.getLogger(__name__)

SERVICE_NAME = model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name


@dataclass
class ModelApp:
    grpc: GrpcApp
    engine: Engine
    _watch: asyncio.Task | None = None

    @classmethod
    async def start(
        cls, config: EngineConfig, options: ServerOptions, metrics: ModelMetrics | None = None
    ) -> ModelApp:
        """Bind the port (NOT_SERVING), start and warm up vLLM, then report SERVING."""
        metrics = metrics or ModelMetrics()
        app = GrpcApp("model", options, metrics)
        servicer = ModelServicer()
        app.add_service(model_pb2_grpc.add_ModelServiceServicer_to_server, servicer, SERVICE_NAME)
        await app.start()
        try:
            engine = await Engine.start(dataclasses.replace(config, metrics=metrics))
        except BaseException:
            await app.stop(0)
            raise
        metrics.bind(engine)
        servicer.attach(engine)
        freeze_gc_heap()
        await app.set_serving(True)
        self = cls(app, engine)
        self._watch = asyncio.create_task(self._watch_engine())
        return self

    async def _watch_engine(self, period_s: float = 1.0) -> None:
        """An engine death turns health NOT_SERVING (in-flight streams fail with UNAVAILABLE)."""
        while self.engine.healthy:
            await asyncio.sleep(period_s)
        log.error("vLLM engine is dead; reporting NOT_SERVING")
        await self.grpc.set_serving(False)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.grpc.stop(0)
        await self.engine.close()
