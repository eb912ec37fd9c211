"""The gateway's model replicas: discovery, handshake and health, one task per replica.

`ReplicaSet` turns the `--model-target` values into replicas. A target whose host is a DNS
name (a Kubernetes headless Service, say) becomes one replica per address it resolves to, and
is re-resolved periodically: new addresses join, vanished ones leave.

Each `Replica` runs one loop:

1. **Handshake.** `GetModelInfo`, retried with backoff until the service answers (it may start
   after the gateway, as under compose or Kubernetes; it answers only once warmed up).
2. **Compatibility.** The answer is checked by the set's `check` function (the gateway's own
   fingerprint; before the gateway's workers exist, only the model files and `model_impl`). A
   replica with another model is INCOMPATIBLE: it is logged with both fingerprints, shown in
   health, and never routed to.
3. **Health.** The standard `grpc.health.v1` `Watch` stream keeps the state current: SERVING
   or NOT_SERVING. When the stream breaks (the process died or restarted, maybe with another
   model), the loop starts over at the handshake.

The state changes are reported to `on_change`, which the app uses for end-to-end health.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vlm import types
from vlm.client import ModelClient
from vlm.errors import UpstreamError
from vlm.security import NO_SECURITY, ClientSecurity
from vlm.server import channel_options

log = logging.getLogger(__name__)

#: Returns why a replica's model is not the one this gateway prepares prompts for, or None.
Check = Callable[[types.ModelInfo], "str | None"]


class ReplicaState(str, enum.Enum):
    CONNECTING = "connecting"  # no handshake yet, or the connection was lost
    INCOMPATIBLE = "incompatible"  # serves another model (or another feature dtype)
    NOT_SERVING = "not_serving"  # compatible, health says NOT_SERVING
    SERVING = "serving"


@dataclass(frozen=True)
class ReplicaStatus:
    address: str
    #: The --model-target it came from (a DNS name expands to several addresses).
    target: str
    state: ReplicaState
    reason: str
    in_flight: int
    model: types.ModelInfo | None


@dataclass
class ReplicaCounters:
    requests: int = 0
    #: Requests that failed here before their first token and were retried elsewhere.
    failovers: int = 0
    #: Items resent with their fields after the replica answered MISSING_FEATURES.
    resends: int = 0
    #: Requests with media routed here while the replica held their first item already.
    affinity_hits: int = 0


def _replica_channel_options() -> list[tuple[str, object]]:
    # Reconnect quickly after a restart: grpc's default backoff grows to two minutes.
    return [
        *channel_options(),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


class Replica:
    """One model service address: a client (with its own hash-only memory), state, counters."""

    def __init__(
        self,
        address: str,
        target: str,
        check: Check,
        on_change: Callable[[], None],
        security: ClientSecurity = NO_SECURITY,
    ) -> None:
        self.address = address
        self.target = target
        # The certificate names the target's host, not the address it resolved to.
        host = _split_host_port(target)[0] if "://" not in target and not target.startswith("unix:") else None
        self.client = ModelClient(
            address,
            channel=security.channel(address, _replica_channel_options(), server_name=host),
            security=security,
        )
        self.state = ReplicaState.CONNECTING
        self.reason = "no handshake yet"
        self.info: types.ModelInfo | None = None
        self.in_flight = 0
        self.counters = ReplicaCounters()
        self._check = check
        self._on_change = on_change
        self._task: asyncio.Task | None = None

    @property
    def serving(self) -> bool:
        return self.state is ReplicaState.SERVING

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            self.address, self.target, self.state, self.reason, self.in_flight, self.info
        )

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"replica {self.address}")

    def recheck(self) -> None:
        """Re-evaluate compatibility (the gateway's expectation got stricter)."""
        if self.info is None:
            return
        problem = self._check(self.info)
        if problem is not None:
            self._refuse(problem)

    def suspect(self, reason: str) -> None:
        """A call failed as if the replica were down: stop routing to it and redo the
        handshake (the health stream may not have noticed yet)."""
        if self.state is ReplicaState.INCOMPATIBLE:
            return
        self._set(ReplicaState.CONNECTING, reason)
        if self._task is not None:
            self._task.cancel()
            self._task = asyncio.create_task(self._run(), name=f"replica {self.address}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.client.close()

    def _set(self, state: ReplicaState, reason: str) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        level = logging.INFO if state is ReplicaState.SERVING else logging.WARNING
        if self.state is ReplicaState.CONNECTING and state is ReplicaState.CONNECTING:
            level = logging.DEBUG  # retries while waiting for a replica to come up
        log.log(level, "model replica %s (%s): %s: %s", self.address, self.target, state.value, reason)
        self.state, self.reason = state, reason
        self._on_change()

    def _refuse(self, problem: str) -> None:
        self._set(ReplicaState.INCOMPATIBLE, problem)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                self.info = await self.client.model_info(timeout=5.0)
            except UpstreamError as e:
                self._set(ReplicaState.CONNECTING, f"handshake: {e.code.name}: {e.message}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.2
            problem = self._check(self.info)
            if problem is not None:
                self._refuse(problem)
            await self._watch_health()
            await asyncio.sleep(backoff)

    async def _watch_health(self) -> None:
        """Follow health until the stream breaks. State stays INCOMPATIBLE for a refused
        replica (the stream still tells when it restarts, maybe with the right model)."""
        stub = health_pb2_grpc.HealthStub(self.client.channel)
        call = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        try:
            async for resp in call:
                if self.state is ReplicaState.INCOMPATIBLE:
                    continue
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    self._set(ReplicaState.SERVING, "health: SERVING")
                else:
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
                    self._set(ReplicaState.NOT_SERVING, f"health: {name}")
            reason = "health stream ended"
        except grpc.aio.AioRpcError as e:
            reason = f"health stream lost: {e.code().name}"
        finally:
            call.cancel()
        self._set(ReplicaState.CONNECTING, reason)


def _split_host_port(target: str) -> tuple[str, str]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"model target {target!r} is not HOST:PORT")
    return host.strip("[]"), port


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(ip: str, port: str) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def resolve(target: str) -> list[str]:
    """`HOST:PORT` → one address per IP the host resolves to (IPv4 if it has any, else IPv6:
    `localhost` is one replica, not two). IP literals and grpc URIs (`dns:///`, `unix:`) stay
    as they are."""
    if "://" in target or target.startswith("unix:"):
        return [target]
    host, port = _split_host_port(target)
    if _is_ip(host):
        return [_address(host, port)]
    infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET})
    v6 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET6})
    return [_address(ip, port) for ip in (v4 or v6)]


class ReplicaSet:
    """Every replica of every `--model-target`, kept current by periodic re-resolution."""

    def __init__(
        self,
        targets: Iterable[str],
        check: Check,
        *,
        resolve_interval_s: float = 30.0,
        on_change: Callable[[], None] = lambda: None,
        security: ClientSecurity = NO_SECURITY,
    ) -> None:
        self.targets = tuple(dict.fromkeys(targets))
        self._security = security
        if not self.targets:
            raise ValueError("no model targets")
        for t in self.targets:
            if "://" not in t and not t.startswith("unix:"):
                _split_host_port(t)  # fail at start-up on a malformed target
        self._check = check
        self._interval = resolve_interval_s
        self._on_change = on_change
        self._replicas: dict[str, Replica] = {}
        self._resolver: asyncio.Task | None = None
        self._changed = asyncio.Event()

    @property
    def replicas(self) -> list[Replica]:
        return list(self._replicas.values())

    def serving(self) -> list[Replica]:
        return [r for r in self._replicas.values() if r.serving]

    def statuses(self) -> list[ReplicaStatus]:
        return [r.status() for r in self._replicas.values()]

    async def start(self) -> None:
        await self._resolve_all()
        self._resolver = asyncio.create_task(self._resolve_forever(), name="replica resolver")

    def set_check(self, check: Check) -> None:
        """Replace the compatibility check and re-evaluate every replica that answered."""
        self._check = check
        for r in self._replicas.values():
            r.recheck()

    async def wait_for(self, accept: Callable[[types.ModelInfo], bool]) -> types.ModelInfo:
        """The first model info, from any replica, that `accept` takes."""
        while True:
            for r in self._replicas.values():
                if r.info is not None and accept(r.info):
                    return r.info
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
        await asyncio.gather(*(r.close() for r in self._replicas.values()))
        self._replicas.clear()

    def _notify(self) -> None:
        self._changed.set()
        self._on_change()

    def _checked(self, info: types.ModelInfo) -> str | None:
        return self._check(info)

    async def _resolve_all(self) -> None:
        wanted: dict[str, str] = {}
        for target in self.targets:
            try:
                addresses = await resolve(target)
            except OSError as e:
                # Keep the replicas we had: a DNS hiccup must not drop healthy ones.
                log.warning("model target %s: cannot resolve: %s", target, e)
                addresses = [a for a, r in self._replicas.items() if r.target == target]
            for a in addresses:
                wanted.setdefault(a, target)
        for address in [a for a in self._replicas if a not in wanted]:
            log.info("model replica %s left (no longer resolved)", address)
            await self._replicas.pop(address).close()
        for address, target in wanted.items():
            if address not in self._replicas:
                log.info("model replica %s (%s) added", address, target)
                replica = Replica(address, target, self._checked, self._notify, self._security)
                self._replicas[address] = replica
                replica.start()
        self._notify()

    async def _resolve_forever(self) -> None:
        while True:
            # Retry soon while a target resolves to nothing (its pods are not up yet).
            await asyncio.sleep(self._interval if self._replicas else min(self._interval, 1.0))
            await self._resolve_all()
