"""Decoding of request media (images, videos) under limits, with vLLM's own media loaders.

Images are decoded as vLLM's `ImageMediaIO` decodes them (Pillow, with vLLM's format allow-list,
EXIF orientation applied, conversion to RGB with alpha composited on white; one copy fewer, see
`MediaDecoder.decode_image`) and videos with vLLM's
`VideoMediaIO` (OpenCV by default, frame-sampled by the loader vLLM's chat path picks for the
model's video processor). Both return vLLM's `MediaWithBytes`, so vLLM's hasher keys items by
their encoded bytes exactly as in vLLM's OpenAI server.

Before anything is decoded, the bytes are checked against `MediaLimits`: size, format (sniffed
from the bytes, not trusted from the MIME type), image pixel count read from the header (so a
decompression bomb is rejected before Pillow allocates it), video frame size and frame count read
from the container. Every failure is an `InvalidMedia` naming the request field at fault.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vlm.errors import InvalidArgument, InvalidMedia
from vlm.types import Media, Modality, PromptInput

logger = logging.getLogger(__name__)

MiB = 1 << 20

#: Image formats accepted by default (Pillow format names).
DEFAULT_IMAGE_FORMATS: frozenset[str] = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
#: Video containers accepted by default (sniffed from the leading bytes).
DEFAULT_VIDEO_CONTAINERS: frozenset[str] = frozenset({"mp4", "webm", "mkv", "avi"})


@dataclass(frozen=True)
class MediaLimits:
    """Bounds checked on every media item before (and right after) decoding."""

    max_image_bytes: int = 20 * MiB
    #: width * height read from the image header; larger images are rejected undecoded.
    max_image_pixels: int = 40_000_000
    image_formats: frozenset[str] = DEFAULT_IMAGE_FORMATS
    #: Must fit in one request message (the preprocessor's --max-message-bytes, 32 MiB).
    max_video_bytes: int = 30 * MiB
    #: width * height of one video frame (8_294_400 = 3840 x 2160).
    max_video_frame_pixels: int = 8_294_400
    #: Frames in the container (before sampling); bounds the decoder's work.
    max_video_frames: int = 108_000
    #: Bytes of the sampled RGB frames (num_frames * height * width * 3).
    max_video_decoded_bytes: int = 1 << 30
    video_containers: frozenset[str] = DEFAULT_VIDEO_CONTAINERS

    def check_bytes(self, modality: Modality, size: int, field_path: str) -> None:
        """Empty or over the byte limit: `InvalidMedia`. Checked at admission, before a request
        waits for a worker (an oversize item costs no queue slot, pipe copy or worker), and
        again by the decoder."""
        what = modality.value
        if size == 0:
            raise InvalidMedia(f"empty {what}", field=field_path)
        limit = self.max_video_bytes if modality is Modality.VIDEO else self.max_image_bytes
        if size > limit:
            raise InvalidMedia(
                f"{what} of {size} bytes exceeds the limit of {limit} bytes", field=field_path
            )


def media_with_paths(prompt: PromptInput) -> Iterator[tuple[Media, str]]:
    """Every media item of a prompt with its request path ("media[2]",
    "prompt.messages[0].content[1].media")."""
    for i, m in enumerate(prompt.media):
        yield m, f"media[{i}]"
    for i, msg in enumerate(prompt.messages or ()):
        for j, part in enumerate(msg.content):
            if part.media is not None:
                yield part.media, f"prompt.messages[{i}].content[{j}].media"


def sniff_video_container(data: bytes) -> str | None:
    """The container of `data` from its magic bytes: mp4 (also MOV/3GP), webm, mkv, avi; or None."""
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska or WebM
        head = data[:4096]
        return "webm" if b"webm" in head else "mkv"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


@dataclass
class MediaDecoder:
    """Decodes `Media` into the objects vLLM's multimodal processor takes (per modality).

    `image_io_kwargs` / `video_io_kwargs` are the model config's `media_io_kwargs` for the
    modality (vLLM's `--media-io-kwargs`); `video_backend` is the video loader vLLM's chat path
    selects for the model's video processor (None: `VLLM_VIDEO_LOADER_BACKEND`, i.e. opencv).
    """

    limits: MediaLimits = field(default_factory=MediaLimits)
    image_io_kwargs: Mapping[str, Any] = field(default_factory=dict)
    video_io_kwargs: Mapping[str, Any] = field(default_factory=dict)
    video_backend: str | None = None

    def decode(
        self,
        media: Media,
        field_path: str,
        *,
        video_io_overrides: Mapping[str, Any] | None = None,
    ) -> Any:
        """Decode one item; `field_path` is the request path of the `Media` (e.g. "media[1]")."""
        self._check_mime(media, field_path)
        if media.modality == Modality.IMAGE:
            return self.decode_image(media.data, f"{field_path}.data")
        if media.modality == Modality.VIDEO:
            return self.decode_video(
                media.data, f"{field_path}.data", video_io_overrides=video_io_overrides
            )
        raise InvalidArgument(
            f"modality {media.modality.value!r} is not supported by this preprocessor",
            field=f"{field_path}.modality",
        )

    @staticmethod
    def _check_mime(media: Media, field_path: str) -> None:
        mime = (media.mime_type or "").strip().lower()
        if not mime:
            return
        major = mime.split("/", 1)[0]
        if major != media.modality.value:
            raise InvalidMedia(
                f"MIME type {media.mime_type!r} does not match modality {media.modality.value!r}",
                field=f"{field_path}.mime_type",
            )

    # -- images ---------------------------------------------------------------------------

    def decode_image(self, data: bytes, field_path: str) -> Any:
        """Decode one image the way vLLM's `ImageMediaIO.load_bytes` does, in one pass.

        The result is the same `MediaWithBytes` (same pixels, mode, size, original bytes and
        io config; `tests/unit/preprocessor/test_media.py` compares them), from vLLM's own
        pieces: its format allow-list, its pixel limit and `ImageMediaIO._convert_image_mode`.
        Two things differ, both only in cost. The image is opened once, and its header checked
        against `MediaLimits` before any pixel is decoded. And EXIF orientation is applied in
        place: vLLM's `normalize_image` calls `ImageOps.exif_transpose`, which returns a copy
        even when there is nothing to rotate, and that copy of freshly decoded pixels was
        about an eighth of a worker's CPU per 1024x768 JPEG.
        """
        from PIL import Image, ImageOps

        from vllm import envs
        from vllm.multimodal.media.base import MediaWithBytes
        from vllm.multimodal.media.image import ImageMediaIO

        limits = self.limits
        limits.check_bytes(Modality.IMAGE, len(data), field_path)
        try:
            image = Image.open(io.BytesIO(data), formats=self._image_formats)
        except Image.UnidentifiedImageError:
            raise InvalidMedia(
                "not an image in an accepted format (accepted: "
                + ", ".join(self._image_formats)
                + ")",
                field=field_path,
            ) from None
        except Exception as e:  # noqa: BLE001 - any parser failure is bad media
            raise InvalidMedia(f"cannot read the image header: {e}", field=field_path) from None
        fmt, (width, height) = image.format, image.size
        if width <= 0 or height <= 0:
            raise InvalidMedia(f"image has no pixels ({width}x{height})", field=field_path)
        max_pixels = limits.max_image_pixels
        if envs.VLLM_MAX_IMAGE_PIXELS > 0:
            max_pixels = min(max_pixels, envs.VLLM_MAX_IMAGE_PIXELS)
        if width * height > max_pixels:
            raise InvalidMedia(
                f"{fmt} image of {width}x{height} ({width * height} pixels) exceeds the limit of "
                f"{max_pixels} pixels",
                field=field_path,
            )
        try:
            io_ = ImageMediaIO(**dict(self.image_io_kwargs))
            # vLLM ignores a failing orientation (normalize_image); so do we.
            with contextlib.suppress(Exception):
                ImageOps.exif_transpose(image, in_place=True)
            image.load()
            converted = io_._convert_image_mode(image)
        except Exception as e:  # noqa: BLE001 - truncated/corrupt data, bombs, ...
            raise InvalidMedia(f"cannot decode the {fmt} image: {_reason(e)}", field=field_path) from None
        io_config = None
        if converted is not image:
            image.close()
            io_config = {
                "image_mode": io_.image_mode,
                "rgba_background_color": io_.rgba_background_color,
            }
        return MediaWithBytes(converted, data, io_config)

    @functools.cached_property
    def _image_formats(self) -> list[str]:
        """Pillow formats tried: the limits' formats that vLLM's allow-list also has."""
        from vllm.multimodal.image import ALLOWED_IMAGE_FORMATS

        return sorted(self.limits.image_formats & set(ALLOWED_IMAGE_FORMATS))

    # -- videos ---------------------------------------------------------------------------

    def video_kwargs(self, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Effective `VideoMediaIO` kwargs: config defaults merged with request overrides the
        way vLLM merges them, plus the model's video loader backend (as vLLM's chat path does)."""
        from vllm.multimodal.media.video import VideoMediaIO

        merged = VideoMediaIO.merge_kwargs(
            dict(self.video_io_kwargs), dict(overrides) if overrides else None
        )
        if "video_backend" not in merged and self.video_backend:
            merged["video_backend"] = self.video_backend
        return merged

    def decode_video(
        self, data: bytes, field_path: str, *, video_io_overrides: Mapping[str, Any] | None = None
    ) -> Any:
        from vllm.multimodal.media.image import ImageMediaIO
        from vllm.multimodal.media.video import VideoMediaIO

        limits = self.limits
        limits.check_bytes(Modality.VIDEO, len(data), field_path)
        container = sniff_video_container(data)
        if container is None or container not in limits.video_containers:
            raise InvalidMedia(
                "not a video in an accepted container (accepted: "
                + ", ".join(sorted(limits.video_containers))
                + ")",
                field=field_path,
            )
        kwargs = self.video_kwargs(video_io_overrides)
        if kwargs.get("backend", "opencv") == "opencv":
            self._probe_opencv(data, field_path, kwargs)
        try:
            image_io = ImageMediaIO(**dict(self.image_io_kwargs))
            decoded = VideoMediaIO(image_io, **kwargs).load_bytes(data)
        except Exception as e:  # noqa: BLE001 - demuxer/decoder failures are bad media
            raise InvalidMedia(f"cannot decode the video: {_reason(e)}", field=field_path) from None
        frames = decoded.media[0]
        if getattr(frames, "ndim", 0) != 4 or frames.shape[0] == 0:
            raise InvalidMedia("the video has no decodable frames", field=field_path)
        if frames.nbytes > limits.max_video_decoded_bytes:
            raise InvalidMedia(
                f"the sampled frames take {frames.nbytes} bytes, over the limit of "
                f"{limits.max_video_decoded_bytes}; request fewer frames",
                field=field_path,
            )
        return decoded

    def _probe_opencv(self, data: bytes, field_path: str, kwargs: Mapping[str, Any]) -> None:
        """Read frame size and count from the container with vLLM's own OpenCV opener."""
        import cv2

        from vllm.multimodal.video_decoders.opencv import OpenCVVideoBackendMixin

        limits = self.limits
        try:
            cap = OpenCVVideoBackendMixin.open_video_capture(data)
        except Exception as e:  # noqa: BLE001
            raise InvalidMedia(f"cannot open the video: {_reason(e)}", field=field_path) from None
        # No cap.release(): on a capture reading from a Python stream (BytesIO), OpenCV 5.0's
        # release() followed by the object's deallocation crashes the process (segfault in
        # the GC); vLLM never calls it either. Dropping the reference frees the capture.
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        del cap
        if width <= 0 or height <= 0 or frames <= 0:
            raise InvalidMedia(
                f"the video has no readable frames ({width}x{height}, {frames} frames)",
                field=field_path,
            )
        if width * height > limits.max_video_frame_pixels:
            raise InvalidMedia(
                f"video frames of {width}x{height} exceed the limit of "
                f"{limits.max_video_frame_pixels} pixels per frame",
                field=field_path,
            )
        if frames > limits.max_video_frames:
            raise InvalidMedia(
                f"video of {frames} frames exceeds the limit of {limits.max_video_frames} frames",
                field=field_path,
            )
        # vLLM's default (uniform) loader takes at most num_frames frames (VideoMediaIO's
        # default is 32). Model-specific loaders sample by their own rules (e.g. Qwen2-VL by
        # fps); for them only the check after decoding bounds the frames' memory.
        num_frames = kwargs.get("num_frames", 32)
        if isinstance(num_frames, int) and num_frames > 0 and kwargs.get("video_backend") in (None, "opencv"):
            expected = min(num_frames, frames) * width * height * 3
            if expected > limits.max_video_decoded_bytes:
                raise InvalidMedia(
                    f"sampling {min(num_frames, frames)} frames of {width}x{height} would take "
                    f"{expected} bytes, over the limit of {limits.max_video_decoded_bytes}",
                    field=field_path,
                )


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
