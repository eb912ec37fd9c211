"""Feature store: a bytes-bounded LRU of per-item features, keyed by the item's content hash.

A client (the preprocessor) may send an item "hash only" (no fields) when it believes the model
service already holds its features. `FeatureStore.resolve` gives every item of a prompt its
fields:

* an item sent with fields is stored (or refreshed) under its hash and used as sent;
* a hash-only item takes the fields of an earlier item of the same prompt with the same hash,
  else those held by the store (a hit; the entry becomes most recently used);
* if any hash-only item cannot be resolved, `MissingFeatures` lists all the missing hashes (in
  prompt order, without duplicates) so the client can resend exactly those with fields.

Keys are (modality, hash). The store holds references to the tensors (no copies); an entry's
size is the sum of its tensors' bytes. Entries larger than the whole budget are not stored.
`max_bytes=0` disables storing (every hash-only item is then a miss).

Counters (`stats()`): items, bytes, hits, misses (hash-only lookups), evictions. Not thread-safe:
use it from the event loop only (the engine does).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vlm.errors import MissingFeatures
from vlm.types import Item, ItemField, Modality

Fields = Mapping[str, ItemField]


@dataclass(frozen=True)
class FeatureStoreStats:
    items: int
    bytes: int
    max_bytes: int
    hits: int
    misses: int
    evictions: int


def fields_nbytes(fields: Fields) -> int:
    return sum(f.nbytes for f in fields.values())


class FeatureStore:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self._max_bytes = max_bytes
        self._entries: OrderedDict[tuple[Modality, str], tuple[Fields, int]] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ------------------------------------------------------------------ basic operations

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: tuple[Modality, str]) -> bool:
        return key in self._entries

    def put(self, modality: Modality, hash_: str, fields: Fields) -> bool:
        """Store (or refresh) an item's fields; False if they exceed the whole budget."""
        key = (modality, hash_)
        size = fields_nbytes(fields)
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        if size > self._max_bytes:
            return False
        self._entries[key] = (fields, size)
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, (_, evicted) = self._entries.popitem(last=False)
            self._bytes -= evicted
            self.evictions += 1
        return True

    def get(self, modality: Modality, hash_: str) -> Fields | None:
        """Look an item up (counts a hit or a miss; a hit becomes most recently used)."""
        key = (modality, hash_)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def stats(self) -> FeatureStoreStats:
        return FeatureStoreStats(
            items=len(self._entries),
            bytes=self._bytes,
            max_bytes=self._max_bytes,
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
        )

    # ------------------------------------------------------------------ prompts

    def resolve(self, items: Sequence[Item], *, field: str = "prompt.items") -> tuple[Item, ...]:
        """Every item with its fields; stores items sent with fields. See the module docstring.

        Raises MissingFeatures (naming `field`) listing every hash that could not be resolved.
        """
        in_request: dict[tuple[Modality, str], Fields] = {}
        for item in items:
            if item.fields is not None:
                in_request[(item.modality, item.hash)] = item.fields
                self.put(item.modality, item.hash, item.fields)

        out: list[Item] = []
        missing: list[str] = []
        for item in items:
            if item.fields is not None:
                out.append(item)
                continue
            key = (item.modality, item.hash)
            fields = in_request.get(key)
            if fields is None:
                fields = self.get(item.modality, item.hash)
            else:
                self.hits += 1
            if fields is None:
                if item.hash not in missing:
                    missing.append(item.hash)
                continue
            out.append(Item(item.modality, item.hash, item.placeholder, fields))
        if missing:
            raise MissingFeatures(missing, field=field)
        return tuple(out)
