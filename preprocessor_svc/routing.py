"""Replica choice for the gateway: pure functions, no I/O.

- Requests with media go by **rendezvous (highest-random-weight) hashing** on the first item's
  content hash: every replica gets a pseudo-random score for the key and the highest wins. The
  same image keeps landing on the replica that already holds its features (feature store, vLLM
  encoder and prefix caches); adding or removing one of N replicas moves only the keys that
  replica wins or won, about 1/N of them, and the ranking among the others never changes, so
  the runner-up is a stable failover target.
- Text-only requests go to the least-loaded replica (fewest requests in flight from this
  gateway), ties broken by the same rendezvous score on the request ID so that equal replicas
  share the work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def _score(key: str, node: str) -> int:
    digest = hashlib.blake2b(f"{node}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, nodes: Sequence[T], name: Callable[[T], str] = str) -> list[T]:
    """`nodes` from the best to the worst home for `key`."""
    return sorted(nodes, key=lambda n: _score(key, name(n)), reverse=True)


def least_loaded_order(
    key: str, nodes: Sequence[T], load: Callable[[T], int], name: Callable[[T], str] = str
) -> list[T]:
    """`nodes` by ascending load; equal loads in rendezvous order of `key`."""
    return sorted(nodes, key=lambda n: (load(n), -_score(key, name(n))))
