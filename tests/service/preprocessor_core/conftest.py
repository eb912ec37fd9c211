"""Per-architecture fixtures for the preprocessor tests.

For each tiny architecture (built once per session with `vlm.testing.tiny_models`) a session
keeps three things side by side:

* `processor`: our `preprocessor_svc.processing.Processor` (in-process, no worker pool);
* `service`: the real preprocessor gRPC service (`PreprocessorApp`: servicer, conversions,
  tensor codec, error interceptor) on 127.0.0.1:0, run on its own event-loop thread;
* `reference`: a plain vLLM renderer (`renderer_from_config`, processor cache off) that the
  tests call directly, exactly as vLLM's frontend would, to get the expected `MultiModalInput`.

`ArchEnv.process(...)` runs a prompt through both the processor and the service and checks that
they agree: the same Prompt (bit-identical tensors after the wire) or, for a bad request, the
exception's gRPC status code, reason and field at the client.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from preprocessor_svc.pool import PoolConfig
from preprocessor_svc.processing import PreprocessResult, Processor, ProcessorConfig
from vlm import convert
from vlm.digest import item_digest
from vlm.errors import VlmError
from vlm.vllm_mm import item_fields
from vlm.types import Prompt, PromptInput

ARCHS = ("llava", "qwen2_vl", "llava_onevision", "mistral3", "gemma3", "idefics3", "fuyu")

_lock = threading.Lock()


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory) -> Path:
    root = os.environ.get("VLM_TINY_MODELS_DIR")
    return Path(root) if root else tmp_path_factory.mktemp("preprocessor_tiny_models")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_root):
    """tiny_model(arch) -> model dir. A builder that fails is a failure, never a skip."""
    from vlm.testing import tiny_models

    def get(arch: str) -> Path:
        assert arch in tiny_models.SPECS, f"vlm.testing.tiny_models has no {arch}"
        with _lock:
            return tiny_models.build_tiny_model(arch, tiny_model_root / arch)

    return get


class ServiceThread:
    """The real preprocessor gRPC service on its own event loop, called with a sync stub."""

    def __init__(self, config: ProcessorConfig) -> None:
        import grpc

        from vlm.preprocessor.v1 import preprocessor_pb2_grpc

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.app = asyncio.run_coroutine_threadsafe(self._start(config), self._loop).result(300)
        self._channel = grpc.insecure_channel(f"127.0.0.1:{self.app.grpc.port}")
        self.stub = preprocessor_pb2_grpc.PreprocessorServiceStub(self._channel)

    @staticmethod
    async def _start(config: ProcessorConfig):
        from preprocessor_svc.app import PreprocessorApp
        from vlm.server import ServerOptions

        return await PreprocessorApp.start(
            config, PoolConfig(workers=0), ServerOptions(metrics_port=None, grace_s=0)
        )

    def preprocess(self, prompt: PromptInput, kwargs: dict[str, Any] | None = None) -> Prompt:
        """One Preprocess RPC; a failed call raises grpc.RpcError."""
        from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb

        prompt_pb, media_pb = convert.prompt_input_to_pb(prompt)
        req = pre_pb.PreprocessRequest(
            prompt=prompt_pb, media=media_pb, processor_options=convert.processor_kwargs_to_pb(kwargs)
        )
        return convert.prompt_from_pb(self.stub.Preprocess(req, timeout=120).prompt)

    def close(self) -> None:
        self._channel.close()
        asyncio.run_coroutine_threadsafe(self.app.close(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def assert_same_prompt(a: Prompt, b: Prompt) -> None:
    assert a.fingerprint == b.fingerprint
    assert a.token_ids == b.token_ids and a.prompt_text == b.prompt_text
    assert len(a.items) == len(b.items)
    for x, y in zip(a.items, b.items):
        assert (x.modality, x.hash, x.placeholder) == (y.modality, y.hash, y.placeholder)
        assert set(x.fields) == set(y.fields)
        for name, f in x.fields.items():
            g = y.fields[name]
            assert (f.layout, f.flat_dim, f.keep_on_cpu) == (g.layout, g.flat_dim, g.keep_on_cpu), name
            assert f.data.dtype == g.data.dtype and torch.equal(f.data, g.data), name


@dataclass
class ArchEnv:
    arch: str
    model_impl: str
    model_dir: Path
    spec: Any
    processor: Processor
    reference: Any  # vLLM HfRenderer
    service: ServiceThread
    timings: dict[str, float] = field(default_factory=dict)

    def process(self, prompt: PromptInput, kwargs: dict[str, Any] | None = None) -> PreprocessResult:
        return process_both(self.processor, self.service, prompt, kwargs)


    @property
    def tokenizer(self):
        return self.reference.get_tokenizer()

    @property
    def has_video(self) -> bool:
        return bool(self.spec.video_token)

    # -- reference processing, straight through vLLM ------------------------------------------

    def ref_image(self, data: bytes):
        from vllm.multimodal.media.image import ImageMediaIO

        return ImageMediaIO().load_bytes(data)

    def ref_video(self, data: bytes, **io_kwargs):
        """Decoded the way vLLM's chat path decodes a video URL (MediaConnector.fetch_video)."""
        from vllm.multimodal.media.connector import MediaConnector
        from vllm.transformers_utils.processor import get_video_processor_cls_name

        connector = MediaConnector(media_io_kwargs={"video": io_kwargs} if io_kwargs else None)
        return connector.fetch_video(
            data_url("video/mp4", data),
            video_processor=get_video_processor_cls_name(self.reference.model_config),
        )

    def ref_completion(self, prompt: dict[str, Any]) -> dict[str, Any]:
        return self.reference.render_cmpl([prompt])[0]

    def ref_chat(self, messages: list[dict[str, Any]], **media_io) -> dict[str, Any]:
        from vllm.renderers.params import ChatParams

        params = ChatParams(
            chat_template_kwargs={"add_generation_prompt": True},
            media_io_kwargs=media_io or None,
        )
        _, prompts = self.reference.render_chat([messages], params)
        return prompts[0]


def process_both(
    processor: Processor, service: ServiceThread, prompt: PromptInput, kwargs: dict[str, Any] | None
) -> PreprocessResult:
    """Process in-process and over the real service; both must agree (result or status)."""
    import grpc

    from vlm.server import error_detail_from_trailers

    try:
        res = processor.process(prompt, kwargs)
    except VlmError as e:
        with pytest.raises(grpc.RpcError) as over_wire:
            service.preprocess(prompt, kwargs)
        err = over_wire.value
        detail = error_detail_from_trailers(err.trailing_metadata())
        assert err.code() == e.code, (err.code(), e.code, err.details())
        assert (detail.reason, detail.field) == (e.reason, e.field or ""), err.details()
        raise
    assert_same_prompt(service.preprocess(prompt, kwargs), res.prompt)
    return res


class CheckedProcessor:
    """A Processor whose `process` also runs over its own real service (see `process_both`)."""

    def __init__(self, config: ProcessorConfig) -> None:
        self.processor = Processor(config)
        self.service = ServiceThread(config)

    def process(self, prompt: PromptInput, kwargs: dict[str, Any] | None = None) -> PreprocessResult:
        return process_both(self.processor, self.service, prompt, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.processor, name)

    def close(self) -> None:
        self.service.close()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def make_reference(model_dir: Path, model_impl: str):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers.registry import renderer_from_config

    config = EngineArgs(
        model=str(model_dir),
        model_impl=model_impl,
        # No processor cache: every call processes from scratch (with vLLM's default cache a
        # repeated item comes back without data). Prefix caching keeps content hashes on.
        mm_processor_cache_gb=0,
        enable_prefix_caching=True,
    ).create_engine_config()
    return renderer_from_config(config)


@pytest.fixture(scope="session")
def arch_env(tiny_model):
    """arch_env(arch, model_impl="auto") -> ArchEnv, cached for the session."""
    cache: dict[tuple[str, str], ArchEnv] = {}

    def get(arch: str, model_impl: str = "auto") -> ArchEnv:
        key = (arch, model_impl)
        from vlm.testing.tiny_models import SPECS

        if key not in cache:
            if not SPECS[arch].runs_in_vllm:
                pytest.skip(f"vLLM 0.32 cannot process {arch} (see test_arch_vllm_cannot_process)")
            model_dir = tiny_model(arch)
            t0 = time.perf_counter()
            processor = Processor(ProcessorConfig(model=str(model_dir), model_impl=model_impl))
            t1 = time.perf_counter()
            processor.warmup()
            t2 = time.perf_counter()
            reference = make_reference(model_dir, model_impl)
            t3 = time.perf_counter()
            service = ServiceThread(processor.config)
            services.append(service)
            cache[key] = ArchEnv(
                arch,
                model_impl,
                model_dir,
                SPECS[arch],
                processor,
                reference,
                service,
                {"processor_build_s": t1 - t0, "warmup_s": t2 - t1, "reference_build_s": t3 - t2},
            )
        return cache[key]

    services: list[ServiceThread] = []
    yield get
    for service in services:
        service.close()


def assert_matches_reference(prompt: Prompt, ref: dict[str, Any]) -> None:
    """`prompt` carries exactly what vLLM computed in-process: token IDs, and per item the
    modality, hash (the digest of vLLM's features), placeholder range (offset, length, is_embed) and every field tensor
    (bit-identical, same dtype), layout, flat dim and keep_on_cpu."""
    from vllm.multimodal.inputs import MultiModalBatchedField, MultiModalFlatField, MultiModalSharedField

    assert list(prompt.token_ids) == list(ref["prompt_token_ids"])
    expected = []
    if ref["type"] == "multimodal":
        for modality, ranges in ref["mm_placeholders"].items():
            hashes = ref["mm_hashes"][modality]
            kwargs = ref["mm_kwargs"][modality]
            assert len(ranges) == len(hashes) == len(kwargs)
            expected += [(modality, h, r, kw) for r, h, kw in zip(ranges, hashes, kwargs)]
    expected.sort(key=lambda e: e[2].offset)
    assert len(prompt.items) == len(expected)
    assert [it.placeholder.offset for it in prompt.items] == sorted(it.placeholder.offset for it in prompt.items)
    for item, (modality, h, rng, kw) in zip(prompt.items, expected):
        assert item.modality.value == modality
        # The hash is the digest of vLLM's own features for the item (vLLM's media hash `h`
        # keys only the preprocessor's processor cache).
        assert item.hash == item_digest(item.modality, item_fields(kw)), h
        assert (item.placeholder.offset, item.placeholder.length) == (rng.offset, rng.length)
        if rng.is_embed is None:
            assert item.placeholder.is_embed is None
        else:
            assert item.placeholder.is_embed == tuple(bool(b) for b in rng.is_embed.tolist())
        assert kw is not None
        assert item.fields is not None and set(item.fields) == set(kw)
        for name, elem in kw.items():
            got = item.fields[name]
            assert isinstance(elem.data, torch.Tensor)
            assert got.data.dtype == elem.data.dtype, name
            assert got.data.shape == elem.data.shape, name
            assert torch.equal(got.data, elem.data), name
            assert got.keep_on_cpu == elem.field.keep_on_cpu, name
            if isinstance(elem.field, MultiModalFlatField):
                assert (got.layout.value, got.flat_dim) == ("flat", elem.field.dim), name
            elif isinstance(elem.field, MultiModalBatchedField):
                assert got.layout.value == "batched", name
            else:
                assert isinstance(elem.field, MultiModalSharedField)
                assert got.layout.value == "shared", name
