"""PreprocessorService servicer: convert the request, call the domain, convert back.

`Generate` preprocesses, then forwards the prompt to one model service through
`vlm.client.ModelClient` (which sends already-sent items as hashes and resends on
MISSING_FEATURES). The gateway issue replaces the single upstream with replica routing.
"""

from __future__ import annotations

import uuid

from preprocessor_svc.metrics import PreprocessorMetrics
from preprocessor_svc.pool import Preprocessor
from vlm import convert
from vlm.client import ModelClient
from vlm.errors import FailedPrecondition, Unavailable
from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb
from vlm.preprocessor.v1 import preprocessor_pb2_grpc
from vlm.server import request_id_var
from vlm.types import Prompt


class PreprocessorServicer(preprocessor_pb2_grpc.PreprocessorServiceServicer):
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

    async def _preprocess(self, request: pre_pb.PreprocessRequest) -> Prompt:
        prompt_input = convert.prompt_input_from_pb(request.prompt, request.media)
        kwargs = convert.processor_kwargs_from_pb(request.processor_options)
        result = await self._pre.preprocess_detailed(prompt_input, kwargs)
        self._metrics.record(result.metrics)
        return result.prompt

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
