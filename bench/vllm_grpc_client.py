"""A minimal client of vLLM's own gRPC server (`python -m vllm.entrypoints.launchers.grpc_server`).

That server is vLLM's launcher around `smg_grpc_servicer.vllm.servicer.VllmEngineServicer`
(package `smg-grpc-servicer`, proto stubs from `smg-grpc-proto`; neither is in this project's
lock). Its `vllm.grpc.engine.VllmEngine/Generate` takes *preprocessed* multimodal input: token
IDs with the placeholders already expanded (`tokenized.input_ids`) plus a `MultimodalInputs`
batch per modality (the primary tensor in `pixel_values`, other tensors in
`model_specific_tensors`, field layouts via `batched_keys` / `flat_keys`, one
`PlaceholderRange(offset, length)` and one hash per item, `im_token_id` to rebuild `is_embed`).
The servicer turns that into `vllm.inputs.mm_input(...)`, the same engine input the model
service builds, so the benchmark can send it the very `vlm.types.Prompt`s that the
preprocessor service produced.

Only what the benchmark needs is mapped: batched fields (LLaVA's `pixel_values`; flat fields
would need a sizes tensor the model accepts, e.g. Qwen2-VL's `image_grid_thw`); `is_embed` masks are passed as
`im_token_id` (the servicer marks a position embed iff it holds that token, which is how vLLM
lays out the placeholders of the models it serves).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from vlm import types

_DTYPES = {"torch.float32": "float32", "torch.bfloat16": "bfloat16", "torch.float16": "float16",
           "torch.uint8": "uint8", "torch.int64": "int64", "torch.uint32": "uint32"}


def available() -> str | None:
    """None if the server and its stubs can be imported here, else why not."""
    import importlib.util

    for mod in ("smg_grpc_proto", "smg_grpc_servicer"):
        try:
            if importlib.util.find_spec(mod) is None:
                return (f"module {mod!r} not installed (uv pip install --no-deps smg-grpc-servicer==0.14.1 "
                        "smg-grpc-proto)")
        except (ImportError, ValueError) as e:
            return f"module {mod!r}: {e}"
    return None


def _tensor(pb: Any, t: Any) -> Any:
    import torch

    t = t.contiguous()
    name = _DTYPES.get(str(t.dtype))
    if name is None:
        raise NotImplementedError(f"dtype {t.dtype} has no vllm_engine.proto name")
    if t.dtype == torch.bfloat16:
        raw = t.view(torch.int16).numpy().tobytes()
    else:
        raw = t.numpy().tobytes()
    return pb.TensorData(shape=list(t.shape), dtype=name, inline=raw)


def generate_request(prompt: types.Prompt, sampling: types.Sampling, request_id: str = "") -> Any:
    """`vlm.types.Prompt` (with item fields) → `vllm.grpc.engine.GenerateRequest`, streamed."""
    import torch
    from smg_grpc_proto import vllm_engine_pb2 as pb
    from smg_grpc_proto.generated import common_pb2

    batches = []
    by_modality: dict[types.Modality, list[types.Item]] = {}
    for item in prompt.items:
        by_modality.setdefault(item.modality, []).append(item)
    for modality, items in by_modality.items():
        if modality not in (types.Modality.IMAGE, types.Modality.VIDEO):
            raise NotImplementedError(f"modality {modality.value} has no vllm_engine.proto batch")
        mm = pb.MultimodalInputs(modality=common_pb2.VIDEO if modality is types.Modality.VIDEO else common_pb2.IMAGE)
        names = list(items[0].fields or {})
        for item in items:
            if item.fields is None or list(item.fields) != names:
                raise NotImplementedError("every item needs the same fields (hash-only items are not mapped)")
        for name in names:
            f0 = items[0].fields[name]
            if f0.layout is types.FieldLayout.BATCHED:
                data = torch.stack([it.fields[name].data for it in items])
                mm.batched_keys.append(name)
            else:
                raise NotImplementedError(f"field {name!r}: layout {f0.layout.value} not mapped")
            if f0.keep_on_cpu:
                mm.keep_on_cpu_keys.append(name)
            if name == "pixel_values":
                mm.pixel_values.CopyFrom(_tensor(pb, data))
            else:
                mm.model_specific_tensors[name].CopyFrom(_tensor(pb, data))
        for item in items:
            ph = item.placeholder
            mm.mm_placeholders.append(pb.PlaceholderRange(offset=ph.offset, length=ph.length))
            mm.mm_hashes.append(item.hash)
            if ph.is_embed is not None and not all(ph.is_embed):
                embed_at = ph.offset + ph.is_embed.index(True)
                mm.im_token_id = prompt.token_ids[embed_at]
        batches.append(mm)
    req = pb.GenerateRequest(
        request_id=request_id or uuid.uuid4().hex,
        tokenized=pb.TokenizedInput(input_ids=list(prompt.token_ids)),
        sampling_params=_sampling(pb, sampling),
        stream=True,
    )
    if batches:
        req.mm_inputs.CopyFrom(batches[0])
        for extra in batches[1:]:
            req.extra_mm_inputs.append(extra)
    return req


def _sampling(pb: Any, s: types.Sampling) -> Any:
    sp = pb.SamplingParams(ignore_eos=s.ignore_eos, n=1)
    if s.temperature is not None:
        sp.temperature = s.temperature
    if s.max_tokens is not None:
        sp.max_tokens = s.max_tokens
    if s.top_p is not None:
        sp.top_p = s.top_p
    if s.top_k is not None:
        sp.top_k = s.top_k
    if s.seed is not None:
        sp.seed = s.seed
    return sp


class VllmGrpcClient:
    """One channel to the server; `generate` streams (token_ids, prompt_tokens) per chunk."""

    def __init__(self, target: str) -> None:
        import grpc
        from smg_grpc_proto import vllm_engine_pb2_grpc

        from vlm.server import channel_options

        self.channel = grpc.aio.insecure_channel(target, options=channel_options())
        self.stub = vllm_engine_pb2_grpc.VllmEngineStub(self.channel)

    async def generate(self, prompt: types.Prompt, sampling: types.Sampling):
        call = self.stub.Generate(generate_request(prompt, sampling))
        try:
            async for resp in call:
                if resp.HasField("chunk"):
                    yield tuple(resp.chunk.token_ids), resp.chunk.prompt_tokens
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()


async def timed_request(client: VllmGrpcClient, prompt: types.Prompt, sampling: types.Sampling) -> dict[str, Any]:
    start = time.perf_counter()
    first, n, ptoks, ids = None, 0, None, []
    async for token_ids, prompt_tokens in client.generate(prompt, sampling):
        if token_ids and first is None:
            first = time.perf_counter()
        n += len(token_ids)
        ids += token_ids
        if prompt_tokens:
            ptoks = prompt_tokens
    # The server does not detokenize (the router it is made for does): token IDs only.
    return {"start": start, "first": first, "end": time.perf_counter(), "tokens": n, "prompt_tokens": ptoks,
            "output": {"token_ids": ids, "text": None}}
