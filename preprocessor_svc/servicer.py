"""PreprocessorService servicer: convert the request, call the domain, convert back.

`Preprocess` and `Generate` answer with bytes: the prompt is already in its wire form
(`convert.EncodedPrompt`, encoded by the worker process), and `Generate` relays the model
service's `GenerateResponse` messages as they arrive, unparsed (the preprocessor's
`GenerateResponse` has the same layout; `tests/unit/test_convert.py` checks it). `add_to_server`
registers the service with pass-through serializers for those two methods.

`Generate` preprocesses, then forwards the prompt to one model service through
`vlm.client.ModelClient` (which sends already-sent items as hashes and resends on
MISSING_FEATURES), with the client's deadline. The gateway issue replaces the single upstream
with replica routing.
"""

from __future__ import annotations

import uuid

import grpc

from preprocessor_svc.metrics import PreprocessorMetrics
from preprocessor_svc.pool import PooledResult, Preprocessor
from vlm import convert
from vlm.client import ModelClient
from vlm.errors import FailedPrecondition, Unavailable
from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb
from vlm.server import request_id_var

SERVICE_NAME = pre_pb.DESCRIPTOR.services_by_name["PreprocessorService"].full_name


class PreprocessorServicer:
    def __init__(
        self,
        metrics: PreprocessorMetrics,
        model_client: ModelClient | None = None,
        preprocessor: Preprocessor | None = None,
    ) -> None:
        self._metrics = metrics
        self._model = model_client
        self._ready = preprocessor

    def attach(self, preprocessor: Preprocessor) -> None:
        """Start serving requests with a warmed-up preprocessor."""
        self._ready = preprocessor

    @property
    def _pre(self) -> Preprocessor:
        if self._ready is None:
            raise Unavailable("the preprocessor is warming up")
        return self._ready

    async def _preprocess(self, request: pre_pb.PreprocessRequest) -> PooledResult:
        prompt_input = convert.prompt_input_from_pb(request.prompt, request.media)
        kwargs = convert.processor_kwargs_from_pb(request.processor_options)
        result = await self._pre.preprocess_detailed(prompt_input, kwargs)
        self._metrics.record(result)
        return result

    async def Preprocess(self, request, context) -> bytes:
        request_id_var.set(request.request_id or "-")
        result = await self._preprocess(request)
        return convert.preprocess_response_bytes(
            result.prompt, omit_fields_for=frozenset(request.omit_features_for_hashes)
        )

    async def Generate(self, request, context):
        request_id = request.input.request_id or uuid.uuid4().hex
        request_id_var.set(request_id)
        if self._model is None:
            raise FailedPrecondition("this preprocessor has no model service configured (--model-target)")
        result = await self._preprocess(request.input)
        async for raw in self._model.generate_raw(
            result.prompt, request.sampling, request_id=request_id, timeout=context.time_remaining()
        ):
            yield raw

    async def GetModelInfo(self, request, context):
        return pre_pb.GetModelInfoResponse(info=convert.model_info_to_pb(self._pre.model_info()))


def add_to_server(servicer: PreprocessorServicer, server: grpc.aio.Server) -> None:
    """Register like the generated `add_PreprocessorServiceServicer_to_server`, except that
    `Preprocess` and `Generate` return serialized messages (no response serializer)."""
    handlers = {
        "Preprocess": grpc.unary_unary_rpc_method_handler(
            servicer.Preprocess, request_deserializer=pre_pb.PreprocessRequest.FromString
        ),
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=pre_pb.GenerateRequest.FromString
        ),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo,
            request_deserializer=pre_pb.GetModelInfoRequest.FromString,
            response_serializer=pre_pb.GetModelInfoResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
