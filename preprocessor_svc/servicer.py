"""PreprocessorService servicer: convert the request, call the gateway, convert back.

`Preprocess` and `Generate` answer with bytes: the prompt is already in its wire form
(`convert.EncodedPrompt`, encoded by the worker process), and `Generate` relays the model
replica's `GenerateResponse` messages as they arrive, unparsed (the preprocessor's
`GenerateResponse` has the same layout; `tests/unit/test_convert.py` checks it). `add_to_server`
registers the service with pass-through serializers for those two methods. Routing, resend and
failover live in `preprocessor_svc.gateway`.
"""

from __future__ import annotations

import uuid

import grpc

from preprocessor_svc.gateway import Gateway
from vlm import convert
from vlm.errors import Unavailable
from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb
from vlm.server import request_id_var

SERVICE_NAME = pre_pb.DESCRIPTOR.services_by_name["PreprocessorService"].full_name


class PreprocessorServicer:
    def __init__(self, gateway: Gateway | None = None) -> None:
        self._ready = gateway

    def attach(self, gateway: Gateway) -> None:
        """Start serving requests with a warmed-up gateway."""
        self._ready = gateway

    @property
    def _gateway(self) -> Gateway:
        if self._ready is None:
            raise Unavailable("the preprocessor is warming up (or waiting for a model replica)")
        return self._ready

    async def Preprocess(self, request, context) -> bytes:
        request_id_var.set(request.request_id or "-")
        result = await self._gateway.preprocess(
            convert.prompt_input_from_pb(request.prompt, request.media),
            convert.processor_kwargs_from_pb(request.processor_options),
        )
        return convert.preprocess_response_bytes(
            result.prompt, omit_fields_for=frozenset(request.omit_features_for_hashes)
        )

    async def Generate(self, request, context):
        request_id = request.input.request_id or uuid.uuid4().hex
        request_id_var.set(request_id)
        async for raw in self._gateway.generate_raw(
            convert.prompt_input_from_pb(request.input.prompt, request.input.media),
            request.sampling,
            convert.processor_kwargs_from_pb(request.input.processor_options),
            request_id=request_id,
            timeout=context.time_remaining(),
        ):
            yield raw

    async def GetModelInfo(self, request, context):
        return pre_pb.GetModelInfoResponse(info=convert.model_info_to_pb(self._gateway.model_info()))


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
