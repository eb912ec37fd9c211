"""Assembles the preprocessor service: domain core + servicer + gRPC app (used by `main` and tests)."""

from __future__ import annotations

from dataclasses import dataclass

from preprocessor_svc.metrics import PreprocessorMetrics
from preprocessor_svc.pool import Preprocessor
from preprocessor_svc.processing import PreprocessorConfig
from preprocessor_svc.servicer import PreprocessorServicer
from vlm.client import ModelClient
from vlm.preprocessor.v1 import preprocessor_pb2, preprocessor_pb2_grpc
from vlm.server import GrpcApp, ServerOptions

SERVICE_NAME = preprocessor_pb2.DESCRIPTOR.services_by_name["PreprocessorService"].full_name


@dataclass
class PreprocessorApp:
    grpc: GrpcApp
    preprocessor: Preprocessor
    model_client: ModelClient | None

    @classmethod
    async def start(
        cls,
        config: PreprocessorConfig,
        options: ServerOptions,
        metrics: PreprocessorMetrics | None = None,
        *,
        model_target: str | None = None,
    ) -> PreprocessorApp:
        """Bind the port (NOT_SERVING), start and warm the workers, then report SERVING."""
        metrics = metrics or PreprocessorMetrics()
        app = GrpcApp("preprocessor", options, metrics)
        preprocessor = None
        model_client = ModelClient(model_target) if model_target else None
        try:
            # The port is bound before the workers start, so health checks see NOT_SERVING
            # during warm-up (and RPCs get UNAVAILABLE) rather than a refused connection.
            servicer = PreprocessorServicer(metrics, model_client)
            app.add_service(
                preprocessor_pb2_grpc.add_PreprocessorServiceServicer_to_server, servicer, SERVICE_NAME
            )
            await app.start()
            preprocessor = await Preprocessor.start(config)
            metrics.bind(preprocessor)
            servicer.attach(preprocessor)
            await app.set_serving(True)
        except BaseException:
            await app.stop(0)
            if preprocessor is not None:
                await preprocessor.close()
            if model_client is not None:
                await model_client.close()
            raise
        return cls(app, preprocessor, model_client)

    async def close(self) -> None:
        await self.grpc.stop(0)
        await self.preprocessor.close()
        if self.model_client is not None:
            await self.model_client.close()
