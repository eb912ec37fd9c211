"""Deterministic media bytes for the preprocessor tests (images via Pillow, videos via OpenCV)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def rgb_array(width: int, height: int, seed: int = 0) -> np.ndarray:
    return (np.random.RandomState(seed).rand(height, width, 3) * 255).astype(np.uint8)


def image_bytes(width: int = 64, height: int = 48, seed: int = 0, fmt: str = "PNG", mode: str = "RGB", **save) -> bytes:
    img = Image.fromarray(rgb_array(width, height, seed))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def video_bytes(frames: int = 8, width: int = 64, height: int = 64, fps: float = 4.0, seed: int = 0) -> bytes:
    """A small MP4 (mp4v) written with cv2.VideoWriter: each frame differs."""
    import cv2

    rng = np.random.RandomState(seed)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
        assert writer.isOpened(), "OpenCV cannot write MP4 here"
        base = (rng.rand(height, width, 3) * 255).astype(np.uint8)
        for i in range(frames):
            frame = np.roll(base, shift=i * 4, axis=1)
            frame[: 4 * (i + 1), :, 1] = 255
            writer.write(frame)
        writer.release()
        return Path(path).read_bytes()


def blank_image_bytes(width: int, height: int, mode: str = "1", fmt: str = "PNG") -> bytes:
    """A uniform image; huge dimensions stay tiny on the wire (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, fmt)
    return buf.getvalue()
