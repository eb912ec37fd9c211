"""Media decoding under limits (vLLM's media loaders behind our checks)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from preprocessor_svc.media import MediaDecoder, MediaLimits, sniff_video_container
from tests.unit.preprocessor.samples import blank_image_bytes, image_bytes, video_bytes
from vlm.errors import InvalidArgument, InvalidMedia
from vlm.types import Media, Modality

FIELD = "media[0]"


def decode(data: bytes, modality=Modality.IMAGE, mime: str = "", decoder: MediaDecoder | None = None, **kw):
    return (decoder or MediaDecoder()).decode(Media(modality, data, mime), FIELD, **kw)


def bad(data: bytes, field: str = "media[0].data", **kw) -> InvalidMedia:
    with pytest.raises(InvalidMedia) as info:
        decode(data, **kw)
    assert info.value.field == field
    return info.value


def test_png_decodes_to_rgb_with_original_bytes():
    data = image_bytes(30, 20, seed=5)
    out = decode(data)
    assert out.media.mode == "RGB" and out.media.size == (30, 20)
    assert out.original_bytes == data  # vLLM hashes these bytes
    assert np.array_equal(np.asarray(out.media), np.asarray(Image.open(io.BytesIO(data))))


def test_rgba_and_palette_become_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    buf = io.BytesIO()
    rgba.save(buf, "PNG")
    out = decode(buf.getvalue())
    assert out.media.mode == "RGB"
    assert out.media.getpixel((0, 0)) == (255, 255, 255)  # composited on white (vLLM's default)
    assert decode(image_bytes(8, 8, mode="P", fmt="GIF")).media.mode == "RGB"


def test_exif_orientation_applied():
    img = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    assert decode(buf.getvalue()).media.size == (20, 40)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_default_formats(fmt):
    assert decode(image_bytes(12, 10, fmt=fmt)).media.size == (12, 10)


def test_image_errors():
    assert "empty" in bad(b"").message
    assert "accepted format" in bad(b"not an image at all").message
    assert "accepted format" in bad(image_bytes(8, 8, fmt="PPM")).message
    png = image_bytes(64, 64, seed=1)
    assert "decode" in bad(png[: len(png) // 2]).message  # truncated
    limits = MediaLimits(max_image_bytes=100)
    assert "bytes" in bad(png, decoder=MediaDecoder(limits)).message
    only_png = MediaLimits(image_formats=frozenset({"PNG"}))
    bad(image_bytes(8, 8, fmt="JPEG"), decoder=MediaDecoder(only_png))


def test_decompression_bomb_rejected_from_header():
    bomb = blank_image_bytes(20000, 20000)  # 400 Mpixel: Pillow itself would refuse at 178M
    assert len(bomb) < 100_000
    assert "pixels" in bad(bomb).message
    small_limit = MediaDecoder(MediaLimits(max_image_pixels=100))
    assert "pixels" in bad(image_bytes(11, 10), decoder=small_limit).message
    decode(image_bytes(10, 10), decoder=small_limit)


def test_mime_type_checked_against_modality():
    bad(image_bytes(8, 8), field="media[0].mime_type", mime="video/mp4")
    decode(image_bytes(8, 8), mime="image/png")
    decode(image_bytes(8, 8), mime="image/jpeg")  # the bytes decide the format, not the MIME type


def test_audio_not_supported():
    with pytest.raises(InvalidArgument) as info:
        decode(b"RIFF....WAVE", modality=Modality.AUDIO)
    assert info.value.field == "media[0].modality"


def test_video_decodes_all_frames_by_default():
    data = video_bytes(frames=8, width=64, height=48, fps=4.0)
    out = decode(data, modality=Modality.VIDEO)
    frames, meta = out.media
    assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
    assert meta["total_num_frames"] == 8 and meta["fps"] == pytest.approx(4.0)
    assert out.original_bytes == data


def test_video_num_frames_override():
    data = video_bytes(frames=8)
    frames, meta = decode(data, modality=Modality.VIDEO, video_io_overrides={"num_frames": 3}).media
    assert frames.shape[0] == 3
    assert meta["frames_indices"] == [0, 3, 7]


def test_video_errors():
    data = video_bytes(frames=8)
    vid = dict(modality=Modality.VIDEO)
    assert "empty" in bad(b"", **vid).message
    assert "container" in bad(b"\x00" * 100, **vid).message
    assert "container" in bad(image_bytes(8, 8), **vid).message
    bad(data[: len(data) // 3], **vid)  # truncated
    bad(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 300, **vid)  # header only
    tight = MediaDecoder(MediaLimits(max_video_frame_pixels=100))
    assert "per frame" in bad(data, decoder=tight, **vid).message
    few_bytes = MediaDecoder(MediaLimits(max_video_decoded_bytes=64 * 64 * 3 * 4))
    assert "bytes" in bad(data, decoder=few_bytes, **vid).message
    decode(data, decoder=few_bytes, video_io_overrides={"num_frames": 4}, **vid)
    assert "bytes" in bad(data, decoder=MediaDecoder(MediaLimits(max_video_bytes=10)), **vid).message


def test_sniff_video_container():
    assert sniff_video_container(video_bytes(frames=2)) == "mp4"
    assert sniff_video_container(b"\x1a\x45\xdf\xa3\x01\x00\x00\x00\x42\x82\x84webm") == "webm"
    assert sniff_video_container(b"\x1a\x45\xdf\xa3\x01\x00\x00\x00\x42\x82\x88matroska") == "mkv"
    assert sniff_video_container(b"RIFF\x00\x00\x00\x00AVI LIST") == "avi"
    assert sniff_video_container(b"GIF89a") is None
