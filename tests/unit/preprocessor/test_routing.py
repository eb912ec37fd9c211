"""Replica choice: rendezvous hashing moves about 1/N of the keys when a replica joins or
leaves, never between the others; least-loaded ordering for text-only prompts."""

from __future__ import annotations

import asyncio

import pytest

from preprocessor_svc.replicas import ReplicaSet, resolve
from preprocessor_svc.routing import least_loaded_order, rendezvous_order

KEYS = [f"{i:064x}" for i in range(4000)]


def _homes(nodes: list[str]) -> dict[str, str]:
    return {k: rendezvous_order(k, nodes)[0] for k in KEYS}


def test_rendezvous_is_deterministic_and_balanced() -> None:
    nodes = [f"10.0.0.{i}:50052" for i in range(4)]
    homes = _homes(nodes)
    assert homes == _homes(list(reversed(nodes)))  # order of the replica list does not matter
    counts = {n: sum(1 for h in homes.values() if h == n) for n in nodes}
    assert all(800 < c < 1200 for c in counts.values()), counts


def test_adding_a_replica_moves_about_one_nth_of_the_keys_and_only_to_it() -> None:
    nodes = [f"10.0.0.{i}:50052" for i in range(4)]
    before = _homes(nodes)
    after = _homes([*nodes, "10.0.0.9:50052"])
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == "10.0.0.9:50052" for k in moved)
    assert 0.15 < len(moved) / len(KEYS) < 0.25  # ~1/5


def test_removing_a_replica_moves_only_its_keys_to_their_runner_up() -> None:
    nodes = [f"10.0.0.{i}:50052" for i in range(4)]
    before = {k: rendezvous_order(k, nodes) for k in KEYS}
    after = _homes(nodes[1:])
    for k in KEYS:
        if before[k][0] == nodes[0]:
            assert after[k] == before[k][1]  # the failover target is the stable runner-up
        else:
            assert after[k] == before[k][0]


def test_least_loaded_first_ties_spread_by_key() -> None:
    load = {"a": 3, "b": 0, "c": 1}
    assert least_loaded_order("req-1", list(load), load.__getitem__) == ["b", "c", "a"]
    even = {"a": 0, "b": 0}
    firsts = {least_loaded_order(f"req-{i}", list(even), even.__getitem__)[0] for i in range(50)}
    assert firsts == {"a", "b"}


def test_resolve_ip_literals_and_names() -> None:
    async def go():
        assert await resolve("10.1.2.3:50052") == ["10.1.2.3:50052"]
        assert await resolve("[::1]:50052") == ["[::1]:50052"]
        assert await resolve("localhost:50052") == ["127.0.0.1:50052"]  # IPv4 preferred: one replica
        assert await resolve("dns:///svc.local:50052") == ["dns:///svc.local:50052"]

    asyncio.run(go())


def test_malformed_target_fails_at_start() -> None:
    with pytest.raises(ValueError, match="HOST:PORT"):
        ReplicaSet(["model-svc"], lambda info: None)
