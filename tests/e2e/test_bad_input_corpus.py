"""Bad-input corpus: one table of malformed requests, each sent over a real port to the service
that must refuse it, with the exact status and the request field it must name.

Targets (all on loopback, all real servers):

* `llava_pipeline`'s model service: `ModelService.Generate` with hand-built `PreprocessedPrompt`
  protobufs (and raw wire bytes where protobuf would refuse to build the message), starting from
  a prompt its own preprocessor produced;
* a LLaVA gateway (a second `PreprocessorApp` in front of the same model service) with small
  limits so that the limit paths are cheap: 1 MiB messages, 256 KiB images, 2 images per prompt;
  `PreprocessorService.Preprocess` / `Generate` over gRPC and the OpenAI-compatible HTTP front
  door on the same app (`http_port=0`);
* a LLaVA-OneVision preprocessor without a model replica (`Preprocess` only): the video paths
  (LLaVA takes no video, so its preprocessor refuses a video before decoding it).

gRPC cases assert the status code, the `ErrorDetail` field in the trailers
(`vlm.client.upstream_error` → `UpstreamError.upstream_field`) and that the message names it;
gateway `Generate` cases refused by the model service check that the relay passes both through.
HTTP cases assert the HTTP status and OpenAI's error `type` (the reason) and `param` (the field).
The last test checks that every service is still SERVING, that no preprocessing worker was
restarted, that no corpus request reached the engine, and that a good request still gets HF's
greedy tokens.
"""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from preprocessor_svc.app import PreprocessorApp
from preprocessor_svc.media import MediaLimits
from preprocessor_svc.pool import PoolConfig
from preprocessor_svc.processing import ProcessorConfig
from tests.e2e.conftest import engine_finished_requests, png
from tests.service.model_core.hf_reference import hf_greedy
from vlm import convert, types
from vlm.client import ModelClient, PreprocessorClient, upstream_error
from vlm.common.v1 import generation_pb2 as gen_pb
from vlm.common.v1 import multimodal_pb2 as mm_pb
from vlm.model.v1 import model_pb2
from vlm.preprocessor.v1 import preprocessor_pb2 as pre_pb
from vlm.server import ServerOptions, channel_options
from vlm.testing.tiny_models import SPECS, build_tiny_model

pytestmark = [pytest.mark.engine, pytest.mark.asyncio(loop_scope="session")]

IMAGE, VIDEO = types.Modality.IMAGE, types.Modality.VIDEO
INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

#: The corpus gateway's limits (small, so the limit paths are cheap to reach).
GW_MAX_MESSAGE = 1 << 20
GW_MAX_IMAGE = 256 << 10
GW_MAX_IMAGES = 2
SERVED = "corpus-llava"
#: Every call gets this deadline: a refused request must come back well within it.
DEADLINE_S = 60.0

PRE_PREPROCESS = "/vlm.preprocessor.v1.PreprocessorService/Preprocess"
PRE_GENERATE = "/vlm.preprocessor.v1.PreprocessorService/Generate"
MODEL_GENERATE = "/vlm.model.v1.ModelService/Generate"

IMAGE_TOKEN = SPECS["llava"].image_token  # "<image>"
VIDEO_TOKEN = SPECS["llava_onevision"].video_token

#: gRPC cannot carry malformed UTF-8 in a string field past grpc's own deserializer: it answers
#: UNKNOWN ("Unexpected DecodeError"), naming nothing, before any handler (or the error-mapping
#: interceptor) runs. `vlm.convert.request_deserializer` turns such bytes into an
#: InvalidArgument naming the field; `vlm.server.ErrorMappingInterceptor` has to wrap the
#: handlers' deserializers with it and raise what comes back.

# ---------------------------------------------------------------------------------------------
# Media samples
# ---------------------------------------------------------------------------------------------


def image_bytes(fmt: str, size: tuple[int, int] = (48, 40), mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.RandomState(seed)
    img = Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def bomb_png(side: int = 12_000) -> bytes:
    """144 M pixels (over the 40 M default) in a few KiB: one-bit, all black."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def noise_png(side: int) -> bytes:
    """Incompressible: about side² × 3 bytes."""
    return image_bytes("PNG", (side, side), seed=side)


def mp4_bytes(frames: int, size: int = 64) -> bytes:
    """An MP4 (mp4v) from OpenCV; frames=0 gives a valid container with no frame."""
    import cv2

    rng = np.random.RandomState(frames)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 4.0, (size, size))
        assert writer.isOpened(), "OpenCV cannot write MP4 here"
        for i in range(frames):
            writer.write(np.roll((rng.rand(size, size, 3) * 255).astype(np.uint8), i, axis=1))
        writer.release()
        return Path(path).read_bytes()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ld(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (hand-made wire bytes)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ---------------------------------------------------------------------------------------------
# Request builders
# ---------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What the builders need: a good preprocessed prompt (one image, two images) as protobufs,
    a second image's item, the model's facts and the servers' message limits."""

    one: mm_pb.PreprocessedPrompt
    two: mm_pb.PreprocessedPrompt
    other_item: mm_pb.MultiModalItem
    info: types.ModelInfo
    model_max_message: int
    media: dict[str, bytes] = field(default_factory=dict)

    @property
    def image_token_id(self) -> int:
        (image,) = [m for m in self.info.modalities if m.modality is IMAGE]
        return image.placeholder_token_ids[0]

    def sample(self, name: str, make: Callable[[], bytes]) -> bytes:
        if name not in self.media:
            self.media[name] = make()
        return self.media[name]


def media_pb(data: bytes, mime: str = "image/png", modality: int = mm_pb.MODALITY_IMAGE) -> mm_pb.Media:
    return mm_pb.Media(modality=modality, data=data, mime_type=mime)


def preprocess_req(text: str | None = None, media: list[mm_pb.Media] = (), *,
                   token_ids: list[int] | None = None,
                   messages: list[mm_pb.ChatMessage] | None = None) -> pre_pb.PreprocessRequest:
    if messages is not None:
        prompt = mm_pb.PromptInput(messages=mm_pb.ChatMessages(messages=messages))
    elif token_ids is not None:
        prompt = mm_pb.PromptInput(token_ids=mm_pb.TokenIds(ids=token_ids))
    else:
        prompt = mm_pb.PromptInput(text=text)
    return pre_pb.PreprocessRequest(request_id=uuid.uuid4().hex, prompt=prompt, media=list(media))


def image_prompt(data: bytes, mime: str = "image/png", n: int = 1) -> pre_pb.PreprocessRequest:
    return preprocess_req(f"{IMAGE_TOKEN}\n" * n + "Describe.", [media_pb(data, mime)] * n)


def video_prompt(data: bytes) -> pre_pb.PreprocessRequest:
    return preprocess_req(f"{VIDEO_TOKEN}\nDescribe.", [media_pb(data, "video/mp4", mm_pb.MODALITY_VIDEO)])


def chat(*parts: mm_pb.ContentPart, role: str = "user") -> pre_pb.PreprocessRequest:
    return preprocess_req(messages=[mm_pb.ChatMessage(role=role, content=list(parts))])


def text_part(text: str) -> mm_pb.ContentPart:
    return mm_pb.ContentPart(text=text)


def generate_req(
    sampling: gen_pb.SamplingParams, request: pre_pb.PreprocessRequest | None = None
) -> pre_pb.GenerateRequest:
    return pre_pb.GenerateRequest(input=request or preprocess_req("Hello there."), sampling=sampling)


GOOD_SAMPLING = gen_pb.SamplingParams(temperature=0.0, max_tokens=1)


def model_req(
    prompt: mm_pb.PreprocessedPrompt, sampling: gen_pb.SamplingParams = GOOD_SAMPLING
) -> model_pb2.GenerateRequest:
    return model_pb2.GenerateRequest(request_id=uuid.uuid4().hex, prompt=prompt, sampling=sampling)


def mutate(
    base: mm_pb.PreprocessedPrompt, change: Callable[[mm_pb.PreprocessedPrompt], Any]
) -> model_pb2.GenerateRequest:
    p = mm_pb.PreprocessedPrompt()
    p.CopyFrom(base)
    change(p)
    return model_req(p)


def pixels(p: mm_pb.PreprocessedPrompt, i: int = 0) -> mm_pb.ItemField:
    return p.items[i].fields["pixel_values"]


def _set(obj: Any, **values: Any) -> None:
    for k, v in values.items():
        setattr(obj, k, v)


def _replace_list(rep: Any, values: list) -> None:
    del rep[:]
    rep.extend(values)


def _rename_field(p: mm_pb.PreprocessedPrompt) -> None:
    f = mm_pb.ItemField()
    f.CopyFrom(pixels(p))
    del p.items[0].fields["pixel_values"]
    p.items[0].fields["pixels"].CopyFrom(f)


def _as_float64(p: mm_pb.PreprocessedPrompt) -> None:
    t = pixels(p).tensor
    data = np.frombuffer(t.data, dtype="<f4").astype("<f8")
    _set(t, dtype=4, data=data.tobytes())  # DTYPE_FLOAT64: a well-formed tensor, wrong dtype


def _narrower(p: mm_pb.PreprocessedPrompt) -> None:
    t = pixels(p).tensor
    c, h, w = t.shape
    _replace_list(t.shape, [c, h, w // 2])
    t.data = t.data[: len(t.data) // 2]


def _swap_items(p: mm_pb.PreprocessedPrompt) -> None:
    a, b = mm_pb.MultiModalItem(), mm_pb.MultiModalItem()
    a.CopyFrom(p.items[0])
    b.CopyFrom(p.items[1])
    p.items[0].CopyFrom(b)
    p.items[1].CopyFrom(a)


def _overlap(p: mm_pb.PreprocessedPrompt) -> None:
    p.items[1].placeholder.offset = p.items[0].placeholder.offset + p.items[0].placeholder.length - 1


def _text_in_range(p: mm_pb.PreprocessedPrompt) -> None:
    p.token_ids[p.items[0].placeholder.offset + 3] = 5


def _shorter_range(p: mm_pb.PreprocessedPrompt) -> None:
    """One embedding position less: the token dropped from the prompt and the range."""
    ph = p.items[0].placeholder
    ids = list(p.token_ids)
    del ids[ph.offset]
    _replace_list(p.token_ids, ids)
    ph.length -= 1


def _stray_image_token(p: mm_pb.PreprocessedPrompt, token: int) -> None:
    p.token_ids.append(token)


def _forged(p: mm_pb.PreprocessedPrompt, other: mm_pb.MultiModalItem) -> None:
    h, ph = p.items[0].hash, mm_pb.PlaceholderRange()
    ph.CopyFrom(p.items[0].placeholder)
    p.items[0].CopyFrom(other)
    p.items[0].hash = h
    p.items[0].placeholder.CopyFrom(ph)


def _invalid_utf8_hash(ctx: Ctx) -> bytes:
    raw = mutate(ctx.one, lambda p: _set(p.items[0], hash="Z" * 64)).SerializeToString()
    return raw.replace(b"Z" * 64, b"\xff" + b"Z" * 63, 1)


def _invalid_utf8_text(prefix: str = "") -> bytes:
    prompt = _ld(1, b"caf\xc3 \xff")  # PromptInput.text with invalid UTF-8
    req = _ld(2, prompt)  # PreprocessRequest.prompt
    return _ld(1, req) if prefix == "input" else req  # GenerateRequest.input


def _invalid_utf8_chat_text() -> bytes:
    part = _ld(1, b"\xfe\xfe")  # ContentPart.text
    msg = _ld(1, b"user") + _ld(2, part)  # ChatMessage.role, .content
    return _ld(2, _ld(3, _ld(1, msg)))  # PreprocessRequest.prompt → PromptInput.messages → .messages


def _unknown_part_type() -> bytes:
    """A content part holding only a field this server does not know (say, a future `audio`)."""
    part = _ld(3, b"\x08\x01")
    msg = _ld(1, b"user") + _ld(2, part) + _ld(2, _ld(1, b"hi"))
    return _ld(2, _ld(3, _ld(1, msg)))


def _http_body_limit() -> int:
    from preprocessor_svc.openai_http import body_limit

    return body_limit(GW_MAX_MESSAGE)


def _oversized(limit: int, number: int) -> bytes:
    """A message one byte over `limit`: a string field `number` (request_id) of that size."""
    return _ld(number, b"a" * (limit + 1))


# ---------------------------------------------------------------------------------------------
# The corpus
# ---------------------------------------------------------------------------------------------

GRPC_TARGETS = {
    "gw.Preprocess": ("gw", PRE_PREPROCESS, False),
    "gw.Generate": ("gw", PRE_GENERATE, True),
    "video.Preprocess": ("video", PRE_PREPROCESS, False),
    "model.Generate": ("model", MODEL_GENERATE, True),
}


@dataclass(frozen=True)
class Case:
    name: str
    #: One of GRPC_TARGETS, or "http.chat" / "http.completions" / "http.raw_chat".
    target: str
    #: ctx -> a protobuf message or raw bytes (gRPC), a JSON object or raw bytes (HTTP).
    build: Callable[[Ctx], Any]
    #: gRPC status code, or the HTTP status for HTTP cases.
    code: grpc.StatusCode | int
    #: The ErrorDetail field (gRPC) / OpenAI `param` (HTTP) the error must name (a function of
    #: the built request where the field's index depends on it).
    field: str | Callable[[Any], str] | None
    #: ErrorDetail reason / OpenAI error type, when the case pins one.
    reason: str | None = None
    #: Words the message must contain (case-insensitive).
    words: str = ""
    xfail: str | None = None


def C(name, target, build, code, field_, reason=None, **kw) -> Case:
    return Case(name, target, build, code, field_, reason, **kw)


def _chat_http(*parts: dict, role: str = "user", **extra) -> dict:
    return {"messages": [{"role": role, "content": list(parts)}], "max_tokens": 2, **extra}


def _image_part(url: Any) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _text_http(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 2, **extra}


CASES: list[Case] = [
    # -- media: images (gateway Preprocess) ---------------------------------------------------
    C("image_empty", "gw.Preprocess", lambda c: image_prompt(b""), INVALID, "media[0].data", "INVALID_MEDIA"),
    C("image_truncated", "gw.Preprocess", lambda c: image_prompt(png(3)[: len(png(3)) // 2]), INVALID,
      "media[0].data", "INVALID_MEDIA"),
    C("image_corrupt", "gw.Preprocess", lambda c: image_prompt(b"\x89PNG\r\n\x1a\n" + b"\x13" * 200), INVALID,
      "media[0].data", "INVALID_MEDIA"),
    C("image_unsupported_format_ppm", "gw.Preprocess",
      lambda c: image_prompt(image_bytes("PPM"), "image/x-portable-pixmap"), INVALID, "media[0].data",
      "INVALID_MEDIA", words="accepted format"),
    C("image_unsupported_format_svg", "gw.Preprocess",
      lambda c: image_prompt(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "image/svg+xml"),
      INVALID, "media[0].data", "INVALID_MEDIA"),
    C("image_decompression_bomb", "gw.Preprocess", lambda c: image_prompt(c.sample("bomb", bomb_png)), INVALID,
      "media[0].data", "INVALID_MEDIA", words="pixels"),
    C("image_oversize_file", "gw.Preprocess", lambda c: image_prompt(c.sample("big", lambda: noise_png(330))),
      INVALID, "media[0].data", "INVALID_MEDIA", words="exceeds the limit"),
    C("image_mime_says_video", "gw.Preprocess", lambda c: image_prompt(png(3), "video/mp4"), INVALID,
      "media[0].mime_type", "INVALID_MEDIA"),
    C("media_modality_unspecified", "gw.Preprocess",
      lambda c: preprocess_req(f"{IMAGE_TOKEN} hi", [media_pb(png(3), modality=mm_pb.MODALITY_UNSPECIFIED)]),
      INVALID, "media[0].modality"),
    C("media_modality_not_served", "gw.Preprocess",
      lambda c: preprocess_req(
          f"{IMAGE_TOKEN} hi", [media_pb(b"\0\0\0\x18ftypmp42", "video/mp4", mm_pb.MODALITY_VIDEO)]),
      INVALID, "media[0].modality"),
    C("too_many_images", "gw.Preprocess", lambda c: image_prompt(png(3), n=GW_MAX_IMAGES + 1), INVALID,
      "media", "LIMIT_EXCEEDED"),
    C("too_many_images_chat", "gw.Preprocess",
      lambda c: chat(*[mm_pb.ContentPart(media=media_pb(png(3)))] * (GW_MAX_IMAGES + 1), text_part("Compare.")),
      INVALID, "prompt.messages", "LIMIT_EXCEEDED"),
    # -- media: videos (LLaVA-OneVision preprocessor) -----------------------------------------
    C("video_empty", "video.Preprocess", lambda c: video_prompt(b""), INVALID, "media[0].data", "INVALID_MEDIA"),
    C("video_truncated", "video.Preprocess", lambda c: video_prompt(c.sample("mp4", lambda: mp4_bytes(6))[:700]),
      INVALID, "media[0].data", "INVALID_MEDIA"),
    C("video_corrupt", "video.Preprocess", lambda c: video_prompt(b"\0\0\0\x18ftypmp42" + b"\x5a" * 4000),
      INVALID, "media[0].data", "INVALID_MEDIA"),
    C("video_unsupported_container_gif", "video.Preprocess", lambda c: video_prompt(image_bytes("GIF")), INVALID,
      "media[0].data", "INVALID_MEDIA", words="container"),
    C("video_zero_frames", "video.Preprocess", lambda c: video_prompt(c.sample("mp4_0", lambda: mp4_bytes(0))),
      INVALID, "media[0].data", "INVALID_MEDIA"),
    # -- prompts (gateway Preprocess) ---------------------------------------------------------
    C("placeholders_2_media_1", "gw.Preprocess",
      lambda c: preprocess_req(f"{IMAGE_TOKEN}{IMAGE_TOKEN} hi", [media_pb(png(3))]), INVALID, "prompt.text"),
    C("placeholder_without_media", "gw.Preprocess", lambda c: preprocess_req(f"{IMAGE_TOKEN} hi"), INVALID,
      "prompt.text"),
    C("media_without_placeholder", "gw.Preprocess", lambda c: preprocess_req("hi", [media_pb(png(3))]), INVALID,
      "prompt.text"),
    C("prompt_text_empty", "gw.Preprocess", lambda c: preprocess_req(""), INVALID, "prompt.text"),
    C("prompt_unset", "gw.Preprocess", lambda c: pre_pb.PreprocessRequest(), INVALID, "prompt"),
    C("token_ids_empty", "gw.Preprocess",
      lambda c: pre_pb.PreprocessRequest(prompt=mm_pb.PromptInput(token_ids=mm_pb.TokenIds())), INVALID,
      "prompt.token_ids.ids"),
    C("token_id_out_of_vocab", "gw.Preprocess", lambda c: preprocess_req(token_ids=[5, c.info.vocab_size]),
      INVALID, "prompt.token_ids"),
    C("prompt_text_too_long", "gw.Preprocess", lambda c: preprocess_req("word " * (c.info.max_model_len + 8)),
      INVALID, "prompt.text", "PROMPT_TOO_LONG"),
    C("token_ids_too_long", "gw.Preprocess", lambda c: preprocess_req(token_ids=[5] * c.info.max_model_len),
      INVALID, "prompt.token_ids", "PROMPT_TOO_LONG"),
    C("prompt_text_invalid_utf8", "gw.Preprocess", lambda c: _invalid_utf8_text(), INVALID, "prompt.text"),
    C("generate_text_invalid_utf8", "gw.Generate", lambda c: _invalid_utf8_text("input"), INVALID,
      "input.prompt.text"),
    # -- chat (gateway Preprocess) ------------------------------------------------------------
    C("chat_role_wizard", "gw.Preprocess", lambda c: chat(text_part("Hi"), role="wizard"), INVALID,
      "prompt.messages[0].role"),
    C("chat_role_empty", "gw.Preprocess", lambda c: chat(text_part("Hi"), role=""), INVALID,
      "prompt.messages.messages[0].role"),
    C("chat_no_messages", "gw.Preprocess",
      lambda c: pre_pb.PreprocessRequest(prompt=mm_pb.PromptInput(messages=mm_pb.ChatMessages())), INVALID,
      "prompt.messages.messages"),
    C("chat_unknown_part_type", "gw.Preprocess", lambda c: _unknown_part_type(), INVALID,
      "prompt.messages.messages[0].content[0]"),
    C("chat_media_part_without_data", "gw.Preprocess",
      lambda c: chat(mm_pb.ContentPart(media=mm_pb.Media(modality=mm_pb.MODALITY_IMAGE)), text_part("What?")),
      INVALID, "prompt.messages[0].content[0].media.data", "INVALID_MEDIA"),
    C("chat_media_part_without_modality", "gw.Preprocess",
      lambda c: chat(mm_pb.ContentPart(media=mm_pb.Media(data=png(3))), text_part("What?")), INVALID,
      "prompt.messages.messages[0].content[0].media.modality"),
    C("chat_with_side_media", "gw.Preprocess",
      lambda c: pre_pb.PreprocessRequest(prompt=chat(text_part("Hi")).prompt, media=[media_pb(png(3))]), INVALID,
      "media"),
    C("chat_text_invalid_utf8", "gw.Preprocess", lambda c: _invalid_utf8_chat_text(), INVALID,
      "prompt.messages.messages[0].content[0].text"),
    # -- sampling (gateway Generate: refused by the model service, relayed with its field) ----
    C("temperature_negative", "gw.Generate", lambda c: generate_req(gen_pb.SamplingParams(temperature=-0.5)),
      INVALID, "sampling.temperature"),
    C("temperature_nan", "gw.Generate", lambda c: generate_req(gen_pb.SamplingParams(temperature=float("nan"))),
      INVALID, "sampling.temperature"),
    C("top_p_zero", "gw.Generate", lambda c: generate_req(gen_pb.SamplingParams(top_p=0.0)), INVALID,
      "sampling.top_p"),
    C("top_p_above_one", "gw.Generate", lambda c: generate_req(gen_pb.SamplingParams(top_p=1.5)), INVALID,
      "sampling.top_p"),
    C("max_tokens_zero", "gw.Generate", lambda c: generate_req(gen_pb.SamplingParams(max_tokens=0)), INVALID,
      "sampling.max_tokens"),
    C("max_tokens_over_context", "gw.Generate",
      lambda c: generate_req(gen_pb.SamplingParams(max_tokens=c.info.max_model_len)), INVALID,
      "sampling.max_tokens", "PROMPT_TOO_LONG"),
    C("too_many_stop_strings", "gw.Generate",
      lambda c: generate_req(gen_pb.SamplingParams(max_tokens=2, stop=[f"s{i}" for i in range(5)])), INVALID,
      "sampling.stop"),
    C("stop_string_empty", "gw.Generate", lambda c: generate_req(gen_pb.SamplingParams(max_tokens=2, stop=[""])),
      INVALID, "sampling.stop"),
    C("stop_token_out_of_vocab", "gw.Generate",
      lambda c: generate_req(gen_pb.SamplingParams(max_tokens=2, stop_token_ids=[c.info.vocab_size])), INVALID,
      "sampling.stop_token_ids[0]"),
    C("generate_corrupt_image", "gw.Generate",
      lambda c: generate_req(GOOD_SAMPLING, image_prompt(b"\x89PNG\r\n\x1a\n" + b"\x13" * 200)), INVALID,
      "media[0].data", "INVALID_MEDIA"),
    C("generate_prompt_text_empty", "gw.Generate", lambda c: generate_req(GOOD_SAMPLING, preprocess_req("")),
      INVALID, "prompt.text"),
    C("gateway_message_too_large", "gw.Preprocess", lambda c: _oversized(GW_MAX_MESSAGE, 1), EXHAUSTED, None,
      words="larger than max"),
    # -- tensors (model service) --------------------------------------------------------------
    C("tensor_dtype_unspecified", "model.Generate", lambda c: mutate(c.one, lambda p: _set(pixels(p).tensor, dtype=0)),
      INVALID, "prompt.items[0].fields.pixel_values.tensor.dtype"),
    C("tensor_dtype_unknown", "model.Generate", lambda c: mutate(c.one, lambda p: _set(pixels(p).tensor, dtype=99)),
      INVALID, "prompt.items[0].fields.pixel_values.tensor.dtype"),
    C("tensor_bytes_short", "model.Generate",
      lambda c: mutate(c.one, lambda p: _set(pixels(p).tensor, data=pixels(p).tensor.data[:-4])), INVALID,
      "prompt.items[0].fields.pixel_values.tensor.data"),
    C("tensor_bytes_long", "model.Generate",
      lambda c: mutate(c.one, lambda p: _set(pixels(p).tensor, data=pixels(p).tensor.data + b"\0")), INVALID,
      "prompt.items[0].fields.pixel_values.tensor.data"),
    C("tensor_dim_negative", "model.Generate",
      lambda c: mutate(c.one, lambda p: _replace_list(pixels(p).tensor.shape, [-3, 32, 32])), INVALID,
      "prompt.items[0].fields.pixel_values.tensor.shape"),
    C("tensor_dims_huge", "model.Generate",
      lambda c: mutate(c.one, lambda p: _replace_list(pixels(p).tensor.shape, [3, 1 << 40, 1 << 40])), INVALID,
      "prompt.items[0].fields.pixel_values.tensor.shape"),
    C("tensor_rank_huge", "model.Generate",
      lambda c: mutate(c.one, lambda p: _replace_list(pixels(p).tensor.shape, [1] * 64)), INVALID,
      "prompt.items[0].fields.pixel_values.tensor.shape"),
    C("field_dtype_wrong", "model.Generate", lambda c: mutate(c.one, _as_float64), INVALID,
      "prompt.items[0].fields.pixel_values.tensor.dtype"),
    C("field_shape_wrong", "model.Generate", lambda c: mutate(c.one, _narrower), INVALID,
      "prompt.items[0].fields.pixel_values.tensor.shape"),
    C("field_layout_unspecified", "model.Generate", lambda c: mutate(c.one, lambda p: _set(pixels(p), layout=0)),
      INVALID, "prompt.items[0].fields.pixel_values.layout"),
    C("field_layout_wrong", "model.Generate",
      lambda c: mutate(c.one, lambda p: _set(pixels(p), layout=mm_pb.FIELD_LAYOUT_SHARED)), INVALID,
      "prompt.items[0].fields.pixel_values.layout"),
    C("field_missing", "model.Generate", lambda c: mutate(c.one, _rename_field), INVALID,
      "prompt.items[0].fields.pixel_values"),
    C("message_too_large", "model.Generate", lambda c: _oversized(c.model_max_message, 1), EXHAUSTED, None,
      words="larger than max"),
    # -- ranges (model service) ---------------------------------------------------------------
    C("ranges_unsorted", "model.Generate", lambda c: mutate(c.two, _swap_items), INVALID,
      "prompt.items[1].placeholder.offset"),
    C("ranges_overlapping", "model.Generate", lambda c: mutate(c.two, _overlap), INVALID,
      "prompt.items[1].placeholder.offset"),
    C("range_past_the_end", "model.Generate",
      lambda c: mutate(c.one, lambda p: _set(p.items[0].placeholder, length=len(p.token_ids) + 1)), INVALID,
      "prompt.items[0].placeholder.length"),
    C("range_offset_outside", "model.Generate",
      lambda c: mutate(c.one, lambda p: _set(p.items[0].placeholder, offset=len(p.token_ids))), INVALID,
      "prompt.items[0].placeholder.offset"),
    C("range_length_zero", "model.Generate", lambda c: mutate(c.one, lambda p: _set(p.items[0].placeholder, length=0)),
      INVALID, "prompt.items[0].placeholder.length"),
    C("is_embed_length_mismatch", "model.Generate",
      lambda c: mutate(c.one, lambda p: _replace_list(p.items[0].placeholder.is_embed, [True] * 3)), INVALID,
      "prompt.items[0].placeholder.is_embed"),
    C("is_embed_marks_nothing", "model.Generate",
      lambda c: mutate(c.one, lambda p: _replace_list(
          p.items[0].placeholder.is_embed, [False] * p.items[0].placeholder.length)),
      INVALID, "prompt.items[0].placeholder.is_embed"),
    C("text_token_at_embed_position", "model.Generate", lambda c: mutate(c.one, _text_in_range), INVALID,
      lambda r: _fourth_embed(r)),
    C("embed_count_wrong", "model.Generate", lambda c: mutate(c.one, _shorter_range), INVALID,
      "prompt.items[0].placeholder.length"),
    C("image_token_outside_every_range", "model.Generate",
      lambda c: mutate(c.one, lambda p: _stray_image_token(p, c.image_token_id)), INVALID,
      lambda r: _last_token(r)),
    C("item_modality_not_served", "model.Generate",
      lambda c: mutate(c.one, lambda p: _set(p.items[0], modality=mm_pb.MODALITY_VIDEO)), INVALID,
      "prompt.items[0].modality"),
    C("item_modality_unspecified", "model.Generate",
      lambda c: mutate(c.one, lambda p: _set(p.items[0], modality=mm_pb.MODALITY_UNSPECIFIED)), INVALID,
      "prompt.items[0].modality"),
    # -- prompt tokens (model service) --------------------------------------------------------
    C("model_token_ids_empty", "model.Generate",
      lambda c: mutate(c.one, lambda p: (p.ClearField("token_ids"), p.ClearField("items"))), INVALID,
      "prompt.token_ids"),
    C("model_token_id_out_of_vocab", "model.Generate",
      lambda c: mutate(c.one, lambda p: p.token_ids.append(c.info.vocab_size + 7)), INVALID,
      lambda r: _last_token(r)),
    C("model_prompt_too_long", "model.Generate",
      lambda c: mutate(c.one, lambda p: p.token_ids.extend([5] * c.info.max_model_len)), INVALID,
      "prompt.token_ids", "PROMPT_TOO_LONG"),
    C("model_too_many_stop_strings", "model.Generate",
      lambda c: model_req(c.one, gen_pb.SamplingParams(max_tokens=1, stop=["a", "b", "c", "d", "e"])), INVALID,
      "sampling.stop"),
    C("model_max_tokens_uint32_max", "model.Generate",
      lambda c: model_req(c.one, gen_pb.SamplingParams(max_tokens=(1 << 32) - 1)), INVALID,
      "sampling.max_tokens", "PROMPT_TOO_LONG"),
    C("model_top_p_negative", "model.Generate", lambda c: model_req(c.one, gen_pb.SamplingParams(top_p=-0.1)),
      INVALID, "sampling.top_p"),
    # -- fingerprints and hashes (model service) ----------------------------------------------
    C("fingerprint_other_model", "model.Generate",
      lambda c: mutate(c.one, lambda p: _set(p.fingerprint, config_hash="0" * 64)), PRECONDITION,
      "prompt.fingerprint", "MODEL_MISMATCH"),
    C("fingerprint_other_feature_dtype", "model.Generate",
      lambda c: mutate(c.one, lambda p: _set(p.fingerprint, feature_dtype="bfloat16")), PRECONDITION,
      "prompt.fingerprint", "MODEL_MISMATCH"),
    C("fingerprint_missing", "model.Generate", lambda c: mutate(c.one, lambda p: p.ClearField("fingerprint")),
      PRECONDITION, "prompt.fingerprint", "MODEL_MISMATCH"),
    C("hash_unknown", "model.Generate",
      lambda c: mutate(c.one, lambda p: (_set(p.items[0], hash="f" * 64), p.items[0].ClearField("fields"))),
      PRECONDITION, "prompt.items", "MISSING_FEATURES"),
    C("hash_forged", "model.Generate", lambda c: mutate(c.one, lambda p: _forged(p, c.other_item)), INVALID,
      "prompt.items[0].hash"),
    C("hash_missing", "model.Generate", lambda c: mutate(c.one, lambda p: _set(p.items[0], hash="")), INVALID,
      "prompt.items[0].hash"),
    C("hash_invalid_utf8", "model.Generate", _invalid_utf8_hash, INVALID, "prompt.items[0].hash"),
    # -- the OpenAI HTTP front door (same gateway) --------------------------------------------
    C("http_remote_image_url", "http.chat", lambda c: _chat_http(_image_part("http://example.com/cat.png")), 400,
      "messages[0].content[0].image_url.url", "INVALID_ARGUMENT"),
    C("http_file_image_url", "http.chat", lambda c: _chat_http(_image_part("file:///etc/passwd")), 400,
      "messages[0].content[0].image_url.url", "INVALID_ARGUMENT"),
    C("http_image_part_without_url", "http.chat",
      lambda c: _chat_http({"type": "image_url", "image_url": {}}, {"type": "text", "text": "What?"}), 400,
      "messages[0].content[0].image_url.url", "INVALID_ARGUMENT"),
    C("http_image_part_empty_data", "http.chat",
      lambda c: _chat_http(_image_part("data:image/png;base64,"), {"type": "text", "text": "What?"}), 400,
      "messages[0].content[0]", "INVALID_MEDIA"),
    C("http_corrupt_image", "http.chat",
      lambda c: _chat_http(_image_part(data_url(b"\x89PNG\r\n\x1a\n" + b"\x13" * 200))), 400,
      "messages[0].content[0]", "INVALID_MEDIA"),
    C("http_decompression_bomb", "http.chat", lambda c: _chat_http(_image_part(data_url(c.sample("bomb", bomb_png)))),
      400, "messages[0].content[0]", "INVALID_MEDIA"),
    C("http_too_many_images", "http.chat",
      lambda c: _chat_http(*[_image_part(data_url(png(3)))] * (GW_MAX_IMAGES + 1)), 413, "messages",
      "LIMIT_EXCEEDED"),
    C("http_unknown_role", "http.chat",
      lambda c: {"messages": [{"role": "wizard", "content": "Hi"}], "max_tokens": 2}, 400, "messages[0].role",
      "INVALID_ARGUMENT"),
    C("http_unknown_part_type", "http.chat",
      lambda c: _chat_http({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}), 400,
      "messages[0].content[0].type", "INVALID_ARGUMENT"),
    C("http_lone_surrogate_text", "http.raw_chat",
      lambda c: b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi \\ud800"}]}],'
                b' "max_tokens": 2}',
      400, "messages[0].content[0].text", "INVALID_ARGUMENT"),
    C("http_invalid_utf8_body", "http.raw_chat",
      lambda c: b'{"messages": [{"role": "user", "content": "caf\xc3 \xff"}], "max_tokens": 2}', 400, None,
      "INVALID_ARGUMENT", words="utf-8"),
    C("http_empty_completion_prompt", "http.completions", lambda c: {"prompt": "", "max_tokens": 2}, 400, "prompt",
      "INVALID_ARGUMENT"),
    C("http_token_out_of_vocab", "http.completions",
      lambda c: {"prompt": [5, c.info.vocab_size + 100], "max_tokens": 2}, 400, "prompt", "INVALID_ARGUMENT"),
    C("http_temperature_negative", "http.chat", lambda c: _text_http(temperature=-1.0), 400, "temperature",
      "INVALID_ARGUMENT"),
    C("http_top_p_above_one", "http.chat", lambda c: _text_http(top_p=1.01), 400, "top_p", "INVALID_ARGUMENT"),
    C("http_max_tokens_zero", "http.chat", lambda c: _text_http(max_tokens=0), 400, "max_tokens",
      "INVALID_ARGUMENT"),
    C("http_max_tokens_negative", "http.completions", lambda c: {"prompt": "Hi", "max_tokens": -5}, 400,
      "max_tokens", "INVALID_ARGUMENT"),
    C("http_max_tokens_over_context", "http.chat", lambda c: _text_http(max_tokens=c.info.max_model_len), 400,
      "max_tokens", "PROMPT_TOO_LONG"),
    C("http_too_many_stop_strings", "http.chat", lambda c: _text_http(stop=[f"s{i}" for i in range(5)]), 400,
      "stop", "INVALID_ARGUMENT"),
    C("http_body_too_large", "http.raw_chat", lambda c: b" " * (_http_body_limit() + 1), 413, None,
      "LIMIT_EXCEEDED", words="exceeds"),
]


def _params() -> list:
    out = []
    for case in CASES:
        marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
        out.append(pytest.param(case, id=case.name, marks=marks))
    return out


async def test_corpus_is_large_and_distinct() -> None:
    names = [c.name for c in CASES]
    assert len(names) == len(set(names))
    assert len([c for c in CASES if not c.xfail]) >= 40, len(CASES)


# ---------------------------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------------------------


@dataclass
class Targets:
    gw: PreprocessorApp
    video: PreprocessorApp
    pipeline: Any  # tests.e2e.conftest.Pipeline
    ctx: Ctx

    def address(self, name: str) -> str:
        if name == "model":
            return self.pipeline.model_target
        app = self.gw if name == "gw" else self.video
        return f"127.0.0.1:{app.grpc.port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.gw.http.port}"



async def build_ctx(pre: PreprocessorClient, model_max_message: int) -> Ctx:
    def one_image(seed: int) -> types.PromptInput:
        return types.PromptInput(text=f"{IMAGE_TOKEN}\nDescribe.", media=(types.Media(IMAGE, png(seed)),))

    one = await pre.preprocess(one_image(41))
    two = await pre.preprocess(types.PromptInput(
        text=f"{IMAGE_TOKEN}\nFirst, then{IMAGE_TOKEN}\nsecond.",
        media=(types.Media(IMAGE, png(42)), types.Media(IMAGE, png(43))),
    ))
    other = await pre.preprocess(one_image(44))

    def pb(p: types.Prompt) -> mm_pb.PreprocessedPrompt:
        return mm_pb.PreprocessedPrompt.FromString(convert.encode_prompt(p).to_bytes())

    return Ctx(pb(one), pb(two), pb(other).items[0], await pre.model_info(), model_max_message)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def targets(llava_pipeline, e2e_models_root):
    gw = await PreprocessorApp.start(
        ProcessorConfig(
            model=str(llava_pipeline.model_dir), max_model_len=1024, dtype="float32",
            limit_mm_per_prompt={"image": GW_MAX_IMAGES},
            media_limits=MediaLimits(max_image_bytes=GW_MAX_IMAGE),
        ),
        PoolConfig(workers=1),
        ServerOptions(grace_s=1.0, max_message_bytes=GW_MAX_MESSAGE),
        model_targets=(llava_pipeline.model_target,),
        http_port=0,
        served_model_name=SERVED,
    )
    video = None
    try:
        video_dir = await asyncio.to_thread(build_tiny_model, "llava_onevision", e2e_models_root / "llava_onevision")
        video = await PreprocessorApp.start(
            ProcessorConfig(model=str(video_dir), dtype="float32"),
            PoolConfig(workers=0),
            ServerOptions(grace_s=1.0),
        )
        async with llava_pipeline.pre_client() as pre:
            ctx = await build_ctx(pre, llava_pipeline.model.grpc.options.max_message_bytes)
        yield Targets(gw, video, llava_pipeline, ctx)
    finally:
        if video is not None:
            await video.close()
        await gw.close()


@pytest.fixture(scope="module")
def engine_requests_before(targets) -> float:
    return engine_finished_requests(targets.pipeline)


# ---------------------------------------------------------------------------------------------
# Running a case
# ---------------------------------------------------------------------------------------------


async def grpc_error(address: str, method: str, payload: bytes, *, stream: bool) -> grpc.aio.AioRpcError | None:
    """Send `payload` as the request bytes; the error, or None if the call succeeded."""
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        try:
            if stream:
                async for _ in channel.unary_stream(method)(payload, timeout=DEADLINE_S):
                    pass
            else:
                await channel.unary_unary(method)(payload, timeout=DEADLINE_S)
        except grpc.aio.AioRpcError as err:
            return err
    return None


def _expected_field(case: Case, request: Any) -> str | None:
    return case.field(request) if callable(case.field) else case.field


def _last_token(request: model_pb2.GenerateRequest) -> str:
    return f"prompt.token_ids[{len(request.prompt.token_ids) - 1}]"


def _fourth_embed(request: model_pb2.GenerateRequest) -> str:
    return f"prompt.token_ids[{request.prompt.items[0].placeholder.offset + 3}]"


async def run_case(t: Targets, case: Case) -> None:
    request = case.build(t.ctx)
    if case.target.startswith("http."):
        await _run_http(t, case, request)
        return
    name, method, stream = GRPC_TARGETS[case.target]
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    err = await grpc_error(t.address(name), method, payload, stream=stream)
    assert err is not None, f"{case.name}: accepted"
    exc = upstream_error(err)
    want = _expected_field(case, request)
    assert (err.code(), exc.upstream_field or None) == (case.code, want), (err.code(), err.details())
    if want is not None:
        assert want in err.details(), err.details()
    if case.reason is not None:
        assert exc.reason == case.reason, (exc.reason, err.details())
    assert case.words.lower() in err.details().lower(), err.details()


async def _run_http(t: Targets, case: Case, request: Any) -> None:
    route = "/v1/completions" if case.target == "http.completions" else "/v1/chat/completions"
    async with httpx.AsyncClient(base_url=t.http_base, timeout=DEADLINE_S) as http:
        if isinstance(request, bytes):
            resp = await http.post(route, content=request, headers={"content-type": "application/json"})
        else:
            resp = await http.post(route, json={"model": SERVED, **request})
    assert resp.status_code == case.code, resp.text
    err = resp.json()["error"]
    assert (err["param"], err["code"]) == (case.field, case.code), err
    if case.reason is not None:
        assert err["type"] == case.reason, err
    assert case.words.lower() in err["message"].lower(), err


@pytest.mark.parametrize("case", _params())
async def test_bad_input_is_refused(targets, engine_requests_before, case: Case) -> None:
    await asyncio.wait_for(run_case(targets, case), DEADLINE_S + 10)


# ---------------------------------------------------------------------------------------------
# Afterwards
# ---------------------------------------------------------------------------------------------


async def _serving(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return resp.status


async def test_after_the_corpus_every_service_serves_and_answers_exactly(targets, engine_requests_before) -> None:
    t = targets
    for name in ("model", "gw", "video"):
        assert await _serving(t.address(name)) == health_pb2.HealthCheckResponse.SERVING, name
    assert await _serving(t.pipeline.pre_target) == health_pb2.HealthCheckResponse.SERVING
    gw_metrics = t.gw.grpc.metrics.registry
    assert gw_metrics.get_sample_value("vlm_preprocess_worker_restarts_total") == 0
    assert gw_metrics.get_sample_value("vlm_preprocess_workers_ready") == 1
    # Not one corpus request reached the engine.
    assert engine_finished_requests(t.pipeline) == engine_requests_before

    greedy = types.Sampling(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompt_in = types.PromptInput(text=f"{IMAGE_TOKEN}\nWhat is in the picture?", media=(types.Media(IMAGE, png(45)),))
    async with PreprocessorClient(t.address("gw")) as gw, ModelClient(t.address("model")) as model:
        prompt = await gw.preprocess(prompt_in)
        via_gateway = [tok async for chunk in gw.generate(prompt_in, greedy) for tok in chunk.token_ids]
        direct = [tok async for chunk in model.generate(prompt, greedy) for tok in chunk.token_ids]
    async with httpx.AsyncClient(base_url=t.http_base, timeout=DEADLINE_S) as http:
        resp = await http.post("/v1/completions", json={
            "model": SERVED, "prompt": "Hello there.", "max_tokens": 4, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True,
        })
    assert resp.status_code == 200, resp.text
    expected = await asyncio.to_thread(hf_greedy, str(t.pipeline.model_dir), prompt, 8)
    assert via_gateway == expected and direct == expected
