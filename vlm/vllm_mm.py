"""vLLM's multimodal engine-input structures ⇄ domain items, shared by both services.

vLLM's renderer hands its engine a `MultiModalInput`: per modality, `mm_kwargs` (one
`MultiModalKwargsItem` per item, each field a `MultiModalFieldElem(data, field)`), `mm_hashes` and
`mm_placeholders` (`PlaceholderRange(offset, length, is_embed)`). The preprocessor turns that into
domain `Item`s (`items_from_engine_input`); the model service rebuilds vLLM's per-item fields and
ranges from them (`vllm_field`, `placeholder_range`).

Per-item data: vLLM's flat fields still list the slices of every item in the processed batch,
but each element's `data` is already that item's own slice, so only the concatenation dim
travels; on the way back the field gets one slice covering the item's tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from vlm.digest import item_digest
from vlm.errors import Internal
from vlm.types import FieldLayout, Item, ItemField, Modality, Placeholder

# --------------------------------------------------------------------------------- vLLM → domain


def field_layout(field: Any) -> tuple[FieldLayout, int]:
    """A vLLM `BaseMultiModalField` → (layout, flat dim)."""
    from vllm.multimodal.inputs import (
        MultiModalBatchedField,
        MultiModalFlatField,
        MultiModalSharedField,
    )

    if isinstance(field, MultiModalBatchedField):
        return FieldLayout.BATCHED, 0
    if isinstance(field, MultiModalFlatField):
        return FieldLayout.FLAT, int(field.dim)
    if isinstance(field, MultiModalSharedField):
        return FieldLayout.SHARED, 0
    raise Internal(f"unknown vLLM field type {type(field).__name__}")


def item_fields(kwargs_item: Mapping[str, Any], *, copy: bool = True) -> dict[str, ItemField]:
    """One `MultiModalKwargsItem` → {name: ItemField}. With `copy`, each an own compact copy of
    the data (never a view into a batch tensor or into a cached item); without, the tensors may
    be such views (the caller serializes them at once, which copies only the item's bytes)."""
    fields: dict[str, ItemField] = {}
    for name, elem in kwargs_item.items():
        if not isinstance(elem.data, torch.Tensor):
            raise Internal(
                f"field {name!r} holds {type(elem.data).__name__}, not a single tensor; this "
                "model's item layout is not supported"
            )
        layout, flat_dim = field_layout(elem.field)
        data = elem.data.detach().cpu()
        if copy:
            data = data.clone(memory_format=torch.contiguous_format)
        fields[name] = ItemField(data, layout, flat_dim, bool(elem.field.keep_on_cpu))
    return fields


def placeholder_from_range(rng: Any) -> Placeholder:
    is_embed = None
    if rng.is_embed is not None:
        is_embed = tuple(bool(x) for x in rng.is_embed.tolist())
    return Placeholder(offset=int(rng.offset), length=int(rng.length), is_embed=is_embed)


def items_from_engine_input(
    engine_input: Mapping[str, Any], *, copy: bool = True
) -> tuple[Item, ...]:
    """A `MultiModalInput` dict → Items sorted by placeholder offset (prompt order).

    Each item's hash is `vlm.digest.item_digest` of its fields. An item whose kwargs are None
    (vLLM's engine-side cache holds it) becomes hash-only under vLLM's hash. `copy`: see
    `item_fields`.
    """
    items: list[Item] = []
    mm_kwargs = engine_input.get("mm_kwargs") or {}
    for modality_name, ranges in (engine_input.get("mm_placeholders") or {}).items():
        hashes = engine_input["mm_hashes"][modality_name]
        kwargs_items = mm_kwargs.get(modality_name) or [None] * len(ranges)
        if not len(ranges) == len(hashes) == len(kwargs_items):
            raise Internal(
                f"vLLM returned {len(ranges)} {modality_name} ranges, {len(kwargs_items)} "
                f"feature items and {len(hashes)} hashes"
            )
        modality = Modality(modality_name)
        for rng, h, kw in zip(ranges, hashes, kwargs_items):
            fields = None if kw is None else item_fields(kw, copy=copy)
            items.append(
                Item(
                    modality=modality,
                    # The digest of the features, which the model service can verify; vLLM's
                    # media hash only where vLLM returned no features.
                    hash=str(h) if fields is None else item_digest(modality, fields),
                    placeholder=placeholder_from_range(rng),
                    fields=fields,
                )
            )
    items.sort(key=lambda it: it.placeholder.offset)
    return tuple(items)


# --------------------------------------------------------------------------------- domain → vLLM


def vllm_field(f: ItemField) -> Any:
    """The vLLM field object for one item's field (a flat field gets one slice: the item)."""
    from vllm.multimodal.inputs import (
        MultiModalBatchedField,
        MultiModalFlatField,
        MultiModalSharedField,
    )

    if f.layout is FieldLayout.BATCHED:
        return MultiModalBatchedField(keep_on_cpu=f.keep_on_cpu)
    if f.layout is FieldLayout.FLAT:
        dim = f.flat_dim + f.data.dim() if f.flat_dim < 0 else f.flat_dim
        n = int(f.data.shape[dim])
        per_item = (slice(None),) * dim + (slice(0, n),)
        return MultiModalFlatField(
            slices=[per_item if dim else slice(0, n)], dim=dim, keep_on_cpu=f.keep_on_cpu
        )
    if f.layout is FieldLayout.SHARED:
        return MultiModalSharedField(batch_size=1, keep_on_cpu=f.keep_on_cpu)
    raise Internal(f"unknown layout {f.layout!r}")


def placeholder_range(ph: Placeholder) -> Any:
    """vLLM's `PlaceholderRange`; `is_embed` is a bool tensor, or None when all positions embed."""
    from vllm.multimodal.inputs import PlaceholderRange

    is_embed = None
    if ph.is_embed is not None and not all(ph.is_embed):
        is_embed = torch.tensor(ph.is_embed, dtype=torch.bool)
    return PlaceholderRange(offset=ph.offset, length=ph.length, is_embed=is_embed)
