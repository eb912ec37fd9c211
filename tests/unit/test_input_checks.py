"""Input checks behind the bad-input corpus (tests/e2e/test_bad_input_corpus.py), without servers:
request bytes protobuf rejects (`convert.wire_fault`, `convert.request_deserializer`), sampling
values the wire cannot hold (`convert.sampling_to_pb`), prompt text and chat roles
(`preprocessor_svc.processing`), the stop-string bound (`model_svc.validation`)."""

from __future__ import annotations

import pytest

from model_svc.validation import PromptValidator
from preprocessor_svc.processing import CHAT_ROLES, _check_text
from tests.unit.model.test_validation import SPEC
from vlm import convert, types
from vlm.common.v1 import generation_pb2 as gen_pb
from vlm.common.v1 import multimodal_pb2 as mm_pb
from vlm.errors import InvalidArgument
from vlm.model.v1 import model_pb2
from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb


def ld(number: int, payload: bytes) -> bytes:
    n, size = len(payload), bytearray()
    while n > 0x7F:
        size.append((n & 0x7F) | 0x80)
        n >>= 7
    size.append(n)
    return bytes([number << 3 | 2]) + bytes(size) + payload


def _model_request() -> bytes:
    item = mm_pb.MultiModalItem(modality=1, hash="H" * 8, fields={"pixel_values": mm_pb.ItemField(layout=1)})
    prompt = mm_pb.PreprocessedPrompt(token_ids=[1, 2, 3], items=[item, item])
    return model_pb2.GenerateRequest(request_id="r", prompt=prompt,
                                     sampling=gen_pb.SamplingParams(max_tokens=3)).SerializeToString()


def _corrupt_last(raw: bytes, marker: bytes) -> bytes:
    i = raw.rfind(marker)
    return raw[:i] + b"\xff" + raw[i + 1:]


@pytest.mark.parametrize("raw, descriptor, path, words", [
    (ld(2, ld(1, b"caf\xc3")), pre_pb.PreprocessRequest.DESCRIPTOR, "prompt.text", "UTF-8"),
    (ld(1, ld(2, ld(1, b"\xfe"))), pre_pb.GenerateRequest.DESCRIPTOR, "input.prompt.text", "UTF-8"),
    (ld(2, ld(3, ld(1, ld(1, b"user") + ld(2, ld(1, b"\xfe"))))), pre_pb.PreprocessRequest.DESCRIPTOR,
     "prompt.messages.messages[0].content[0].text", "UTF-8"),
    (_corrupt_last(_model_request(), b"H" * 8), model_pb2.GenerateRequest.DESCRIPTOR, "prompt.items[1].hash", "UTF-8"),
    (_corrupt_last(_model_request(), b"pixel_values"), model_pb2.GenerateRequest.DESCRIPTOR,
     "prompt.items[1].fields", "UTF-8"),
    (_model_request()[:-1], model_pb2.GenerateRequest.DESCRIPTOR, "sampling", "past the end"),
    (b"\xff\xff\xff", model_pb2.GenerateRequest.DESCRIPTOR, "", "truncated varint"),
    (ld(2, b"\x0b"), model_pb2.GenerateRequest.DESCRIPTOR, "prompt.fingerprint", "wire type"),
], ids=["text", "generate_text", "chat_text", "item_hash", "map_key", "truncated", "garbage", "group"])
def test_wire_fault_names_the_field(raw, descriptor, path, words) -> None:
    with pytest.raises(Exception):  # protobuf's own parser refuses it, naming nothing
        descriptor._concrete_class.FromString(raw)
    where, why = convert.wire_fault(descriptor, raw)
    assert where == path and words in why


def test_wire_fault_deep_nesting_names_where_it_starts() -> None:
    value = b""
    for _ in range(300):  # Value.list_value → ListValue.values → Value ...
        value = ld(1, ld(6, value))
    raw = ld(4, ld(1, ld(1, ld(1, b"k") + ld(2, ld(6, value)))))
    assert convert.wire_fault(pre_pb.PreprocessRequest.DESCRIPTOR, raw) == (
        "processor_options.kwargs.fields.k", "messages nested over 100 deep")


def test_request_deserializer_returns_an_error_value_for_bad_bytes() -> None:
    parse = convert.request_deserializer(model_pb2.GenerateRequest.FromString, "/vlm.model.v1.ModelService/Generate")
    assert parse(_model_request()).request_id == "r"
    err = parse(_corrupt_last(_model_request(), b"H" * 8))
    assert isinstance(err, InvalidArgument) and err.field == "prompt.items[1].hash"
    assert "vlm.model.v1.GenerateRequest" in err.message
    top = parse(b"\xff")
    assert isinstance(top, InvalidArgument) and top.field is None
    # Unknown methods and absent deserializers pass through.
    assert convert.request_deserializer(len, "/no.Such/Method") is len
    assert convert.request_deserializer(None, "/vlm.model.v1.ModelService/Generate") is None


@pytest.mark.parametrize("sampling, field", [
    (types.Sampling(max_tokens=-5), "sampling.max_tokens"),
    (types.Sampling(min_tokens=-1), "sampling.min_tokens"),
    (types.Sampling(logprobs=-1), "sampling.logprobs"),
    (types.Sampling(seed=1 << 70), "sampling.seed"),
    (types.Sampling(top_k=1 << 40), "sampling.top_k"),
    (types.Sampling(stop_token_ids=(3, -2)), "sampling.stop_token_ids"),
])
def test_sampling_the_wire_cannot_hold_is_invalid_argument(sampling, field) -> None:
    with pytest.raises(InvalidArgument) as e:
        convert.sampling_to_pb(sampling)
    assert e.value.field == field


def _chat(*messages: tuple[str, str]) -> types.PromptInput:
    return types.PromptInput(messages=tuple(types.ChatMessage(r, (types.ChatPart(text=t),)) for r, t in messages))


@pytest.mark.parametrize("prompt, kind, field", [
    (types.PromptInput(text=""), "text", "prompt.text"),
    (types.PromptInput(text="caf\udce9"), "text", "prompt.text"),
    (_chat(("user", "hi"), ("wizard", "abracadabra")), "messages", "prompt.messages[1].role"),
    (_chat(("function", "{}")), "messages", "prompt.messages[0].role"),
    (_chat(("User", "hi")), "messages", "prompt.messages[0].role"),
    (_chat(("system", "be brief"), ("user", "hi \ud800")), "messages", "prompt.messages[1].content[0].text"),
])
def test_prompt_text_checks(prompt, kind, field) -> None:
    with pytest.raises(InvalidArgument) as e:
        _check_text(prompt, kind)
    assert e.value.field == field


def test_known_roles_and_plain_text_pass() -> None:
    assert CHAT_ROLES == {"system", "developer", "user", "assistant", "tool"}
    _check_text(_chat(*((r, "x") for r in sorted(CHAT_ROLES))), "messages")
    _check_text(types.PromptInput(text=" "), "text")
    _check_text(types.PromptInput(token_ids=(1,)), "token_ids")


def test_stop_strings_are_bounded() -> None:
    v = PromptValidator(SPEC, max_stop_strings=4)
    v.validate_sampling(types.Sampling(stop=("a", "b", "c", "d")), 3)
    with pytest.raises(InvalidArgument) as e:
        v.validate_sampling(types.Sampling(stop=("a", "b", "c", "d", "e")), 3)
    assert e.value.field == "sampling.stop"
