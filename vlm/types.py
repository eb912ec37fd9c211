"""Domain types shared by both services: frozen dataclasses, free of protobuf and of vLLM.

Protobuf messages are converted to and from these in `vlm.convert` only; the services' domain
code (processing, validation, engine I/O) works on these types.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch


class Modality(str, enum.Enum):
    """Media kinds, valued as vLLM names them in `multi_modal_data` and `mm_placeholders`."""

    IMAGE = "image"
    VIDEO = "video"
    AUDIO = "audio"


class FieldLayout(str, enum.Enum):
    """How vLLM combines one field across the items of a batch (`BaseMultiModalField`)."""

    BATCHED = "batched"
    FLAT = "flat"
    SHARED = "shared"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass(frozen=True)
class Media:
    """One encoded media file as received (bytes, never a URL)."""

    modality: Modality
    data: bytes
    mime_type: str = ""


@dataclass(frozen=True)
class ChatPart:
    """One content part of a chat message: exactly one of `text` / `media`."""

    text: str | None = None
    media: Media | None = None


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: tuple[ChatPart, ...]


@dataclass(frozen=True)
class PromptInput:
    """A prompt in one of three forms: exactly one of text / token_ids / messages is set.

    For text and token IDs, `media` lists the items in prompt order per modality; chat messages
    carry theirs inline.
    """

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessage, ...] | None = None
    add_generation_prompt: bool = True
    media: tuple[Media, ...] = ()

    def all_media(self) -> tuple[Media, ...]:
        if self.messages is None:
            return self.media
        return tuple(p.media for m in self.messages for p in m.content if p.media is not None)


@dataclass(frozen=True)
class Placeholder:
    """Prompt positions [offset, offset + length) of one item.

    `is_embed[i]` tells whether position offset+i receives the item's embedding; None means all do.
    """

    offset: int
    length: int
    is_embed: tuple[bool, ...] | None = None

    @property
    def end(self) -> int:
        return self.offset + self.length

    def embed_count(self) -> int:
        return self.length if self.is_embed is None else sum(self.is_embed)


@dataclass(frozen=True)
class ItemField:
    """One feature tensor of one item and how vLLM batches it."""

    data: torch.Tensor
    layout: FieldLayout
    flat_dim: int = 0
    keep_on_cpu: bool = False

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass(frozen=True)
class Item:
    """One multimodal item: modality, content hash, where it sits, and (optionally) its features.

    `fields is None` means the item is sent as a hash only.
    """

    modality: Modality
    hash: str
    placeholder: Placeholder
    fields: Mapping[str, ItemField] | None = None

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in (self.fields or {}).values())

    def without_fields(self) -> Item:
        return Item(self.modality, self.hash, self.placeholder, None)


@dataclass(frozen=True)
class Fingerprint:
    """What a prompt was prepared for; the model service refuses any other."""

    model_id: str
    model_impl: str
    config_hash: str
    #: The dtype float features travel in ("bfloat16", "float32", ...): vLLM's model dtype.
    feature_dtype: str

    def same_model(self, other: Fingerprint) -> bool:
        # model_id is informational (a hub id on one side may be a local path on the other).
        return (
            self.model_impl == other.model_impl
            and self.config_hash == other.config_hash
            and self.feature_dtype == other.feature_dtype
        )

    def describe(self) -> str:
        return (
            f"{self.model_id!r} (impl {self.model_impl!r}, config {self.config_hash[:12]}, "
            f"features {self.feature_dtype or '?'})"
        )


@dataclass(frozen=True)
class Prompt:
    """A preprocessed prompt: expanded token IDs and items in prompt order."""

    fingerprint: Fingerprint
    token_ids: tuple[int, ...]
    items: tuple[Item, ...] = ()
    prompt_text: str | None = None


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; None means vLLM's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None
    skip_special_tokens: bool | None = None


#: Sampling fields where None means "vLLM's default" (the rest always have a value).
OPTIONAL_SAMPLING_FIELDS: tuple[str, ...] = tuple(
    f.name for f in fields(Sampling) if f.default is None
)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    rank: int


@dataclass(frozen=True)
class PositionLogprobs:
    sampled: TokenLogprob
    top: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of output. Only the final chunk has finish_reason and usage."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[PositionLogprobs, ...] = ()
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class ModalityInfo:
    modality: Modality
    placeholder_token_ids: tuple[int, ...]
    placeholder_text: str
    max_items_per_prompt: int


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    fingerprint: Fingerprint
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    modalities: tuple[ModalityInfo, ...] = ()


@dataclass(frozen=True)
class Load:
    running: int
    waiting: int
    kv_cache_usage: float
    feature_store_items: int = 0
    feature_store_bytes: int = 0

