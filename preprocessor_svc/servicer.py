"""PreprocessorService servicer: convert the request, call the domain, convert back.

`Generate` preprocesses, then forwards the prompt to one model service through
`vlm.client.ModelClient` (which sends already-sent items as hashes and resends on
MISSING_FEATURES). The gateway issue replaces the single upstream with replica routing.
"""

from __future__ import annotations

import uuid

from vlm import convert
from vlm.client import ModelClient
from vlm.errors import FailedPrecondition
from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb
from vlm.preprocessor.v1 import preprocessor_pb2_grpc
from vlm.server import request_id_var


class PreprocessorServicer(preprocessor_pb2_grpc.PreprocessorServiceServicer):
    def __init__(self, preprocessor, model_client: ModelClient | None = None) -> None:
        self._pre = preprocessor
        self._model = model_client

    async def _preprocess(self, request: pre_pb.PreprocessRequest):
        prompt_input = convert.prompt_input_from_pb(request.prompt, request.media)
        kwargs = convert.processor_kwargs_from_pb(request.processor_options)
        return await self._pre.preprocess(prompt_input, kwargs)

    async def Preprocess(self, request, context):
        request_id_var.set(request.request_id or "-")
        prompt = await self._preprocess(request)
        return pre_pb.PreprocessResponse(
            prompt=convert.prompt_to_pb(prompt, omit_fields_for=request.omit_features_for_hashes)
        )

    async def Generate(self, request, context):
        request_id = request.input.request_id or uuid.uuid4().hex
        request_id_var.set(request_id)
        if self._model is None:
            raise FailedPrecondition("this preprocessor has no model service configured (--model-target)")
        prompt = await self._preprocess(request.input)
        sampling = convert.sampling_from_pb(request.sampling)
        async for chunk in self._model.generate(prompt, sampling, request_id=request_id):
            yield pre_pb.GenerateResponse(chunk=convert.chunk_to_pb(chunk))

    async def GetModelInfo(self, request, context):
        return pre_pb.GetModelInfoResponse(info=convert.model_info_to_pb(self._pre.model_info()))
