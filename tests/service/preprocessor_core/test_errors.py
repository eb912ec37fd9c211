"""Bad requests fail with the right `vlm.errors` class and name the request field at fault."""

from __future__ import annotations

import pytest

from preprocessor_svc.processing import ProcessorConfig
from tests.service.preprocessor_core.conftest import CheckedProcessor
from tests.unit.preprocessor.samples import blank_image_bytes, image_bytes, video_bytes
from vlm.errors import InvalidArgument, InvalidMedia, LimitExceeded, PromptTooLong
from vlm.types import ChatMessage, ChatPart, Media, Modality, PromptInput

PNG = image_bytes(64, 48, seed=3)
MP4 = video_bytes(frames=8)


def img(data: bytes = PNG, mime: str = "") -> Media:
    return Media(Modality.IMAGE, data, mime)


def vid(data: bytes = MP4) -> Media:
    return Media(Modality.VIDEO, data)


def raises(exc_type, field, fn, *args):
    with pytest.raises(exc_type) as info:
        fn(*args)
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    assert info.value.field == field, info.value.message
    return info.value


@pytest.fixture(scope="module")
def llava(arch_env):
    return arch_env("llava")


@pytest.fixture(scope="module")
def llava_small(tiny_model):
    """llava with a 2-image limit and a 48-token context (one image expands to 16 tokens),
    checked in-process and over its own real gRPC service."""
    checked = CheckedProcessor(
        ProcessorConfig(
            model=str(tiny_model("llava")), limit_mm_per_prompt={"image": 2}, max_model_len=48
        )
    )
    yield checked
    checked.close()


# -- placeholder counts (vLLM does not check them on the token path) ------------------------


@pytest.mark.parametrize(
    "template, n_images",
    [("{t} and {t}", 1), ("{t} only", 2), ("{t} alone", 0), ("no placeholder", 1)],
)
def test_placeholder_count_text(llava, template, n_images):
    text = template.format(t=llava.spec.image_token)
    e = raises(InvalidArgument, "prompt.text", llava.process, PromptInput(text=text, media=(img(),) * n_images))
    assert "placeholder" in e.message


def test_placeholder_count_token_ids(llava):
    """vLLM itself would expand the first placeholder and leave the second one bare."""
    tok = llava.spec.image_token
    ids = llava.tokenizer.encode(f"a {tok} b {tok}")
    ref = llava.ref_completion({"prompt_token_ids": ids, "multi_modal_data": {"image": [llava.ref_image(PNG)]}})
    assert len(ref["mm_placeholders"]["image"]) == 1  # vLLM: no error
    raises(InvalidArgument, "prompt.token_ids", llava.process, PromptInput(token_ids=tuple(ids), media=(img(),)))


def test_placeholder_count_chat(llava):
    """A placeholder typed into a chat text part comes on top of the one the template adds."""
    messages = (ChatMessage("user", (ChatPart(text=f"look {llava.spec.image_token}"), ChatPart(media=img()))),)
    raises(InvalidArgument, "prompt.messages", llava.process, PromptInput(messages=messages))


def test_placeholder_of_other_modality(arch_env):
    env = arch_env("qwen2_vl")
    raises(
        InvalidArgument, "prompt.text", env.process,
        PromptInput(text=f"{env.spec.image_token} here", media=(vid(),)),
    )


def test_unsupported_modality(llava):
    raises(InvalidArgument, "media[1].modality", llava.process,
           PromptInput(text=f"{llava.spec.image_token} x", media=(img(), vid())))


# -- limits ----------------------------------------------------------------------------------


def test_items_per_prompt_limit(llava_small):
    t = "<image>"
    assert llava_small.profile.model_info().modalities[0].max_items_per_prompt == 2
    llava_small.process(PromptInput(text=f"{t}{t}", media=(img(),) * 2))
    raises(LimitExceeded, "media", llava_small.process, PromptInput(text=f"{t}{t}{t}", media=(img(),) * 3))
    parts = tuple(ChatPart(media=img()) for _ in range(3))
    raises(LimitExceeded, "prompt.messages", llava_small.process, PromptInput(messages=(ChatMessage("user", parts),)))


def test_prompt_too_long_after_expansion(llava_small):
    ok = llava_small.process(PromptInput(text="<image> short", media=(img(),)))
    assert len(ok.prompt.token_ids) < 48
    text = "<image>" + " word" * 20  # ~20 text tokens: fine alone, too long once expanded
    assert len(llava_small.tokenizer.encode(text)) < 48
    e = raises(PromptTooLong, "prompt.text", llava_small.process, PromptInput(text=text, media=(img(),)))
    assert "48" in e.message


def test_prompt_too_long_before_expansion(llava_small):
    raises(PromptTooLong, "prompt.text", llava_small.process, PromptInput(text="word " * 200))
    raises(PromptTooLong, "prompt.token_ids", llava_small.process, PromptInput(token_ids=(300,) * 100))


# -- processor kwargs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"bogus": 1}, "bogus"),
        ({"max_pixels": -5}, "max_pixels"),
        ({"max_pixels": 1.5}, "max_pixels"),
        ({"max_pixels": True}, "max_pixels"),
        ({"min_pixels": 10**12}, "min_pixels"),  # would upscale beyond the image pixel limit
        ({"fps": 0}, "fps"),
        ({"num_frames": "8"}, "num_frames"),
        ({"do_pan_and_scan": True}, "do_pan_and_scan"),  # deployment-wide only (see kwargs.py)
    ],
)
def test_processor_kwargs_rejected(arch_env, kwargs, name):
    env = arch_env("qwen2_vl")
    raises(InvalidArgument, f"processor_options.kwargs.{name}", env.process,
           PromptInput(text=f"{env.spec.image_token}", media=(img(),)), kwargs)


def test_processor_kwargs_model_specific(llava):
    """max_pixels is Qwen2-VL's: LLaVA's processor would ignore it (yet it would change the
    hash), so it is refused."""
    assert "max_pixels" not in llava.processor.kwargs.offered
    raises(InvalidArgument, "processor_options.kwargs.max_pixels", llava.process,
           PromptInput(text="<image>", media=(img(),)), {"max_pixels": 1000})


# -- media -----------------------------------------------------------------------------------


BOMB = blank_image_bytes(8000, 8000)  # 64 Mpixel bilevel PNG: a few kB on the wire


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"\x00garbage" * 50, "accepted format"),
        (PNG[: len(PNG) // 2], "decode"),  # truncated
        (image_bytes(16, 16, fmt="PPM"), "accepted format"),  # a Pillow format off the list
        (image_bytes(16, 16, fmt="ICO"), "accepted format"),
        (BOMB, "pixels"),
    ],
)
def test_bad_images(llava, data, reason):
    e = raises(InvalidMedia, "media[1].data", llava.process,
               PromptInput(text="<image><image>", media=(img(), img(data))))
    assert reason in e.message


def test_bad_image_in_chat(llava):
    messages = (
        ChatMessage("system", (ChatPart(text="hi"),)),
        ChatMessage("user", (ChatPart(text="see"), ChatPart(media=img(PNG[:100])))),
    )
    raises(InvalidMedia, "prompt.messages[1].content[1].media.data", llava.process, PromptInput(messages=messages))


def test_mime_type_mismatch(llava):
    raises(InvalidMedia, "media[0].mime_type", llava.process,
           PromptInput(text="<image>", media=(img(mime="video/mp4"),)))


@pytest.mark.parametrize("data", [b"", MP4[: len(MP4) // 3], b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 200, PNG])
def test_bad_videos(arch_env, data):
    env = arch_env("llava_onevision")
    raises(InvalidMedia, "media[1].data", env.process,
           PromptInput(text="<image><video>", media=(img(), vid(data))))


# -- prompt shape ----------------------------------------------------------------------------


def test_prompt_form(llava):
    # Domain-level guards for shapes the wire's oneof cannot express (tested in-process; the
    # wire's own structural checks are in tests/unit/test_convert.py).
    p = llava.processor.process
    raises(InvalidArgument, "prompt", p, PromptInput())
    raises(InvalidArgument, "prompt", p, PromptInput(text="a", token_ids=(1, 2)))
    raises(InvalidArgument, "prompt.messages", p, PromptInput(messages=()))
    raises(InvalidArgument, "media", p,
           PromptInput(messages=(ChatMessage("user", (ChatPart(text="x"),)),), media=(img(),)))
    raises(InvalidArgument, "prompt.messages[0].content[0]", p,
           PromptInput(messages=(ChatMessage("user", (ChatPart(text="x", media=img()),)),)))
    raises(InvalidArgument, "prompt.token_ids", p, PromptInput(token_ids=()))
    raises(InvalidArgument, "prompt.token_ids", p, PromptInput(token_ids=(1, 10**9)))
    raises(InvalidArgument, "prompt.token_ids", p, PromptInput(token_ids=(1, -3)))


def test_prompt_checks_come_before_decoding(llava):
    """A malformed prompt is refused without decoding its media (cheap checks first)."""
    raises(InvalidArgument, "prompt.text", llava.process,
           PromptInput(text="<image><image>", media=(img(b"not an image"),)))
