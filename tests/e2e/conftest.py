"""Both services for real on loopback: a ModelApp (vLLM engine) and a PreprocessorApp (worker
process) that forwards to it, one pair per architecture per test session."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from model_svc.app import ModelApp
from model_svc.config import EngineConfig
from preprocessor_svc.app import PreprocessorApp
from preprocessor_svc.pool import PoolConfig
from preprocessor_svc.processing import ProcessorConfig
from vlm.client import ModelClient, PreprocessorClient
from vlm.server import ServerOptions
from vlm.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.engine


@dataclass
class Pipeline:
    arch: str
    model_dir: Path
    model: ModelApp
    pre: PreprocessorApp

    @property
    def model_target(self) -> str:
        return f"127.0.0.1:{self.model.grpc.port}"

    @property
    def pre_target(self) -> str:
        return f"127.0.0.1:{self.pre.grpc.port}"

    def pre_client(self) -> PreprocessorClient:
        return PreprocessorClient(self.pre_target)

    def model_client(self) -> ModelClient:
        return ModelClient(self.model_target)


def png(seed: int, size: tuple[int, int] = (48, 40)) -> bytes:
    rng = np.random.RandomState(seed)
    img = Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def engine_finished_requests(pipeline: Pipeline) -> float:
    """Requests the model service's engine finished, any reason (a refused request adds none;
    a cancelled stream counts as ABORT)."""
    return sum(
        s.value
        for metric in pipeline.model.grpc.metrics.registry.collect()
        if metric.name == "vlm_request_success"
        for s in metric.samples
        if s.name == "vlm_request_success_total"
    )


async def start_pipeline(arch: str, root: Path, **engine_overrides) -> Pipeline:
    from vllm.engine.arg_utils import AsyncEngineArgs

    model_dir = build_tiny_model(arch, root / arch)
    args = dict(
        model=str(model_dir),
        max_model_len=1024,
        enforce_eager=True,
        dtype="float32",
        kv_cache_memory_bytes=128 << 20,
        mm_processor_cache_gb=0,
        seed=0,
    )
    args.update(engine_overrides)
    model = await ModelApp.start(
        EngineConfig(engine_args=AsyncEngineArgs(**args)), ServerOptions(grace_s=1.0)
    )
    try:
        pre = await PreprocessorApp.start(
            ProcessorConfig(
                model=str(model_dir),
                model_impl=args.get("model_impl", "auto"),
                max_model_len=1024,
                dtype="float32",
            ),
            PoolConfig(workers=1),
            ServerOptions(grace_s=1.0),
            model_targets=(f"127.0.0.1:{model.grpc.port}",),
        )
    except BaseException:
        await model.close()
        raise
    return Pipeline(arch, model_dir, model, pre)


@pytest.fixture(scope="session")
def e2e_models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e_models")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def llava_pipeline(e2e_models_root):
    p = await start_pipeline("llava", e2e_models_root)
    yield p
    await p.pre.close()
    await p.model.close()
