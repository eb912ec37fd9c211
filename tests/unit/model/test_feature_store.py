from __future__ import annotations

import pytest
import torch

from model_svc.feature_store import FeatureStore
from vlm.errors import MissingFeatures
from vlm.types import FieldLayout, Item, ItemField, Modality, Placeholder


def fields(nbytes: int) -> dict[str, ItemField]:
    return {"pixel_values": ItemField(torch.zeros(nbytes, dtype=torch.uint8), FieldLayout.BATCHED)}


def item(h: str, nbytes: int | None = 100, modality: Modality = Modality.IMAGE, offset: int = 0) -> Item:
    return Item(modality, h, Placeholder(offset, 1), None if nbytes is None else fields(nbytes))


def test_lru_eviction_by_bytes():
    s = FeatureStore(300)
    for h in "abc":
        assert s.put(Modality.IMAGE, h, fields(100))
    assert (len(s), s.nbytes) == (3, 300)
    assert s.get(Modality.IMAGE, "a") is not None  # a becomes most recently used
    s.put(Modality.IMAGE, "d", fields(100))  # evicts b, the least recently used
    assert (Modality.IMAGE, "b") not in s
    assert all((Modality.IMAGE, h) in s for h in "acd")
    st = s.stats()
    assert (st.items, st.bytes, st.hits, st.misses, st.evictions) == (3, 300, 1, 0, 1)


def test_refresh_replaces_and_oversized_is_not_stored():
    s = FeatureStore(300)
    s.put(Modality.IMAGE, "a", fields(100))
    s.put(Modality.IMAGE, "a", fields(200))
    assert (len(s), s.nbytes) == (1, 200)
    assert not s.put(Modality.IMAGE, "big", fields(301))
    assert (len(s), s.nbytes) == (1, 200)
    assert s.get(Modality.IMAGE, "missing") is None and s.misses == 1


def test_keys_include_the_modality():
    s = FeatureStore(1000)
    s.put(Modality.IMAGE, "h", fields(10))
    assert s.get(Modality.VIDEO, "h") is None


def test_resolve_stores_then_resolves_hash_only():
    s = FeatureStore(1000)
    out = s.resolve([item("a"), item("b", 50)])
    assert [i.fields is not None for i in out] == [True, True]
    assert len(s) == 2
    out = s.resolve([item("a", None), item("b", None, offset=2)])
    assert out[0].fields["pixel_values"].data.numel() == 100
    assert out[1].placeholder.offset == 2  # the request's placeholder, the store's fields
    assert (s.hits, s.misses) == (2, 0)


def test_resolve_within_the_same_prompt_without_the_store():
    s = FeatureStore(0)  # storing disabled
    out = s.resolve([item("a"), item("a", None, offset=3)])
    assert out[1].fields is out[0].fields
    assert len(s) == 0


def test_resolve_lists_all_missing_hashes_once():
    s = FeatureStore(1000)
    s.put(Modality.IMAGE, "known", fields(10))
    with pytest.raises(MissingFeatures) as e:
        s.resolve([item("x", None), item("known", None), item("y", None), item("x", None), item("z")])
    assert e.value.missing_hashes == ("x", "y")
    assert e.value.field == "prompt.items"
    assert (Modality.IMAGE, "z") in s  # items sent with fields are kept for the retry


def test_negative_budget_rejected():
    with pytest.raises(ValueError):
        FeatureStore(-1)
