"""Session-scoped engines for the model-service core tests (one engine per architecture/impl).

The engine core runs with the model inside its own process (VLLM_ENABLE_V1_MULTIPROCESSING=0:
no extra worker process), eager mode, float32, explicit KV-cache bytes.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from PIL import Image

from model_svc.config import EngineConfig
from model_svc.engine import Engine
from model_svc.stats import RequestStats
from vlm.testing.prompts import make_renderer, render_prompt
from vlm.testing.tiny_models import SPECS, build_tiny_model
from vlm.types import Prompt



def engine_args(model_dir: Path, **overrides):
    from vllm.engine.arg_utils import AsyncEngineArgs

    kwargs = dict(
        model=str(model_dir),
        max_model_len=1024,
        enforce_eager=True,
        dtype="float32",
        kv_cache_memory_bytes=128 << 20,
        mm_processor_cache_gb=0,
        disable_log_stats=True,
        seed=0,
    )
    kwargs.update(overrides)
    return AsyncEngineArgs(**kwargs)


@dataclass
class RecordingMetrics:
    finished: list[RequestStats] = field(default_factory=list)
    lookups: list[tuple[int, int]] = field(default_factory=list)

    def request_finished(self, stats: RequestStats) -> None:
        self.finished.append(stats)

    def feature_store_lookups(self, hits: int, misses: int) -> None:
        self.lookups.append((hits, misses))


@dataclass
class EngineHarness:
    """An engine plus what tests need to make prompts for it."""

    arch: str
    model_dir: Path
    engine: Engine
    renderer: object
    metrics: RecordingMetrics
    start_seconds: float

    @property
    def tokenizer(self):
        return self.renderer.get_tokenizer()

    def token_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def prompt(self, text: str, **mm_data) -> Prompt:
        """`text` holds the placeholder text once per item (e.g. "<image>")."""
        return render_prompt(
            self.renderer,
            self.token_ids(text),
            {k: v for k, v in mm_data.items() if v},
            self.engine.model_info().fingerprint,
        )


def image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


async def _start(arch: str, root: Path, **overrides) -> EngineHarness:
    model_dir = build_tiny_model(arch, root / arch)
    metrics = RecordingMetrics()
    t0 = time.monotonic()
    engine = await Engine.start(
        EngineConfig(engine_args(model_dir, **overrides), feature_store_bytes=1 << 20, metrics=metrics)
    )
    elapsed = time.monotonic() - t0
    return EngineHarness(arch, model_dir, engine, make_renderer(engine.vllm_config), metrics, elapsed)


@pytest.fixture(scope="session")
def models_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest_asyncio.fixture(scope="session")
async def llava(models_root):
    assert SPECS["llava"].runs_in_vllm
    h = await _start("llava", models_root)
    yield h
    await h.engine.close()


@pytest_asyncio.fixture(scope="session")
async def llava_transformers(models_root):
    h = await _start("llava", models_root, model_impl="transformers")
    yield h
    await h.engine.close()
