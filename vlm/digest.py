"""The content hash of a multimodal item: a BLAKE3 digest of exactly what reaches the model.

An item's hash keys the model service's feature store and vLLM's encoder and prefix caches. A
hash a client merely claims would let anyone who can reach the model service rewrite what
another user's image means (send B's features under A's hash, and every later request for A
gets B's answer). So the hash is not vLLM's hash of the raw media, which the model service
cannot check, but a digest of the item as it travels: modality, then per field (sorted by
name) its name, layout, flat dimension, keep-on-CPU flag, dtype, shape and little-endian
bytes. The preprocessor computes it once per item (`vlm.vllm_mm.items_from_engine_input`); the
model service recomputes it for every item that arrives with fields and refuses a mismatch, so
its caches only ever hold verified entries, and a hash-only item can only name one of those.

The placeholder range is not part of it: the same image at another offset is the same item.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from blake3 import blake3

from vlm.types import ItemField, Modality

_SCHEME = b"vlm-item-v1\0"


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def item_digest(modality: Modality, fields: Mapping[str, ItemField]) -> str:
    """64 hex digits identifying the item's features (see the module docstring)."""
    h = blake3(_SCHEME + modality.value.encode() + b"\0")
    for name in sorted(fields):
        f = fields[name]
        header = (
            f"{name}\0{f.layout.value}\0{f.flat_dim}\0{int(f.keep_on_cpu)}\0"
            f"{str(f.data.dtype).removeprefix('torch.')}\0{','.join(map(str, f.data.shape))}\0"
        )
        h.update(header.encode())
        h.update(_bytes(f.data))
    return h.hexdigest()
