"""Media decoding under limits (vLLM's media loaders behind our checks)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from preprocessor_svc.media import MediaDecoder, MediaLimits, sniff_video_container
from tests.unit.preprocessor.samples import blank_image_bytes, image_bytes, rgb_array, video_bytes
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


def _with_alpha(mode: str, fmt: str) -> bytes:
    alpha = np.arange(0, 240, 4, dtype=np.uint8).reshape(6, 10, 1)  # a gradient, 0 to 236
    rgba = Image.fromarray(np.concatenate([rgb_array(10, 6, seed=3), alpha], axis=2), "RGBA")
    img = rgba if mode == "RGBA" else rgba.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _oriented_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes(24, 10, seed=orientation, fmt="JPEG", exif=exif.tobytes())


def _palette_with_transparency() -> bytes:
    img = Image.fromarray(rgb_array(9, 7, seed=4)).convert("P")
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=3)
    return buf.getvalue()


def _multi_frame(fmt: str) -> bytes:
    frames = [Image.fromarray(rgb_array(10, 8, seed=s)) for s in (11, 12, 13)]
    if fmt == "GIF":
        frames = [f.convert("P") for f in frames]
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:])
    return buf.getvalue()


PARITY_IMAGES = {
    **{f"jpeg-orientation-{o}": (lambda o=o: _oriented_jpeg(o)) for o in range(1, 9)},
    "png-rgb": lambda: image_bytes(13, 9, seed=1),
    "png-rgba": lambda: _with_alpha("RGBA", "PNG"),
    "png-la": lambda: _with_alpha("LA", "PNG"),
    "png-l": lambda: image_bytes(13, 9, seed=2, mode="L"),
    "png-i16": lambda: image_bytes(13, 9, seed=2, mode="I;16"),
    "png-palette-transparency": _palette_with_transparency,
    "gif": lambda: image_bytes(11, 5, mode="P", fmt="GIF"),
    "gif-animated": lambda: _multi_frame("GIF"),
    "tiff-multipage": lambda: _multi_frame("TIFF"),
    "jpeg-cmyk": lambda: image_bytes(12, 8, seed=6, mode="CMYK", fmt="JPEG"),
    "webp-rgba": lambda: _with_alpha("RGBA", "WEBP"),
    "tiff": lambda: image_bytes(12, 8, seed=7, fmt="TIFF"),
    "bmp": lambda: image_bytes(12, 8, seed=8, fmt="BMP"),
}
IO_KWARGS = {
    "default": {},
    "black-background": {"rgba_background_color": [0, 0, 0]},
    "keep-mode": {"image_mode": None},
    "to-L": {"image_mode": "L"},
}


@pytest.mark.parametrize("io_kwargs", IO_KWARGS.values(), ids=IO_KWARGS.keys())
@pytest.mark.parametrize("make", PARITY_IMAGES.values(), ids=PARITY_IMAGES.keys())
def test_image_decode_matches_vllm_media_io(make, io_kwargs):
    """Our one-pass decode gives what vLLM's `ImageMediaIO.load_bytes` gives: pixels, mode,
    size, the bytes vLLM hashes and the io config that joins them in the hash."""
    from vllm.multimodal.media.image import ImageMediaIO

    data = make()
    ours = decode(data, decoder=MediaDecoder(image_io_kwargs=io_kwargs))
    theirs = ImageMediaIO(**io_kwargs).load_bytes(data)
    assert type(ours) is type(theirs)
    assert (ours.media.mode, ours.media.size) == (theirs.media.mode, theirs.media.size)
    assert np.array_equal(np.asarray(ours.media), np.asarray(theirs.media))
    assert ours.original_bytes == theirs.original_bytes == data
    assert ours.io_config == theirs.io_config


def test_invalid_io_kwargs_are_bad_media_not_a_crash():
    err = bad(image_bytes(8, 8), decoder=MediaDecoder(image_io_kwargs={"rgba_background_color": [1, 2]}))
    assert "rgba_background_color" in err.message


def test_vllm_pixel_limit_is_kept(monkeypatch):
    monkeypatch.setenv("VLLM_MAX_IMAGE_PIXELS", "100")
    assert "100 pixels" in bad(image_bytes(11, 10)).message
    assert decode(image_bytes(10, 10)).media.size == (10, 10)


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
