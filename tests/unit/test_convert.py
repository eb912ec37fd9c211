"""proto ⇄ domain conversions: round trips and field-named structural errors."""

from __future__ import annotations

import pytest
import torch

from vlm import convert, types
from vlm.common.v1 import generation_pb2 as gen_pb
from vlm.common.v1 import multimodal_pb2 as mm_pb
from vlm.errors import InvalidArgument

FP = types.Fingerprint("tiny/llava", "auto", "abc123", "bfloat16")


def _prompt() -> types.Prompt:
    return types.Prompt(
        fingerprint=FP,
        token_ids=(1, 5, 5, 5, 9, 6, 6, 2),
        items=(
            types.Item(
                types.Modality.IMAGE,
                "h-image",
                types.Placeholder(1, 3),
                {
                    "pixel_values": types.ItemField(torch.rand(3, 4, 4), types.FieldLayout.BATCHED),
                    "image_grid_thw": types.ItemField(
                        torch.tensor([1, 2, 2]), types.FieldLayout.BATCHED, keep_on_cpu=True
                    ),
                },
            ),
            types.Item(
                types.Modality.VIDEO,
                "h-video",
                types.Placeholder(4, 3, (False, True, True)),
                {"pixel_values_videos": types.ItemField(torch.rand(6, 8).to(torch.bfloat16), types.FieldLayout.FLAT, flat_dim=0)},
            ),
        ),
        prompt_text="<image> and <video>",
    )


def _pb(p: types.Prompt, omit=()) -> mm_pb.PreprocessedPrompt:
    return mm_pb.PreprocessedPrompt.FromString(convert.encode_prompt(p).to_bytes(omit))


def test_prompt_round_trip_through_bytes() -> None:
    p = _prompt()
    wire = mm_pb.PreprocessedPrompt.FromString(convert.encode_prompt(p).to_bytes())
    back = convert.prompt_from_pb(wire)
    assert back.fingerprint == p.fingerprint and back.token_ids == p.token_ids
    assert back.prompt_text == p.prompt_text
    for a, b in zip(p.items, back.items, strict=True):
        assert (a.modality, a.hash, a.placeholder) == (b.modality, b.hash, b.placeholder)
        assert a.fields.keys() == b.fields.keys()
        for name in a.fields:
            fa, fb = a.fields[name], b.fields[name]
            assert (fa.layout, fa.flat_dim, fa.keep_on_cpu) == (fb.layout, fb.flat_dim, fb.keep_on_cpu)
            assert fa.data.dtype == fb.data.dtype and torch.equal(fa.data, fb.data)


def test_hash_only_items() -> None:
    p = _prompt()
    wire = _pb(p, omit={"h-video"})
    assert len(wire.items[0].fields) == 2 and len(wire.items[1].fields) == 0
    back = convert.prompt_from_pb(wire)
    assert back.items[1].fields is None and back.items[1].hash == "h-video"


def test_item_errors_name_the_field() -> None:
    wire = _pb(_prompt())
    wire.items[1].modality = mm_pb.MODALITY_UNSPECIFIED
    with pytest.raises(InvalidArgument) as exc:
        convert.prompt_from_pb(wire)
    assert exc.value.field == "prompt.items[1].modality"

    wire = _pb(_prompt())
    wire.items[0].fields["pixel_values"].tensor.data = b"short"
    with pytest.raises(InvalidArgument) as exc:
        convert.prompt_from_pb(wire)
    assert exc.value.field == "prompt.items[0].fields.pixel_values.tensor.data"

    wire = _pb(_prompt())
    wire.items[0].fields["pixel_values"].layout = mm_pb.FIELD_LAYOUT_UNSPECIFIED
    with pytest.raises(InvalidArgument) as exc:
        convert.prompt_from_pb(wire)
    assert exc.value.field == "prompt.items[0].fields.pixel_values.layout"

    wire = _pb(_prompt())
    wire.items[0].hash = ""
    with pytest.raises(InvalidArgument) as exc:
        convert.prompt_from_pb(wire)
    assert exc.value.field == "prompt.items[0].hash"


def test_sampling_round_trip_keeps_unset_fields_unset() -> None:
    s = types.Sampling(temperature=0.0, top_k=5, seed=7, max_tokens=16, stop=("\n",), stop_token_ids=(2,), ignore_eos=True, logprobs=0)
    wire = convert.sampling_to_pb(s)
    assert not wire.HasField("top_p") and wire.HasField("temperature") and wire.HasField("logprobs")
    assert convert.sampling_from_pb(gen_pb.SamplingParams.FromString(wire.SerializeToString())) == s
    assert convert.sampling_from_pb(gen_pb.SamplingParams()) == types.Sampling()


def test_chunk_round_trip() -> None:
    c = types.Chunk(
        request_id="r1",
        token_ids=(4, 5),
        text="hé",
        logprobs=(types.PositionLogprobs(types.TokenLogprob(4, -0.5, 1), (types.TokenLogprob(4, -0.5, 1),)),),
        finish_reason=types.FinishReason.STOP,
        stop_reason="\n",
        usage=types.Usage(10, 2, 3),
    )
    assert convert.chunk_from_pb(convert.chunk_to_pb(c)) == c
    mid = types.Chunk(request_id="r1", token_ids=(1,), text="a")
    assert convert.chunk_from_pb(convert.chunk_to_pb(mid)) == mid
    stop_id = types.Chunk(request_id="r", finish_reason=types.FinishReason.STOP, stop_reason=2)
    assert convert.chunk_from_pb(convert.chunk_to_pb(stop_id)).stop_reason == 2


def test_prompt_input_forms() -> None:
    img = mm_pb.Media(modality=mm_pb.MODALITY_IMAGE, data=b"png", mime_type="image/png")
    p = convert.prompt_input_from_pb(mm_pb.PromptInput(text="<image> hi"), [img])
    assert p.text == "<image> hi" and p.media[0].modality is types.Modality.IMAGE

    p = convert.prompt_input_from_pb(mm_pb.PromptInput(token_ids=mm_pb.TokenIds(ids=[1, 2])), [img])
    assert p.token_ids == (1, 2)

    chat = mm_pb.ChatMessages(
        messages=[mm_pb.ChatMessage(role="user", content=[mm_pb.ContentPart(media=img), mm_pb.ContentPart(text="what?")])]
    )
    p = convert.prompt_input_from_pb(mm_pb.PromptInput(messages=chat), [])
    assert p.add_generation_prompt and p.all_media()[0].data == b"png"
    wire, media = convert.prompt_input_to_pb(p)
    assert convert.prompt_input_from_pb(wire, media) == p

    for bad, media_list, field in [
        (mm_pb.PromptInput(), [], "prompt"),
        (mm_pb.PromptInput(token_ids=mm_pb.TokenIds()), [], "prompt.token_ids.ids"),
        (mm_pb.PromptInput(messages=chat), [img], "media"),
        (mm_pb.PromptInput(text="x"), [mm_pb.Media(data=b"x")], "media[0].modality"),
    ]:
        with pytest.raises(InvalidArgument) as exc:
            convert.prompt_input_from_pb(bad, media_list)
        assert exc.value.field == field


def test_processor_kwargs_integral_numbers_become_ints() -> None:
    opts = convert.processor_kwargs_to_pb({"max_pixels": 313600, "fps": 1.5, "do_resize": True})
    back = convert.processor_kwargs_from_pb(mm_pb.ProcessorOptions.FromString(opts.SerializeToString()))
    assert back == {"max_pixels": 313600, "fps": 1.5, "do_resize": True}
    assert isinstance(back["max_pixels"], int)


def test_encoded_prompt_frames_into_outgoing_messages() -> None:
    """The wire form is spliced into PreprocessResponse / model GenerateRequest by concatenation;
    the result must parse as the message a generated serializer would have written."""
    from vlm.model.v1 import model_pb2
    from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb

    p = _prompt()
    enc = convert.encode_prompt(p)
    assert enc.hashes == ("h-image", "h-video")
    assert enc.decoded.items[1].placeholder == p.items[1].placeholder

    resp = pre_pb.PreprocessResponse.FromString(
        convert.preprocess_response_bytes(enc, omit_fields_for={"h-image"})
    )
    assert resp.prompt == _pb(p, omit={"h-image"})
    assert len(resp.prompt.items[0].fields) == 0 and len(resp.prompt.items[1].fields) == 1

    sampling = convert.sampling_to_pb(types.Sampling(max_tokens=7, temperature=0.5))
    req = model_pb2.GenerateRequest.FromString(
        convert.model_generate_request_bytes("rid", enc, sampling)
    )
    assert req.request_id == "rid" and req.sampling == sampling and req.prompt == _pb(p)
    expected = model_pb2.GenerateRequest(request_id="rid", sampling=sampling, prompt=_pb(p))
    assert model_pb2.GenerateRequest.FromString(expected.SerializeToString()) == req


def test_relayed_generate_responses_have_one_layout() -> None:
    """The preprocessor relays the model service's GenerateResponse bytes as its own."""
    from vlm.model.v1 import model_pb2
    from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb

    def layout(msg):
        return [(f.name, f.number, f.type, f.message_type and f.message_type.full_name)
                for f in msg.DESCRIPTOR.fields]

    assert layout(model_pb2.GenerateResponse) == layout(pre_pb.GenerateResponse)
    assert layout(pre_pb.PreprocessResponse) == [("prompt", 1, 11, "vlm.common.v1.PreprocessedPrompt")]
    chunk = convert.chunk_to_pb(types.Chunk("r", (1, 2), "hi"))
    raw = model_pb2.GenerateResponse(chunk=chunk).SerializeToString()
    assert pre_pb.GenerateResponse.FromString(raw).chunk == chunk
