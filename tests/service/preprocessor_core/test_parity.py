"""Each preprocessed prompt equals vLLM's own in-process processing of the same inputs."""

from __future__ import annotations

import pytest

from tests.service.preprocessor_core.conftest import ARCHS, assert_matches_reference, data_url
from tests.unit.preprocessor.samples import image_bytes, video_bytes
from vlm.types import ChatMessage, ChatPart, Media, Modality, PromptInput

IMG_A = image_bytes(64, 48, seed=1)
IMG_B = image_bytes(40, 72, seed=2, fmt="JPEG", quality=90)
VIDEO = video_bytes(frames=8, width=64, height=64, fps=4.0)


def image(data: bytes) -> Media:
    return Media(Modality.IMAGE, data)


def video(data: bytes) -> Media:
    return Media(Modality.VIDEO, data)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_image(arch_env, arch):
    env = arch_env(arch)
    text = f"Describe {env.spec.image_token} briefly."
    res = env.process(PromptInput(text=text, media=(image(IMG_A),)))
    ref = env.ref_completion({"prompt": text, "multi_modal_data": {"image": [env.ref_image(IMG_A)]}})
    assert_matches_reference(res.prompt, ref)
    assert len(res.prompt.items) == 1 and res.prompt.prompt_text == text
    assert res.prompt.fingerprint == env.processor.profile.fingerprint
    assert res.metrics.modalities["image"].items == 1
    assert res.metrics.prompt_tokens == len(res.prompt.token_ids)
    assert res.metrics.modalities["image"].feature_bytes == res.prompt.items[0].nbytes > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_two_images(arch_env, arch):
    env = arch_env(arch)
    tok = env.spec.image_token
    text = f"First {tok} then {tok} compare."
    res = env.process(PromptInput(text=text, media=(image(IMG_A), image(IMG_B))))
    ref = env.ref_completion(
        {"prompt": text, "multi_modal_data": {"image": [env.ref_image(IMG_A), env.ref_image(IMG_B)]}}
    )
    assert_matches_reference(res.prompt, ref)
    a, b = res.prompt.items
    assert a.hash != b.hash
    assert a.placeholder.end <= b.placeholder.offset


@pytest.mark.parametrize("arch", ARCHS)
def test_image_and_video_interleaved(arch_env, arch):
    env = arch_env(arch)
    if not env.has_video:
        pytest.skip(f"{arch} takes no video")
    it, vt = env.spec.image_token, env.spec.video_token
    text = f"Image {it} then video {vt} and image {it}."
    media = (image(IMG_A), video(VIDEO), image(IMG_B))
    res = env.process(PromptInput(text=text, media=media))
    ref = env.ref_completion(
        {
            "prompt": text,
            "multi_modal_data": {
                "image": [env.ref_image(IMG_A), env.ref_image(IMG_B)],
                "video": [env.ref_video(VIDEO)],
            },
        }
    )
    assert_matches_reference(res.prompt, ref)
    assert [i.modality for i in res.prompt.items] == [Modality.IMAGE, Modality.VIDEO, Modality.IMAGE]
    assert set(res.metrics.modalities) == {"image", "video"}


@pytest.mark.parametrize("arch", ARCHS)
def test_token_ids(arch_env, arch):
    env = arch_env(arch)
    tok = env.spec.image_token
    ids = env.tokenizer.encode(f"Look at {tok} and {tok} now", add_special_tokens=True)
    res = env.process(PromptInput(token_ids=tuple(ids), media=(image(IMG_B), image(IMG_A))))
    ref = env.ref_completion(
        {
            "prompt_token_ids": list(ids),
            "multi_modal_data": {"image": [env.ref_image(IMG_B), env.ref_image(IMG_A)]},
        }
    )
    assert_matches_reference(res.prompt, ref)
    assert len(res.prompt.token_ids) > len(ids)  # placeholders expanded
    assert res.prompt.prompt_text is None


@pytest.mark.parametrize("arch", ARCHS)
def test_chat_messages(arch_env, arch):
    env = arch_env(arch)
    # Each media part is followed by text: with the tiny Gemma 3 tokenizer, vLLM itself cannot
    # process an image placeholder directly followed by the template's "\n" (its newline
    # merging fails: "Expected there to be 1 prompt placeholders ..."), in render_chat too.
    parts = [ChatPart(media=image(IMG_A)), ChatPart(text="What is here?")]
    ref_parts = [
        {"type": "image_url", "image_url": {"url": data_url("image/png", IMG_A)}},
        {"type": "text", "text": "What is here?"},
    ]
    if env.has_video:
        parts += [ChatPart(media=video(VIDEO)), ChatPart(text="And here?")]
        ref_parts += [
            {"type": "video_url", "video_url": {"url": data_url("video/mp4", VIDEO)}},
            {"type": "text", "text": "And here?"},
        ]
    parts += [ChatPart(media=image(IMG_B)), ChatPart(text="Compare.")]
    ref_parts += [
        {"type": "image_url", "image_url": {"url": data_url("image/jpeg", IMG_B)}},
        {"type": "text", "text": "Compare."},
    ]
    messages = (
        ChatMessage("system", (ChatPart(text="You are terse."),)),
        ChatMessage("user", tuple(parts)),
    )
    res = env.process(PromptInput(messages=messages))
    ref = env.ref_chat(
        [
            {"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
            {"role": "user", "content": ref_parts},
        ]
    )
    assert_matches_reference(res.prompt, ref)
    expected = [Modality.IMAGE, Modality.VIDEO, Modality.IMAGE] if env.has_video else [Modality.IMAGE] * 2
    assert [i.modality for i in res.prompt.items] == expected
    assert res.prompt.prompt_text and "What is here?" in res.prompt.prompt_text
    assert res.metrics.input_kind == "messages"


#: The per-patch token that receives an image embedding (the rest of a range keeps its text).
EMBED_TOKENS = {"mistral3": "[IMG]", "gemma3": "<image_soft_token>", "fuyu": "|SPEAKER|"}


@pytest.mark.parametrize("arch", ["mistral3", "gemma3", "fuyu"])
def test_non_contiguous_is_embed(arch_env, arch):
    """Ranges include structural tokens that keep their text embedding ([IMG_BREAK], [IMG_END],
    ...): is_embed is True exactly on the image-patch tokens and is not all True."""
    env = arch_env(arch)
    text = f"See {env.spec.image_token} ok"
    res = env.process(PromptInput(text=text, media=(image(IMG_A),)))
    (item,) = res.prompt.items
    ph = item.placeholder
    assert ph.is_embed is not None
    embed_ids = {env.tokenizer.convert_tokens_to_ids(EMBED_TOKENS[arch])}
    span = res.prompt.token_ids[ph.offset : ph.end]
    assert ph.is_embed == tuple(t in embed_ids for t in span)
    assert not all(ph.is_embed) and any(ph.is_embed)
    if arch == "mistral3":
        # Pixtral: rows of [IMG] separated by [IMG_BREAK], closed by [IMG_END].
        brk = env.tokenizer.convert_tokens_to_ids("[IMG_BREAK]")
        end = env.tokenizer.convert_tokens_to_ids("[IMG_END]")
        assert span[-1] == end and ph.is_embed[-1] is False
        rows = [i for i, t in enumerate(span) if t == brk]
        assert rows and all(ph.is_embed[i] is False for i in rows)
        width = rows[0]
        assert ph.is_embed[: width + 1] == (True,) * width + (False,)


def test_transformers_backend_llava(arch_env):
    """vLLM's Transformers backend lays fields out differently (flat pixel_values plus
    num_image_patches, is_embed spelled out); the output follows it exactly."""
    env = arch_env("llava", "transformers")
    tok = env.spec.image_token
    text = f"A {tok} B {tok}"
    res = env.process(PromptInput(text=text, media=(image(IMG_A), image(IMG_B))))
    ref = env.ref_completion(
        {"prompt": text, "multi_modal_data": {"image": [env.ref_image(IMG_A), env.ref_image(IMG_B)]}}
    )
    assert_matches_reference(res.prompt, ref)
    native = arch_env("llava").processor.process(PromptInput(text=text, media=(image(IMG_A), image(IMG_B))))
    assert res.prompt.fingerprint.model_impl == "transformers"
    assert res.prompt.fingerprint.config_hash != native.prompt.fingerprint.config_hash
    layouts = {n: f.layout.value for n, f in res.prompt.items[0].fields.items()}
    assert layouts != {n: f.layout.value for n, f in native.prompt.items[0].fields.items()}


def test_processor_kwargs_qwen2_vl(arch_env):
    """Allowed per-request kwargs reach vLLM (HF processor / video loader) and the hash."""
    env = arch_env("qwen2_vl")
    it, vt = env.spec.image_token, env.spec.video_token
    text = f"{it} and {vt}"
    media = (image(IMG_A), video(VIDEO))
    kwargs = {"max_pixels": 40000.0, "fps": 4}  # numbers arrive as floats from protobuf Struct
    res = env.process(PromptInput(text=text, media=media), kwargs)
    ref = env.ref_completion(
        {
            "prompt": text,
            "multi_modal_data": {"image": [env.ref_image(IMG_A)], "video": [env.ref_video(VIDEO, fps=4.0)]},
            "mm_processor_kwargs": {"max_pixels": 40000},
            "media_io_kwargs": {"video": {"fps": 4.0}},
        }
    )
    assert_matches_reference(res.prompt, ref)
    plain = env.process(PromptInput(text=text, media=media))
    assert [i.hash for i in plain.prompt.items] != [i.hash for i in res.prompt.items]
    assert len(plain.prompt.token_ids) != len(res.prompt.token_ids)


def test_processor_cache_hits_and_isolation(arch_env):
    """A repeated image is served from vLLM's processor cache, identical, and results never
    alias the cached tensors."""
    env = arch_env("llava")
    img = image_bytes(50, 50, seed=77)
    text = f"x {env.spec.image_token}"
    first = env.process(PromptInput(text=text, media=(image(img),)))
    assert (first.metrics.cache_hits, first.metrics.cache_misses) == (0, 1)
    first.prompt.items[0].fields["pixel_values"].data.zero_()  # must not reach the cache
    second = env.process(PromptInput(text=text, media=(image(img),)))
    assert (second.metrics.cache_hits, second.metrics.cache_misses) == (1, 0)
    ref = env.ref_completion({"prompt": text, "multi_modal_data": {"image": [env.ref_image(img)]}})
    assert_matches_reference(second.prompt, ref)
    assert second.metrics.cache_bytes > 0


def _archs_vllm_cannot_process() -> list[str]:
    from vlm.testing.tiny_models import SPECS

    return [a for a in ARCHS if a in SPECS and not SPECS[a].runs_in_vllm] or ["fuyu"]


@pytest.mark.parametrize("arch", _archs_vllm_cannot_process())
def test_arch_vllm_cannot_process(tiny_model, arch):
    """Architectures vLLM 0.32 cannot process (Fuyu: its Transformers backend hands
    FuyuProcessor a text whose image tokens don't match, for every image): vLLM's own renderer
    fails on one image, and our processor refuses to start with that reason."""
    from tests.service.preprocessor_core.conftest import make_reference
    from preprocessor_svc.processing import Processor, ProcessorConfig
    from vlm.testing.tiny_models import SPECS

    if SPECS.get(arch) is None or SPECS[arch].runs_in_vllm:
        pytest.skip(f"vLLM processes {arch}")
    model_dir = tiny_model(arch)
    from vllm.multimodal.media.image import ImageMediaIO

    reference = make_reference(model_dir, "auto")
    with pytest.raises(Exception, match="Failed to apply"):
        reference.render_cmpl(
            [{"prompt": f"a {SPECS[arch].image_token}", "multi_modal_data": {"image": [ImageMediaIO().load_bytes(IMG_A)]}}]
        )
    processor = Processor(ProcessorConfig(model=str(model_dir)))
    with pytest.raises(RuntimeError, match="warm-up failed.*Failed to apply"):
        processor.warmup()
    info = processor.profile.model_info()
    assert info.modalities[0].placeholder_text == SPECS[arch].image_token
