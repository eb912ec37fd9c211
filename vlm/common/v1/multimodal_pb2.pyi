from google.protobuf import struct_pb2 as _struct_pb2
from vlm.common.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Modality(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODALITY_UNSPECIFIED: _ClassVar[Modality]
    MODALITY_IMAGE: _ClassVar[Modality]
    MODALITY_VIDEO: _ClassVar[Modality]
    MODALITY_AUDIO: _ClassVar[Modality]

class FieldLayout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FIELD_LAYOUT_UNSPECIFIED: _ClassVar[FieldLayout]
    FIELD_LAYOUT_BATCHED: _ClassVar[FieldLayout]
    FIELD_LAYOUT_FLAT: _ClassVar[FieldLayout]
    FIELD_LAYOUT_SHARED: _ClassVar[FieldLayout]
MODALITY_UNSPECIFIED: Modality
MODALITY_IMAGE: Modality
MODALITY_VIDEO: Modality
MODALITY_AUDIO: Modality
FIELD_LAYOUT_UNSPECIFIED: FieldLayout
FIELD_LAYOUT_BATCHED: FieldLayout
FIELD_LAYOUT_FLAT: FieldLayout
FIELD_LAYOUT_SHARED: FieldLayout

class Media(_message.Message):
    __slots__ = ("modality", "data", "mime_type")
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    modality: Modality
    data: bytes
    mime_type: str
    def __init__(self, modality: _Optional[_Union[Modality, str]] = ..., data: _Optional[bytes] = ..., mime_type: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "media")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    MEDIA_FIELD_NUMBER: _ClassVar[int]
    text: str
    media: Media
    def __init__(self, text: _Optional[str] = ..., media: _Optional[_Union[Media, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: _containers.RepeatedCompositeFieldContainer[ContentPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages", "add_generation_prompt")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    add_generation_prompt: bool
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., add_generation_prompt: _Optional[bool] = ...) -> None: ...

class PromptInput(_message.Message):
    __slots__ = ("text", "token_ids", "messages")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    messages: ChatMessages
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ...) -> None: ...

class ItemField(_message.Message):
    __slots__ = ("tensor", "layout", "flat_dim", "keep_on_cpu")
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    FLAT_DIM_FIELD_NUMBER: _ClassVar[int]
    KEEP_ON_CPU_FIELD_NUMBER: _ClassVar[int]
    tensor: _tensor_pb2.Tensor
    layout: FieldLayout
    flat_dim: int
    keep_on_cpu: bool
    def __init__(self, tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., layout: _Optional[_Union[FieldLayout, str]] = ..., flat_dim: _Optional[int] = ..., keep_on_cpu: _Optional[bool] = ...) -> None: ...

class PlaceholderRange(_message.Message):
    __slots__ = ("offset", "length", "is_embed")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    IS_EMBED_FIELD_NUMBER: _ClassVar[int]
    offset: int
    length: int
    is_embed: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, offset: _Optional[int] = ..., length: _Optional[int] = ..., is_embed: _Optional[_Iterable[bool]] = ...) -> None: ...

class MultiModalItem(_message.Message):
    __slots__ = ("modality", "hash", "placeholder", "fields")
    class FieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ItemField
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ItemField, _Mapping]] = ...) -> None: ...
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    PLACEHOLDER_FIELD_NUMBER: _ClassVar[int]
    FIELDS_FIELD_NUMBER: _ClassVar[int]
    modality: Modality
    hash: str
    placeholder: PlaceholderRange
    fields: _containers.MessageMap[str, ItemField]
    def __init__(self, modality: _Optional[_Union[Modality, str]] = ..., hash: _Optional[str] = ..., placeholder: _Optional[_Union[PlaceholderRange, _Mapping]] = ..., fields: _Optional[_Mapping[str, ItemField]] = ...) -> None: ...

class ModelFingerprint(_message.Message):
    __slots__ = ("model_id", "model_impl", "config_hash", "feature_dtype")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_IMPL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_HASH_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_impl: str
    config_hash: str
    feature_dtype: str
    def __init__(self, model_id: _Optional[str] = ..., model_impl: _Optional[str] = ..., config_hash: _Optional[str] = ..., feature_dtype: _Optional[str] = ...) -> None: ...

class PreprocessedPrompt(_message.Message):
    __slots__ = ("fingerprint", "token_ids", "items", "prompt_text")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    fingerprint: ModelFingerprint
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    items: _containers.RepeatedCompositeFieldContainer[MultiModalItem]
    prompt_text: str
    def __init__(self, fingerprint: _Optional[_Union[ModelFingerprint, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., items: _Optional[_Iterable[_Union[MultiModalItem, _Mapping]]] = ..., prompt_text: _Optional[str] = ...) -> None: ...

class ProcessorOptions(_message.Message):
    __slots__ = ("kwargs",)
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    kwargs: _struct_pb2.Struct
    def __init__(self, kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
