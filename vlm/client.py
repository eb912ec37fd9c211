"""Async Python client library for both services.

- `PreprocessorClient`: `preprocess`, `generate` (end to end), `model_info`.
- `ModelClient`: `generate` over a preprocessed prompt with hash-only resend: items whose
  hashes the model service was recently sent go as hash-only; if the service answers
  FAILED_PRECONDITION / MISSING_FEATURES before streaming, the missing items are resent with
  their fields once. `generate_raw` does the same on the wire form (`convert.EncodedPrompt`
  in, serialized `GenerateResponse`s out, nothing parsed): the preprocessor's relay.
- `check_health`: the standard grpc.health.v1 Check.

Errors surface as `vlm.errors.UpstreamError` carrying the status code, the reason and the field
from the server's `ErrorDetail`.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vlm import convert, types
from vlm.errors import UpstreamError
from vlm.common.v1 import generation_pb2 as gen_pb
from vlm.model.v1 import model_pb2, model_pb2_grpc
from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb
from vlm.preprocessor.v1 import preprocessor_pb2_grpc
from vlm.security import NO_SECURITY, ClientSecurity
from vlm.server import channel_options, error_detail_from_trailers


def upstream_error(err: grpc.aio.AioRpcError) -> UpstreamError:
    detail = error_detail_from_trailers(err.trailing_metadata())
    return UpstreamError(
        err.code(),
        err.details() or err.code().name,
        reason=detail.reason if detail and detail.reason else "UPSTREAM",
        field=detail.field if detail else None,
        missing_hashes=tuple(detail.missing_hashes) if detail else (),
    )


class _Client:
    def __init__(
        self,
        target: str,
        *,
        channel: grpc.aio.Channel | None = None,
        security: ClientSecurity = NO_SECURITY,
    ) -> None:
        self.target = target
        self._own_channel = channel is None
        self.channel = channel or security.channel(target, channel_options())
        #: Sent with every call: the bearer token, when there is one.
        self._md = security.metadata

    async def close(self) -> None:
        if self._own_channel:
            await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class ModelClient(_Client):
    """Client of `vlm.model.v1.ModelService`."""

    _GENERATE = "/{}/Generate".format(
        model_pb2.DESCRIPTOR.services_by_name["ModelService"].full_name
    )

    def __init__(
        self,
        target: str,
        *,
        channel: grpc.aio.Channel | None = None,
        security: ClientSecurity = NO_SECURITY,
        remember_hashes: int = 4096,
    ) -> None:
        super().__init__(target, channel=channel, security=security)
        self._stub = model_pb2_grpc.ModelServiceStub(self.channel)
        # Generate on the wire form: bytes in, bytes out (no serializers).
        self._generate_raw = self.channel.unary_stream(self._GENERATE)
        self._sent: OrderedDict[str, None] = OrderedDict()
        self._remember = remember_hashes
        #: Items sent again with their fields after MISSING_FEATURES (the receiver had lost them).
        self.resent_items = 0

    def has_sent(self, item_hash: str) -> bool:
        """Whether this client recently sent `item_hash` (its next request sends it hash-only)."""
        return item_hash in self._sent

    def _mark_sent(self, hashes: tuple[str, ...]) -> None:
        for h in hashes:
            self._sent[h] = None
            self._sent.move_to_end(h)
        while len(self._sent) > self._remember:
            self._sent.popitem(last=False)

    async def generate_raw(
        self,
        prompt: convert.EncodedPrompt,
        sampling: types.Sampling | gen_pb.SamplingParams,
        *,
        request_id: str = "",
        metadata: tuple[tuple[str, str], ...] = (),
        hash_only: bool = True,
        timeout: float | None = None,
    ) -> AsyncIterator[bytes]:
        """Stream serialized `vlm.model.v1.GenerateResponse` messages. With `hash_only`, items
        already sent travel as hashes; MISSING_FEATURES before the first message resends those
        items with their fields, once."""
        request_id = request_id or uuid.uuid4().hex
        hashes = prompt.hashes
        omit = {h for h in hashes if h in self._sent} if hash_only else set()
        if isinstance(sampling, types.Sampling):
            sampling = convert.sampling_to_pb(sampling)
        md = (("x-request-id", request_id), *self._md, *metadata)
        for attempt in range(2):
            req = convert.model_generate_request_bytes(
                request_id, prompt, sampling, omit_fields_for=omit
            )
            call = self._generate_raw(req, metadata=md, timeout=timeout)
            started = False
            try:
                async for resp in call:
                    if not started:
                        started = True
                        self._mark_sent(hashes)
                    yield resp
                return
            except grpc.aio.AioRpcError as err:
                exc = upstream_error(err)
                if (
                    not started
                    and attempt == 0
                    and exc.reason == "MISSING_FEATURES"
                    and set(exc.missing_hashes) <= omit
                ):
                    for h in exc.missing_hashes:
                        self._sent.pop(h, None)
                    omit -= set(exc.missing_hashes)
                    self.resent_items += len(exc.missing_hashes)
                    continue
                raise exc from None
            finally:
                call.cancel()  # no-op when finished; aborts upstream when we stop early

    async def generate(
        self,
        prompt: types.Prompt | convert.EncodedPrompt,
        sampling: types.Sampling,
        *,
        request_id: str = "",
        metadata: tuple[tuple[str, str], ...] = (),
        hash_only: bool = True,
    ) -> AsyncIterator[types.Chunk]:
        """Stream chunks (see `generate_raw`)."""
        encoded = prompt if isinstance(prompt, convert.EncodedPrompt) else convert.encode_prompt(prompt)
        stream = self.generate_raw(
            encoded, sampling, request_id=request_id, metadata=metadata, hash_only=hash_only
        )
        try:
            async for raw in stream:
                yield convert.chunk_from_pb(model_pb2.GenerateResponse.FromString(raw).chunk)
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> bool:
        try:
            resp = await self._stub.Abort(model_pb2.AbortRequest(request_id=request_id), metadata=self._md)
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err) from None
        return resp.found

    async def model_info(self, *, timeout: float | None = None) -> types.ModelInfo:
        try:
            resp = await self._stub.GetModelInfo(
                model_pb2.GetModelInfoRequest(), timeout=timeout, metadata=self._md
            )
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err) from None
        return convert.model_info_from_pb(resp.info)

    async def load(self) -> types.Load:
        try:
            r = await self._stub.GetLoad(model_pb2.GetLoadRequest(), metadata=self._md)
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err) from None
        return types.Load(
            r.running_requests, r.waiting_requests, r.kv_cache_usage,
            r.feature_store_items, r.feature_store_bytes,
        )


class PreprocessorClient(_Client):
    """Client of `vlm.preprocessor.v1.PreprocessorService`."""

    def __init__(
        self,
        target: str,
        *,
        channel: grpc.aio.Channel | None = None,
        security: ClientSecurity = NO_SECURITY,
    ) -> None:
        super().__init__(target, channel=channel, security=security)
        self._stub = preprocessor_pb2_grpc.PreprocessorServiceStub(self.channel)

    @staticmethod
    def _request(
        prompt: types.PromptInput,
        processor_kwargs: Mapping[str, Any] | None,
        request_id: str,
        omit_features_for: tuple[str, ...] = (),
    ) -> pre_pb.PreprocessRequest:
        prompt_pb, media_pb = convert.prompt_input_to_pb(prompt)
        return pre_pb.PreprocessRequest(
            request_id=request_id,
            prompt=prompt_pb,
            media=media_pb,
            processor_options=convert.processor_kwargs_to_pb(dict(processor_kwargs or {})),
            omit_features_for_hashes=list(omit_features_for),
        )

    async def preprocess_raw(
        self,
        prompt: types.PromptInput,
        processor_kwargs: Mapping[str, Any] | None = None,
        *,
        request_id: str = "",
    ) -> pre_pb.PreprocessResponse:
        req = self._request(prompt, processor_kwargs, request_id or uuid.uuid4().hex)
        try:
            return await self._stub.Preprocess(req, metadata=(("x-request-id", req.request_id), *self._md))
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err) from None

    async def preprocess(
        self,
        prompt: types.PromptInput,
        processor_kwargs: Mapping[str, Any] | None = None,
        *,
        request_id: str = "",
    ) -> types.Prompt:
        resp = await self.preprocess_raw(prompt, processor_kwargs, request_id=request_id)
        return convert.prompt_from_pb(resp.prompt)

    async def generate(
        self,
        prompt: types.PromptInput,
        sampling: types.Sampling,
        processor_kwargs: Mapping[str, Any] | None = None,
        *,
        request_id: str = "",
    ) -> AsyncIterator[types.Chunk]:
        req = pre_pb.GenerateRequest(
            input=self._request(prompt, processor_kwargs, request_id or uuid.uuid4().hex),
            sampling=convert.sampling_to_pb(sampling),
        )
        call = self._stub.Generate(req, metadata=(("x-request-id", req.input.request_id), *self._md))
        try:
            async for resp in call:
                yield convert.chunk_from_pb(resp.chunk)
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err) from None
        finally:
            call.cancel()

    async def model_info(self) -> types.ModelInfo:
        try:
            resp = await self._stub.GetModelInfo(pre_pb.GetModelInfoRequest(), metadata=self._md)
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err) from None
        return convert.model_info_from_pb(resp.info)


async def check_health(
    target: str, service: str = "", *, timeout: float = 5.0, security: ClientSecurity = NO_SECURITY
) -> str:
    """Return the health status name ("SERVING", "NOT_SERVING", ...) of `service` at `target`."""
    async with security.channel(target, channel_options()) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise upstream_error(err) from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
