"""The one place where protobuf messages become domain types (`vlm.types`) and back.

Decoders validate structure (enums set, oneofs present, tensors well-formed) and raise
`InvalidArgument` naming the offending field as a dotted path into the request. Semantic checks
(placeholders vs. tokens, limits, fingerprints) belong to each service's domain code.

A preprocessed prompt has one serialisation, its wire form: `encode_prompt` turns a `Prompt`
into an `EncodedPrompt` (the `PreprocessedPrompt` bytes, kept per item so that any item can be
sent hash-only without re-encoding), in the preprocessor's worker process. From there on the
prompt stays bytes: `preprocess_response_bytes` and `model_generate_request_bytes` frame it
into the outgoing messages by concatenation (protobuf's wire format allows a message's fields,
and a repeated field's elements, to be written one after another), so the event loop converts
no tensor and parses nothing it forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any

from google.protobuf import descriptor_pool, json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from vlm import codec, types
from vlm.common.v1 import generation_pb2 as gen_pb
from vlm.common.v1 import multimodal_pb2 as mm_pb
from vlm.errors import InvalidArgument
from vlm.model.v1 import model_pb2
from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb

# ---------------------------------------------------------------------------------- enums

_MODALITY_TO_PB = {
    types.Modality.IMAGE: mm_pb.MODALITY_IMAGE,
    types.Modality.VIDEO: mm_pb.MODALITY_VIDEO,
    types.Modality.AUDIO: mm_pb.MODALITY_AUDIO,
}
_MODALITY_FROM_PB = {v: k for k, v in _MODALITY_TO_PB.items()}

_LAYOUT_TO_PB = {
    types.FieldLayout.BATCHED: mm_pb.FIELD_LAYOUT_BATCHED,
    types.FieldLayout.FLAT: mm_pb.FIELD_LAYOUT_FLAT,
    types.FieldLayout.SHARED: mm_pb.FIELD_LAYOUT_SHARED,
}
_LAYOUT_FROM_PB = {v: k for k, v in _LAYOUT_TO_PB.items()}

_FINISH_TO_PB = {
    None: gen_pb.FINISH_REASON_UNSPECIFIED,
    types.FinishReason.STOP: gen_pb.FINISH_REASON_STOP,
    types.FinishReason.LENGTH: gen_pb.FINISH_REASON_LENGTH,
    types.FinishReason.ABORT: gen_pb.FINISH_REASON_ABORT,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


def modality_to_pb(m: types.Modality) -> int:
    return _MODALITY_TO_PB[m]


def modality_from_pb(value: int, *, field: str) -> types.Modality:
    try:
        return _MODALITY_FROM_PB[value]
    except KeyError:
        raise InvalidArgument(f"modality must be IMAGE, VIDEO or AUDIO (got {value})", field=field)


# ---------------------------------------------------------------------------------- request bytes
#
# Bytes that protobuf cannot parse as the method's request (corrupt wire format, a string field
# that is not UTF-8) fail in grpc's deserializer, before any handler runs: grpc answers UNKNOWN
# ("Unexpected DecodeError") and names nothing. `request_deserializer` wraps a deserializer so
# that such bytes become an `InvalidArgument` *value* naming the field at fault, for the handler
# (the error-mapping interceptor) to raise where errors become statuses.


def wire_fault(
    descriptor: Descriptor, data: bytes | memoryview, *, field: str = ""
) -> tuple[str, str] | None:
    """The first place where `data` is not a valid serialization of `descriptor`: (dotted field
    path, reason), e.g. ("prompt.items[0].hash", "not valid UTF-8"); None if none is found. A
    walk of the wire format against the descriptor (repeated messages are indexed, map entries
    named by their key): protobuf's own parser says only that the bytes are corrupt."""
    try:
        _walk(descriptor, memoryview(data), 0, len(data), field)
    except _Fault as f:
        return f.path, f.reason
    return None


def undecodable_request(
    descriptor: Descriptor, data: bytes | memoryview, error: Exception
) -> InvalidArgument:
    """The `InvalidArgument` for request bytes that protobuf rejected with `error`."""
    fault = wire_fault(descriptor, data)
    name = descriptor.full_name
    if fault is None:
        return InvalidArgument(f"the request is not a valid {name} message: {error}")
    path, reason = fault
    return InvalidArgument(f"the request is not a valid {name} message: {reason}", field=path or None)


def request_deserializer(
    deserializer: Callable[[bytes], Any] | None, method: str
) -> Callable[[bytes], Any] | None:
    """`deserializer` (for the gRPC method path "/pkg.Service/Method"), except that bytes it
    cannot parse return an `InvalidArgument` (see `undecodable_request`) instead of raising."""
    descriptor = _request_type(method)
    if deserializer is None or descriptor is None:
        return deserializer

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as e:
            return undecodable_request(descriptor, data, e)

    return parse


@cache
def _request_type(method: str) -> Descriptor | None:
    """The request message type of gRPC method "/pkg.Service/Method" (None if unknown)."""
    service, _, name = method.lstrip("/").rpartition("/")
    try:
        return descriptor_pool.Default().FindMethodByName(f"{service}.{name}").input_type
    except (KeyError, ValueError):
        return None


class _Fault(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path, self.reason = path, reason


_VARINT_TYPES = frozenset({
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_BOOL, FieldDescriptor.TYPE_ENUM,
})
_FIXED_SIZE = {
    FieldDescriptor.TYPE_FIXED32: 4, FieldDescriptor.TYPE_SFIXED32: 4, FieldDescriptor.TYPE_FLOAT: 4,
    FieldDescriptor.TYPE_FIXED64: 8, FieldDescriptor.TYPE_SFIXED64: 8, FieldDescriptor.TYPE_DOUBLE: 8,
}


def _varint(buf: memoryview, pos: int, end: int, path: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise _Fault(path, "truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise _Fault(path, "varint longer than 10 bytes")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


#: protobuf's own nesting limit.
_MAX_DEPTH = 100


def _walk(desc: Descriptor, buf: memoryview, pos: int, end: int, path: str, depth: int = 0) -> None:
    if depth > _MAX_DEPTH:
        # The path down there is thousands of characters: name where the nesting starts.
        head = ".".join(path.split(".")[:4])
        raise _Fault(head, f"messages nested over {_MAX_DEPTH} deep")
    seen: dict[int, int] = {}
    is_entry = desc.GetOptions().map_entry
    while pos < end:
        tag, pos = _varint(buf, pos, end, path)
        number, wire = tag >> 3, tag & 7
        f = desc.fields_by_number.get(number)
        # Inside a map entry the key and value stand for the entry itself (`fields.NAME`).
        here = path if is_entry else _join(path, f.name if f else f"<field {number}>")
        if number == 0:
            raise _Fault(path, "field number 0")
        if wire == 0:
            _, pos = _varint(buf, pos, end, here)
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Fault(here, "truncated fixed-size value")
        elif wire == 2:
            n, pos = _varint(buf, pos, end, here)
            if pos + n > end:
                raise _Fault(here, f"length {n} runs past the end of the enclosing message")
            if f is not None:
                _check_value(f, buf, pos, pos + n, here, seen, depth)
            pos += n
        else:
            raise _Fault(here, f"unsupported wire type {wire}")


def _check_value(
    f: FieldDescriptor, buf: memoryview, start: int, end: int, here: str, seen: dict[int, int], depth: int
) -> None:
    """One length-delimited value of known field `f`."""
    if f.type == FieldDescriptor.TYPE_STRING:
        try:
            bytes(buf[start:end]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Fault(here, f"not valid UTF-8 (byte {e.start})") from None
    elif f.type == FieldDescriptor.TYPE_MESSAGE:
        sub = f.message_type
        if sub.GetOptions().map_entry:
            key = _entry_key(sub, buf, start, end)
            here = f"{here}.{key}" if key is not None else here
        elif f.is_repeated:
            k = seen.get(f.number, 0)
            seen[f.number] = k + 1
            here = f"{here}[{k}]"
        _walk(sub, buf, start, end, here, depth + 1)
    elif f.is_repeated and f.type in _VARINT_TYPES:
        pos = start
        while pos < end:  # packed
            _, pos = _varint(buf, pos, end, here)
    elif f.is_repeated and f.type in _FIXED_SIZE:
        if (end - start) % _FIXED_SIZE[f.type]:
            raise _Fault(here, "packed fixed-size values of a partial length")


def _entry_key(entry: Descriptor, buf: memoryview, pos: int, end: int) -> str | None:
    """A map entry's string key (the last one, as protobuf keeps), if readable."""
    key = None
    try:
        while pos < end:
            tag, pos = _varint(buf, pos, end, "")
            wire = tag & 7
            if wire == 0:
                _, pos = _varint(buf, pos, end, "")
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            elif wire == 2:
                n, pos = _varint(buf, pos, end, "")
                if tag >> 3 == 1:
                    key = bytes(buf[pos : pos + n]).decode("utf-8")
                pos += n
            else:
                return key
    except (_Fault, UnicodeDecodeError):
        return key
    return key if key and entry.fields_by_number[1].type == FieldDescriptor.TYPE_STRING else None


# ---------------------------------------------------------------------------------- inputs


def media_from_pb(msg: mm_pb.Media, *, field: str) -> types.Media:
    return types.Media(
        modality=modality_from_pb(msg.modality, field=f"{field}.modality"),
        data=msg.data,
        mime_type=msg.mime_type,
    )


def media_to_pb(media: types.Media) -> mm_pb.Media:
    return mm_pb.Media(
        modality=modality_to_pb(media.modality), data=media.data, mime_type=media.mime_type
    )


def prompt_input_from_pb(
    msg: mm_pb.PromptInput, media: Sequence[mm_pb.Media], *, field: str = "prompt"
) -> types.PromptInput:
    """A request's prompt oneof plus its side-band media list → PromptInput."""
    kind = msg.WhichOneof("prompt")
    side_media = tuple(media_from_pb(m, field=f"media[{i}]") for i, m in enumerate(media))
    if kind == "text":
        return types.PromptInput(text=msg.text, media=side_media)
    if kind == "token_ids":
        if not msg.token_ids.ids:
            raise InvalidArgument("token_ids must not be empty", field=f"{field}.token_ids.ids")
        return types.PromptInput(token_ids=tuple(msg.token_ids.ids), media=side_media)
    if kind == "messages":
        if side_media:
            raise InvalidArgument(
                "chat prompts carry media inline as content parts; the media list must be empty",
                field="media",
            )
        chat = msg.messages
        if not chat.messages:
            raise InvalidArgument("no messages", field=f"{field}.messages.messages")
        messages = []
        for i, m in enumerate(chat.messages):
            mfield = f"{field}.messages.messages[{i}]"
            if not m.role:
                raise InvalidArgument("role must be set", field=f"{mfield}.role")
            parts = []
            for j, p in enumerate(m.content):
                pfield = f"{mfield}.content[{j}]"
                which = p.WhichOneof("part")
                if which == "text":
                    parts.append(types.ChatPart(text=p.text))
                elif which == "media":
                    parts.append(types.ChatPart(media=media_from_pb(p.media, field=f"{pfield}.media")))
                else:
                    raise InvalidArgument("content part has neither text nor media", field=pfield)
            messages.append(types.ChatMessage(role=m.role, content=tuple(parts)))
        add_gen = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        return types.PromptInput(messages=tuple(messages), add_generation_prompt=add_gen)
    raise InvalidArgument("one of text, token_ids or messages must be set", field=field)


def prompt_input_to_pb(p: types.PromptInput) -> tuple[mm_pb.PromptInput, list[mm_pb.Media]]:
    media = [media_to_pb(m) for m in p.media]
    if p.text is not None:
        return mm_pb.PromptInput(text=p.text), media
    if p.token_ids is not None:
        return mm_pb.PromptInput(token_ids=mm_pb.TokenIds(ids=list(p.token_ids))), media
    assert p.messages is not None
    msgs = [
        mm_pb.ChatMessage(
            role=m.role,
            content=[
                mm_pb.ContentPart(text=c.text)
                if c.media is None
                else mm_pb.ContentPart(media=media_to_pb(c.media))
                for c in m.content
            ],
        )
        for m in p.messages
    ]
    chat = mm_pb.ChatMessages(messages=msgs, add_generation_prompt=p.add_generation_prompt)
    return mm_pb.PromptInput(messages=chat), []


def processor_kwargs_from_pb(msg: mm_pb.ProcessorOptions) -> dict[str, Any]:
    """Struct → plain dict; JSON numbers that are integral become ints (Struct has only doubles)."""

    def norm(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer():
            return int(v)
        if isinstance(v, list):
            return [norm(x) for x in v]
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        return v

    return {k: norm(v) for k, v in json_format.MessageToDict(msg.kwargs).items()}


def processor_kwargs_to_pb(kwargs: dict[str, Any] | None) -> mm_pb.ProcessorOptions:
    opts = mm_pb.ProcessorOptions()
    if kwargs:
        opts.kwargs.update(kwargs)
    return opts


# ---------------------------------------------------------------------------------- prompts


def fingerprint_to_pb(f: types.Fingerprint) -> mm_pb.ModelFingerprint:
    return mm_pb.ModelFingerprint(
        model_id=f.model_id,
        model_impl=f.model_impl,
        config_hash=f.config_hash,
        feature_dtype=f.feature_dtype,
    )


def fingerprint_from_pb(msg: mm_pb.ModelFingerprint) -> types.Fingerprint:
    return types.Fingerprint(msg.model_id, msg.model_impl, msg.config_hash, msg.feature_dtype)


def item_from_pb(
    msg: mm_pb.MultiModalItem, *, field: str, limits: codec.TensorLimits = codec.DEFAULT_LIMITS
) -> types.Item:
    modality = modality_from_pb(msg.modality, field=f"{field}.modality")
    if not msg.hash:
        raise InvalidArgument("hash must be set", field=f"{field}.hash")
    ph = msg.placeholder
    placeholder = types.Placeholder(
        offset=ph.offset, length=ph.length, is_embed=tuple(ph.is_embed) if ph.is_embed else None
    )
    fields: dict[str, types.ItemField] | None = None
    if msg.fields:
        fields = {}
        for name in sorted(msg.fields):
            f = msg.fields[name]
            ffield = f"{field}.fields.{name}"
            layout = _LAYOUT_FROM_PB.get(f.layout)
            if layout is None:
                raise InvalidArgument(
                    "layout must be BATCHED, FLAT or SHARED", field=f"{ffield}.layout"
                )
            data = codec.decode(f.tensor, field=f"{ffield}.tensor", limits=limits)
            if layout is types.FieldLayout.FLAT and not -data.dim() <= f.flat_dim < max(data.dim(), 1):
                raise InvalidArgument(
                    f"flat_dim {f.flat_dim} out of range for a rank-{data.dim()} tensor",
                    field=f"{ffield}.flat_dim",
                )
            fields[name] = types.ItemField(
                data=data, layout=layout, flat_dim=f.flat_dim, keep_on_cpu=f.keep_on_cpu
            )
    return types.Item(modality=modality, hash=msg.hash, placeholder=placeholder, fields=fields)


def prompt_from_pb(
    msg: mm_pb.PreprocessedPrompt,
    *,
    field: str = "prompt",
    limits: codec.TensorLimits = codec.DEFAULT_LIMITS,
) -> types.Prompt:
    return types.Prompt(
        fingerprint=fingerprint_from_pb(msg.fingerprint),
        token_ids=tuple(msg.token_ids),
        items=tuple(
            item_from_pb(it, field=f"{field}.items[{i}]", limits=limits)
            for i, it in enumerate(msg.items)
        ),
        prompt_text=msg.prompt_text if msg.HasField("prompt_text") else None,
    )


# ---------------------------------------------------------------------------------- wire form


Pieces = codec.Pieces


def _item_wire(item: types.Item) -> Pieces:
    """A `MultiModalItem`, serialized by hand around the tensors so that their bytes are copied
    once (fields in name order; `tests/unit/test_convert.py` checks it parses as the message)."""
    ph = item.placeholder
    head = mm_pb.MultiModalItem(
        modality=modality_to_pb(item.modality),
        hash=item.hash,
        placeholder=mm_pb.PlaceholderRange(
            offset=ph.offset, length=ph.length, is_embed=list(ph.is_embed or ())
        ),
    ).SerializeToString()
    pieces: Pieces = [head]
    for name in sorted(item.fields or {}):
        f = item.fields[name]  # type: ignore[index]
        value = codec.length_delimited(_ITEMFIELD_TENSOR, codec.encode_wire(f.data))
        value.append(
            mm_pb.ItemField(
                layout=_LAYOUT_TO_PB[f.layout], flat_dim=f.flat_dim, keep_on_cpu=f.keep_on_cpu
            ).SerializeToString()
        )
        key = mm_pb.MultiModalItem.FieldsEntry(key=name).SerializeToString()
        pieces += codec.length_delimited(_ITEM_FIELDS, [key, *codec.length_delimited(_ENTRY_VALUE, value)])
    return pieces


_ITEM_FIELDS = mm_pb.MultiModalItem.DESCRIPTOR.fields_by_name["fields"].number
_ENTRY_VALUE = mm_pb.MultiModalItem.FieldsEntry.DESCRIPTOR.fields_by_name["value"].number
_ITEMFIELD_TENSOR = mm_pb.ItemField.DESCRIPTOR.fields_by_name["tensor"].number
_ITEMS = mm_pb.PreprocessedPrompt.DESCRIPTOR.fields_by_name["items"].number
_RESPONSE_PROMPT = pre_pb.PreprocessResponse.DESCRIPTOR.fields_by_name["prompt"].number
_REQUEST_PROMPT = model_pb2.GenerateRequest.DESCRIPTOR.fields_by_name["prompt"].number


@dataclass(frozen=True)
class EncodedItem:
    hash: str
    #: This item as a `MultiModalItem` field of `PreprocessedPrompt`: with its features, and
    #: hash-only (no fields).
    full: bytes
    bare: bytes


@dataclass(frozen=True)
class EncodedPrompt:
    """A `PreprocessedPrompt` in wire form: everything but the items, then each item."""

    head: bytes
    items: tuple[EncodedItem, ...]

    @property
    def hashes(self) -> tuple[str, ...]:
        return tuple(it.hash for it in self.items)

    def pieces(self, omit_fields_for: Collection[str] = ()) -> Pieces:
        """The serialized `PreprocessedPrompt` in pieces; items whose hash is in
        `omit_fields_for` go hash-only."""
        return [self.head, *(it.bare if it.hash in omit_fields_for else it.full for it in self.items)]

    def to_bytes(self, omit_fields_for: Collection[str] = ()) -> bytes:
        return b"".join(self.pieces(omit_fields_for))

    @cached_property
    def decoded(self) -> types.Prompt:
        """The domain prompt (tensors are read-only views over this object's bytes)."""
        return prompt_from_pb(mm_pb.PreprocessedPrompt.FromString(self.to_bytes()))


def encode_prompt(p: types.Prompt) -> EncodedPrompt:
    head = mm_pb.PreprocessedPrompt(
        fingerprint=fingerprint_to_pb(p.fingerprint), token_ids=list(p.token_ids)
    )
    if p.prompt_text is not None:
        head.prompt_text = p.prompt_text
    items = tuple(
        EncodedItem(
            hash=it.hash,
            full=b"".join(codec.length_delimited(_ITEMS, _item_wire(it))),
            bare=b"".join(codec.length_delimited(_ITEMS, _item_wire(it.without_fields()))),
        )
        for it in p.items
    )
    return EncodedPrompt(head.SerializeToString(), items)


def preprocess_response_bytes(
    p: EncodedPrompt, *, omit_fields_for: Collection[str] = ()
) -> bytes:
    """A serialized `vlm.preprocessor.v1.PreprocessResponse` holding `p`."""
    return b"".join(codec.length_delimited(_RESPONSE_PROMPT, p.pieces(omit_fields_for)))


def model_generate_request_bytes(
    request_id: str,
    p: EncodedPrompt,
    sampling: gen_pb.SamplingParams,
    *,
    omit_fields_for: Collection[str] = (),
) -> bytes:
    """A serialized `vlm.model.v1.GenerateRequest`."""
    rest = model_pb2.GenerateRequest(request_id=request_id, sampling=sampling).SerializeToString()
    return b"".join([rest, *codec.length_delimited(_REQUEST_PROMPT, p.pieces(omit_fields_for))])


# ---------------------------------------------------------------------------------- sampling

_OPTIONAL_SAMPLING = types.OPTIONAL_SAMPLING_FIELDS


def sampling_from_pb(msg: gen_pb.SamplingParams) -> types.Sampling:
    kwargs: dict[str, Any] = {
        name: getattr(msg, name) for name in _OPTIONAL_SAMPLING if msg.HasField(name)
    }
    return types.Sampling(
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        **kwargs,
    )


def sampling_to_pb(s: types.Sampling) -> gen_pb.SamplingParams:
    """Raises InvalidArgument naming `sampling.<name>` for a value the wire type cannot hold
    (a negative count in a uint32 field, an integer over 64 bits): such a value can only come
    from a request that did not go through protobuf (the HTTP front door, the client library)."""
    out = gen_pb.SamplingParams(ignore_eos=s.ignore_eos)
    for name, values in (("stop", s.stop), ("stop_token_ids", s.stop_token_ids)):
        try:
            getattr(out, name).extend(values)
        except (ValueError, TypeError) as e:
            raise _unsendable(name, e) from None
    for name in _OPTIONAL_SAMPLING:
        value = getattr(s, name)
        if value is not None:
            try:
                setattr(out, name, value)
            except (ValueError, TypeError) as e:
                raise _unsendable(name, e) from None
    return out


_WIRE_TYPE_NAMES = {
    FieldDescriptor.TYPE_UINT32: "an integer in [0, 2^32)",
    FieldDescriptor.TYPE_INT32: "a 32-bit integer",
    FieldDescriptor.TYPE_INT64: "a 64-bit integer",
    FieldDescriptor.TYPE_FLOAT: "a number",
    FieldDescriptor.TYPE_STRING: "a string",
}


def _unsendable(name: str, e: Exception) -> InvalidArgument:
    kind = _WIRE_TYPE_NAMES.get(gen_pb.SamplingParams.DESCRIPTOR.fields_by_name[name].type, "")
    what = f"{name} must be {kind}" if kind else f"{name} is out of range"
    return InvalidArgument(f"{what} ({e})", field=f"sampling.{name}")


# ---------------------------------------------------------------------------------- outputs


def _logprob_to_pb(lp: types.TokenLogprob) -> gen_pb.TokenLogprob:
    return gen_pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, rank=lp.rank)


def _logprob_from_pb(msg: gen_pb.TokenLogprob) -> types.TokenLogprob:
    return types.TokenLogprob(msg.token_id, msg.logprob, msg.rank)


def chunk_to_pb(c: types.Chunk) -> gen_pb.GenerationChunk:
    out = gen_pb.GenerationChunk(
        request_id=c.request_id,
        token_ids=list(c.token_ids),
        text=c.text,
        logprobs=[
            gen_pb.PositionLogprobs(
                sampled=_logprob_to_pb(p.sampled), top=[_logprob_to_pb(t) for t in p.top]
            )
            for p in c.logprobs
        ],
        finish_reason=_FINISH_TO_PB[c.finish_reason],
    )
    if isinstance(c.stop_reason, str):
        out.stop_string = c.stop_reason
    elif isinstance(c.stop_reason, int):
        out.stop_token_id = c.stop_reason
    if c.usage is not None:
        out.usage.CopyFrom(
            gen_pb.Usage(
                prompt_tokens=c.usage.prompt_tokens,
                completion_tokens=c.usage.completion_tokens,
                cached_tokens=c.usage.cached_tokens,
            )
        )
    return out


def chunk_from_pb(msg: gen_pb.GenerationChunk) -> types.Chunk:
    which = msg.WhichOneof("stop_reason")
    return types.Chunk(
        request_id=msg.request_id,
        token_ids=tuple(msg.token_ids),
        text=msg.text,
        logprobs=tuple(
            types.PositionLogprobs(
                _logprob_from_pb(p.sampled), tuple(_logprob_from_pb(t) for t in p.top)
            )
            for p in msg.logprobs
        ),
        finish_reason=_FINISH_FROM_PB[msg.finish_reason],
        stop_reason=getattr(msg, which) if which else None,
        usage=types.Usage(
            msg.usage.prompt_tokens, msg.usage.completion_tokens, msg.usage.cached_tokens
        )
        if msg.HasField("usage")
        else None,
    )


def model_info_to_pb(info: types.ModelInfo) -> gen_pb.ModelInfo:
    return gen_pb.ModelInfo(
        model_id=info.model_id,
        fingerprint=fingerprint_to_pb(info.fingerprint),
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        eos_token_ids=list(info.eos_token_ids),
        modalities=[
            gen_pb.ModalityInfo(
                modality=modality_to_pb(m.modality),
                placeholder_token_ids=list(m.placeholder_token_ids),
                placeholder_text=m.placeholder_text,
                max_items_per_prompt=m.max_items_per_prompt,
            )
            for m in info.modalities
        ],
    )


def model_info_from_pb(msg: gen_pb.ModelInfo) -> types.ModelInfo:
    return types.ModelInfo(
        model_id=msg.model_id,
        fingerprint=fingerprint_from_pb(msg.fingerprint),
        max_model_len=msg.max_model_len,
        vocab_size=msg.vocab_size,
        eos_token_ids=tuple(msg.eos_token_ids),
        modalities=tuple(
            types.ModalityInfo(
                modality=_MODALITY_FROM_PB[m.modality],
                placeholder_token_ids=tuple(m.placeholder_token_ids),
                placeholder_text=m.placeholder_text,
                max_items_per_prompt=m.max_items_per_prompt,
            )
            for m in msg.modalities
        ),
    )
