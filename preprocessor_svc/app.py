"""Assembles the preprocessor service: domain core + servicer + gRPC app (used by `main` and tests)."""

from __future__ import annotations

from dataclasses import dataclass

from preprocessor_svc.metrics import PreprocessorMetrics
from preprocessor_svc.pool import PoolConfig, Preprocessor
from preprocessor_svc.processing import ProcessorConfig
from preprocessor_svc.servicer import SERVICE_NAME, PreprocessorServicer, add_to_server
from vlm.client import ModelClient
from vlm.server import GrpcApp, ServerOptions, freeze_gc_heap


@dataclass
class PreprocessorApp:
    grpc: GrpcApp
    preprocessor: Preprocessor
    model_client: ModelClient | None

    @classmethod
    async def start(
        cls,
        config: ProcessorConfig,
        pool: PoolConfig,
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
            app.add_service(add_to_server, servicer, SERVICE_NAME)
            await app.start()
            preprocessor = await Preprocessor.start(config, pool)
            metrics.bind(preprocessor)
            servicer.attach(preprocessor)
            freeze_gc_heap()
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
