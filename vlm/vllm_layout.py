"""Reference layouts: what vLLM's processor makes of a media item of a given size.

The model service receives features and a placeholder range and cannot see the media they came
from. For most models the fields still say the media's size (`vlm.profile.SizeSource`): then a
blank stand-in of that size, run through the same vLLM processor, gives the reference the item
must match — every field's shape, the small integer fields (sizes, tile counts) and the exact
placeholder (length and is_embed), all from vLLM's own prompt-update logic. A client that puts a
64x64 image's features into a 32x64 image's range is refused instead of decoded into wrong
tokens, and a shape the vision tower would fail on never reaches the engine core.

`size_of` reads the size from an item's fields; `reference` runs the processor;
`ReferenceCache` memoises references per (modality, size) (a bounded LRU: the sizes a
deployment sees repeat). Start-up uses the same `reference` to choose the size source
(`vlm.vllm_profile`), so the check is only ever on where it reproduces the probes exactly.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vlm.profile import SizeSource
from vlm.types import ItemField, Modality


@dataclass(frozen=True)
class MediaSize:
    width: int
    height: int
    frames: int = 1  # videos


@dataclass(frozen=True)
class Reference:
    """What vLLM's processor makes of one media item of a given size."""

    shapes: Mapping[str, tuple[int, ...]]
    #: Integer fields of at most 16 values (sizes, grids, tile counts), flattened.
    values: Mapping[str, tuple[int, ...]]
    length: int
    is_embed: tuple[bool, ...] | None

    def embed_count(self) -> int:
        return self.length if self.is_embed is None else sum(self.is_embed)


class SizeError(ValueError):
    """The fields do not give a usable size; `field` names the one at fault."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def size_of(modality: Modality, source: SizeSource, fields: Mapping[str, ItemField]) -> MediaSize:
    f = fields.get(source.field)
    if f is None:
        raise SizeError(f"field {source.field!r} is missing", source.field)
    data = f.data
    if source.kind == "hw_values":
        if data.dtype.is_floating_point or data.dtype == torch.bool or data.numel() != 2:
            raise SizeError("must hold two integers (height, width)", source.field)
        h, w = (int(v) for v in data.reshape(-1).tolist())
        return MediaSize(width=w, height=h)
    if data.dim() < 3:
        raise SizeError(f"rank {data.dim()} has no (height, width) dims", source.field)
    h, w = int(data.shape[-2]), int(data.shape[-1])
    frames = int(data.shape[0]) if modality is Modality.VIDEO else 1
    return MediaSize(width=w, height=h, frames=frames)


def process_one(
    processor: Any, modality: Modality, options: Any, seq_len: int,
    replace: Callable[[Any], Any] | None = None,
) -> tuple[Any, Mapping[str, Any]]:
    """vLLM's processor on one dummy item (vLLM's dummy-input builder with `options`; `replace`
    turns the builder's media into the one to use). Returns the media and the processor's
    output (`MultiModalInput`)."""
    from vllm.config.multimodal import MultiModalDummyOptions
    from vllm.multimodal.processing.context import TimingContext

    name = modality.value
    inputs = processor.get_dummy_inputs(seq_len, {name: 1}, MultiModalDummyOptions({name: options}))
    media = inputs.mm_data_items[name].get(0)
    if replace is not None:
        media = replace(media)
        inputs = dataclasses.replace(
            inputs, mm_data_items=processor.info.parse_mm_data({name: [media]}, validate=False)
        )
    return media, processor.apply(inputs, TimingContext(enabled=False))


def reference(processor: Any, modality: Modality, size: MediaSize, seq_len: int) -> Reference:
    """Run vLLM's processor on a blank stand-in of `size` (one item, no text)."""
    from vllm.config.multimodal import ImageDummyOptions, VideoDummyOptions

    from vlm.vllm_mm import item_fields, placeholder_from_range

    if modality is Modality.IMAGE:
        opts: Any = ImageDummyOptions(count=1, width=size.width, height=size.height)
    elif modality is Modality.VIDEO:
        opts = VideoDummyOptions(
            count=1, num_frames=size.frames, width=size.width, height=size.height
        )
    else:
        raise ValueError(f"no stand-in for {modality.value}")
    # vLLM's dummy builder may shrink its media; put in a stand-in of exactly the size.
    _, out = process_one(processor, modality, opts, seq_len,
                         replace=lambda like: _stand_in(modality, size, like))
    fields = item_fields(out["mm_kwargs"][modality.value][0], copy=False)
    ph = placeholder_from_range(out["mm_placeholders"][modality.value][0])
    return Reference(
        shapes={n: tuple(f.data.shape) for n, f in fields.items()},
        values=small_int_values(fields),
        length=ph.length,
        is_embed=ph.is_embed,
    )


def small_int_values(fields: Mapping[str, ItemField]) -> dict[str, tuple[int, ...]]:
    return {
        n: tuple(int(v) for v in f.data.reshape(-1).tolist())
        for n, f in fields.items()
        if not f.data.dtype.is_floating_point and f.data.dtype != torch.bool
        and f.data.numel() <= 16
    }


def _stand_in(modality: Modality, size: MediaSize, like: Any) -> Any:
    import numpy as np

    if modality is Modality.IMAGE:
        from PIL import Image

        return Image.new("RGB", (size.width, size.height))
    frames = np.zeros((size.frames, size.height, size.width, 3), dtype=np.uint8)
    if isinstance(like, tuple) and len(like) == 2 and isinstance(like[1], Mapping):
        meta = dict(like[1])
        meta.update(total_num_frames=size.frames, frames_indices=list(range(size.frames)))
        return frames, meta
    return frames


class ReferenceCache:
    """`reference` memoised per (modality, size): a thread-safe LRU of `capacity` entries."""

    def __init__(self, processor: Any, seq_len: int, capacity: int = 1024) -> None:
        self._processor = processor
        self._seq_len = seq_len
        self._capacity = capacity
        self._entries: OrderedDict[tuple[Modality, MediaSize], Reference | Exception] = OrderedDict()
        self._lock = threading.Lock()  # the entries (held briefly)
        # One miss at a time: the processor is not thread-safe, and it bounds the CPU a stream
        # of never-seen sizes can take; hits never wait for a miss.
        self._processor_lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _get(self, key: tuple[Modality, MediaSize]) -> Reference | Exception | None:
        with self._lock:
            ref = self._entries.get(key)
            if ref is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return ref

    def cached(self, modality: Modality, size: MediaSize) -> bool:
        with self._lock:
            return (modality, size) in self._entries

    def __call__(self, modality: Modality, size: MediaSize) -> Reference:
        """The reference for one size. A miss costs one processor run on a blank media of that
        size (LLaVA-OneVision on 2 CPU cores: about 90 ms at 640x480, 150 ms at 2000x1500,
        1.8 s at 6000x6000; a 64-frame video 240 ms); the model service makes misses on a
        thread before it validates (`Engine`). A size the processor refuses is remembered as
        its exception."""
        key = (modality, size)
        ref = self._get(key)
        if ref is None:
            with self._processor_lock:
                ref = self._get(key)  # made while this thread waited?
                if ref is None:
                    try:
                        ref = reference(self._processor, modality, size, self._seq_len)
                    except Exception as e:  # noqa: BLE001 - the caller translates it
                        ref = e.with_traceback(None)
                    with self._lock:
                        self.misses += 1
                        self._entries[key] = ref
                        if len(self._entries) > self._capacity:
                            self._entries.popitem(last=False)
        if isinstance(ref, Exception):
            raise ref
        return ref
