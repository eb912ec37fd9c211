"""vLLM multimodal structures ⇄ domain items (`vlm.vllm_mm`), with vLLM's real classes."""

from __future__ import annotations

import pytest
import torch
from vllm.multimodal.inputs import (
    MultiModalBatchedField,
    MultiModalFieldElem,
    MultiModalFlatField,
    MultiModalKwargsItem,
    MultiModalSharedField,
    PlaceholderRange,
)

from vlm.errors import Internal
from vlm.types import FieldLayout, ItemField, Modality, Placeholder
from vlm.digest import item_digest
from vlm.vllm_mm import (
    field_layout,
    item_fields,
    items_from_engine_input,
    placeholder_from_range,
    placeholder_range,
    vllm_field,
)


@pytest.mark.parametrize(
    "f",
    [
        ItemField(torch.zeros(3, 4, 4), FieldLayout.BATCHED),
        ItemField(torch.zeros(6, 8), FieldLayout.FLAT, flat_dim=0),
        ItemField(torch.zeros(2, 5, 3), FieldLayout.FLAT, flat_dim=1),
        ItemField(torch.zeros(2, 5), FieldLayout.FLAT, flat_dim=-1),
        ItemField(torch.tensor([1, 2, 2]), FieldLayout.SHARED, keep_on_cpu=True),
    ],
)
def test_field_layout_round_trip(f):
    field = vllm_field(f)
    layout, dim = field_layout(field)
    assert layout is f.layout and bool(field.keep_on_cpu) == f.keep_on_cpu
    if f.layout is FieldLayout.FLAT:
        want = f.flat_dim % f.data.dim()
        assert dim == want == field.dim
        # One slice covering the item's whole tensor along its flat dim.
        (sl,) = field.slices
        sl = sl if isinstance(sl, slice) else sl[want]
        assert (sl.start, sl.stop) == (0, f.data.shape[want])


def test_unknown_field_type_is_internal():
    with pytest.raises(Internal):
        field_layout(object())


def test_placeholder_round_trip():
    for ph in (Placeholder(3, 4), Placeholder(0, 5, (True, False, True, True, False))):
        back = placeholder_from_range(placeholder_range(ph))
        assert back == ph
    # All-True is sent as None (vLLM's own convention for contiguous placeholders).
    assert placeholder_range(Placeholder(1, 2, (True, True))).is_embed is None


def test_item_fields_are_compact_copies():
    batch = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    item = MultiModalKwargsItem(
        {
            "pixel_values": MultiModalFieldElem(batch[1:3], MultiModalFlatField(slices=[slice(1, 3)], dim=0)),
            "grid": MultiModalFieldElem(torch.tensor([1, 2, 2]), MultiModalBatchedField(keep_on_cpu=True)),
        }
    )
    fields = item_fields(item)
    pv = fields["pixel_values"]
    assert pv.layout is FieldLayout.FLAT and torch.equal(pv.data, batch[1:3])
    assert pv.data.untyped_storage().nbytes() == 2 * 6 * 4  # not the whole batch
    assert fields["grid"].keep_on_cpu and fields["grid"].layout is FieldLayout.BATCHED


def test_items_in_prompt_order_across_modalities():
    def kw(n):
        return MultiModalKwargsItem({"x": MultiModalFieldElem(torch.zeros(n), MultiModalSharedField(batch_size=1))})

    engine_input = {
        "mm_placeholders": {
            "image": [PlaceholderRange(10, 2), PlaceholderRange(1, 3)],
            "video": [PlaceholderRange(5, 4, is_embed=torch.tensor([True, False, True, True]))],
        },
        "mm_hashes": {"image": ["i0", "i1"], "video": ["v0"]},
        "mm_kwargs": {"image": [kw(1), None], "video": [kw(2)]},
    }
    items = items_from_engine_input(engine_input)
    # Items with features are hashed by their digest; the one vLLM's cache holds keeps vLLM's hash.
    assert [(i.modality, i.hash, i.placeholder.offset) for i in items] == [
        (Modality.IMAGE, "i1", 1),
        (Modality.VIDEO, item_digest(Modality.VIDEO, items[1].fields), 5),
        (Modality.IMAGE, item_digest(Modality.IMAGE, items[2].fields), 10),
    ]
    assert items[0].fields is None  # held by vLLM's cache: hash-only
    assert items[1].placeholder.is_embed == (True, False, True, True)
    engine_input["mm_hashes"]["image"] = ["only-one"]
    with pytest.raises(Internal):
        items_from_engine_input(engine_input)
