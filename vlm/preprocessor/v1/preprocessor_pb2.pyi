from vlm.common.v1 import generation_pb2 as _generation_pb2
from vlm.common.v1 import multimodal_pb2 as _multimodal_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PreprocessRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "media", "processor_options", "omit_features_for_hashes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    PROCESSOR_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    OMIT_FEATURES_FOR_HASHES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: _multimodal_pb2.PromptInput
    media: _containers.RepeatedCompositeFieldContainer[_multimodal_pb2.Media]
    processor_options: _multimodal_pb2.ProcessorOptions
    omit_features_for_hashes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[_Union[_multimodal_pb2.PromptInput, _Mapping]] = ..., media: _Optional[_Iterable[_Union[_multimodal_pb2.Media, _Mapping]]] = ..., processor_options: _Optional[_Union[_multimodal_pb2.ProcessorOptions, _Mapping]] = ..., omit_features_for_hashes: _Optional[_Iterable[str]] = ...) -> None: ...

class PreprocessResponse(_message.Message):
    __slots__ = ("prompt",)
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt: _multimodal_pb2.PreprocessedPrompt
    def __init__(self, prompt: _Optional[_Union[_multimodal_pb2.PreprocessedPrompt, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("input", "sampling")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    input: PreprocessRequest
    sampling: _generation_pb2.SamplingParams
    def __init__(self, input: _Optional[_Union[PreprocessRequest, _Mapping]] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("chunk",)
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: _generation_pb2.GenerationChunk
    def __init__(self, chunk: _Optional[_Union[_generation_pb2.GenerationChunk, _Mapping]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: _generation_pb2.ModelInfo
    def __init__(self, info: _Optional[_Union[_generation_pb2.ModelInfo, _Mapping]] = ...) -> None: ...
