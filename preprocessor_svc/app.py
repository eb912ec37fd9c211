"""Assembles the preprocessor service: worker pool + gateway + servicer + gRPC app (used by
`main` and tests).

Start-up with model targets (the gateway):

1. Bind the port, NOT_SERVING (health checks get an answer, RPCs get UNAVAILABLE).
2. Start and warm the workers, and meanwhile discover the replicas and handshake
   (`GetModelInfo`), retrying until one that serves this model's files answers: the services
   may start in any order, and started together they start in parallel.
3. If that replica's profile differs from the workers' in what the preprocessor was not told
   explicitly (the dtype features travel in with `--dtype auto`, the max length, the
   per-modality item limits), adopt its values and start the workers again.
4. From then on a replica is compatible only when its full fingerprint (feature dtype
   included) equals the workers' profile.
5. SERVING while at least one compatible replica is; each replica's state is also reported
   as health service `replica/ADDRESS`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from preprocessor_svc.gateway import Gateway
from preprocessor_svc.metrics import PreprocessorMetrics
from preprocessor_svc.pool import PoolConfig, Preprocessor
from preprocessor_svc.processing import ProcessorConfig
from preprocessor_svc.replicas import ReplicaSet, ReplicaState
from preprocessor_svc.servicer import SERVICE_NAME, PreprocessorServicer, add_to_server
from vlm import types
from vlm.fingerprint import compute_fingerprint
from vlm.process import freeze_gc_heap
from vlm.profile import ModelProfile
from vlm.security import NO_SECURITY, ClientSecurity
from vlm.server import GrpcApp, ServerOptions

if TYPE_CHECKING:
    from preprocessor_svc.openai_http import OpenAIHttpServer
    from vlm.admission import RequestBudget

log = logging.getLogger(__name__)

REPLICA_HEALTH_PREFIX = "replica/"


def adopt_model_info(config: ProcessorConfig, info: types.ModelInfo) -> ProcessorConfig:
    """`config` with the facts it leaves open taken from a model replica's profile."""
    changes: dict[str, object] = {}
    if config.dtype == "auto" and info.fingerprint.feature_dtype:
        changes["dtype"] = info.fingerprint.feature_dtype
    if config.max_model_len is None:
        changes["max_model_len"] = info.max_model_len
    if config.limit_mm_per_prompt is None and info.modalities:
        changes["limit_mm_per_prompt"] = {
            m.modality.value: m.max_items_per_prompt for m in info.modalities
        }
    if changes:
        log.info("adopted from the model replica %s: %s", info.model_id, changes)
    return dataclasses.replace(config, **changes)


def _agrees(profile: ModelProfile, info: types.ModelInfo) -> bool:
    """Do workers that derived `profile` already prepare what the replica serves (same model
    files, impl, vLLM release and feature dtype; max length; item limits)?"""
    mine = profile.model_info()
    return (
        info.fingerprint.same_model(mine.fingerprint)
        and info.max_model_len == mine.max_model_len
        and {m.modality: m.max_items_per_prompt for m in info.modalities}
        == {m.modality: m.max_items_per_prompt for m in mine.modalities}
    )


def _files_check(config: ProcessorConfig):
    """Before the workers exist: does a replica serve the same model files and impl?"""
    try:
        own = compute_fingerprint(
            config.model, config.model_impl, feature_dtype="", revision=config.revision
        )
    except FileNotFoundError:
        own = None  # a hub id not cached yet: the workers fetch it; the full check follows

    def check(info: types.ModelInfo) -> str | None:
        fp = info.fingerprint
        if fp.model_impl != config.model_impl or (own and fp.config_hash != own.config_hash):
            mine = own.describe() if own else f"{config.model!r} (impl {config.model_impl!r})"
            return f"serves another model: {fp.describe()}, this gateway prepares {mine}"
        return None

    return check


def _profile_check(expected: types.Fingerprint):
    def check(info: types.ModelInfo) -> str | None:
        if not info.fingerprint.same_model(expected):
            return (f"serves another model: {info.fingerprint.describe()}, "
                    f"this gateway prepares {expected.describe()}")
        return None

    return check


class _EndToEndHealth:
    """Keeps health current from the replicas' state changes: one entry per replica
    (`replica/ADDRESS`), and the server SERVING while the gateway is up and one compatible
    replica serves. Runs from the handshake on, so the entries tell why during the wait."""

    def __init__(self, grpc_app: GrpcApp, replicas: ReplicaSet, changed: asyncio.Event) -> None:
        self._grpc, self._replicas, self._changed = grpc_app, replicas, changed
        self.gateway: Gateway | None = None
        self._task = asyncio.create_task(self._follow(), name="end-to-end health")

    async def _follow(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            await self.sync()

    async def sync(self) -> None:
        for s in self._replicas.statuses():
            await self._grpc.set_health(
                REPLICA_HEALTH_PREFIX + s.address, s.state is ReplicaState.SERVING
            )
        await self._grpc.set_serving(self.gateway is not None and self.gateway.serving)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class PreprocessorApp:
    grpc: GrpcApp
    gateway: Gateway
    _health: _EndToEndHealth | None = field(default=None, repr=False)
    #: The OpenAI-compatible HTTP front door (`http_port`); stops with the gRPC server.
    http: OpenAIHttpServer | None = None

    @property
    def preprocessor(self) -> Preprocessor:
        return self.gateway.preprocessor

    @property
    def replicas(self) -> ReplicaSet | None:
        return self.gateway.replicas

    @classmethod
    async def start(
        cls,
        config: ProcessorConfig,
        pool: PoolConfig,
        options: ServerOptions,
        metrics: PreprocessorMetrics | None = None,
        *,
        model_targets: tuple[str, ...] = (),
        resolve_interval_s: float = 30.0,
        model_security: ClientSecurity = NO_SECURITY,
        http_port: int | None = None,
        http_host: str = "127.0.0.1",
        served_model_name: str | None = None,
    ) -> PreprocessorApp:
        """Bind the port (NOT_SERVING), handshake with a replica (when there are targets),
        start and warm the workers, then report SERVING (see the module docstring). With
        `http_port` the OpenAI-compatible HTTP front door binds right after the gRPC port
        (503 until warm) and serves through the same gateway."""
        metrics = metrics or PreprocessorMetrics()
        app = GrpcApp("preprocessor", options, metrics)
        servicer = PreprocessorServicer()
        app.add_service(add_to_server, servicer, SERVICE_NAME)
        changed = asyncio.Event()
        replicas = (
            ReplicaSet(model_targets, _files_check(config), resolve_interval_s=resolve_interval_s,
                       on_change=changed.set, security=model_security)
            if model_targets else None
        )
        preprocessor = health = http = None
        try:
            await app.start()
            if http_port is not None:
                http = await _start_http(config, options, metrics, replicas, http_host, http_port,
                                         served_model_name, app.request_budget)
                app.also_stop(http.stop)
            if replicas is None:
                preprocessor = await Preprocessor.start(config, pool)
            else:
                await replicas.start()
                health = _EndToEndHealth(app, replicas, changed)
                # The workers start while the replicas do (compose starts both at once); if
                # the replica's facts then differ from what the workers derived, they are
                # started again with the adopted config.
                early = asyncio.create_task(Preprocessor.start(config, pool))
                try:
                    info = await _wait_for_model(replicas, config)
                    preprocessor = await early
                except BaseException:
                    early.cancel()
                    done = (await asyncio.gather(early, return_exceptions=True))[0]
                    if isinstance(done, Preprocessor):
                        await done.close()
                    raise
                if not _agrees(preprocessor.profile, info):
                    config = adopt_model_info(config, info)
                    log.info("restarting the workers with the replica's facts")
                    early_pre, preprocessor = preprocessor, None
                    await early_pre.close()
                    preprocessor = await Preprocessor.start(config, pool)
            metrics.bind(preprocessor)
            if replicas is not None:
                replicas.set_check(_profile_check(preprocessor.profile.fingerprint))
                metrics.bind_replicas(replicas)
            gateway = Gateway(preprocessor, metrics, replicas)
            servicer.attach(gateway)
            if http is not None:
                http.attach(gateway)
            freeze_gc_heap()
            if health is None:
                await app.set_serving(True)
            else:
                health.gateway = gateway
                await health.sync()
        except BaseException:
            if health is not None:
                await health.close()
            await app.stop(0)
            if preprocessor is not None:
                await preprocessor.close()
            if replicas is not None:
                await replicas.close()
            raise
        return cls(app, gateway, health, http)

    async def close(self) -> None:
        if self._health is not None:
            await self._health.close()
        await self.grpc.stop(0)
        await self.preprocessor.close()
        if self.replicas is not None:
            await self.replicas.close()


async def _start_http(
    config: ProcessorConfig,
    options: ServerOptions,
    metrics: PreprocessorMetrics,
    replicas: ReplicaSet | None,
    host: str,
    port: int,
    served_model_name: str | None,
    budget: RequestBudget | None = None,
) -> OpenAIHttpServer:
    # vLLM's OpenAI protocol models import much of vLLM (seconds): off the event loop, and only
    # when the HTTP front door is on.
    openai_http = await asyncio.to_thread(importlib.import_module, "preprocessor_svc.openai_http")
    security = options.security  # the same TLS / mTLS / token as the gRPC port
    server = openai_http.OpenAIHttpServer(
        model=config.model, served_model_name=served_model_name, host=host, port=port,
        replicas=replicas, registry=metrics.registry,
        max_body_bytes=openai_http.body_limit(options.max_message_bytes),
        max_concurrent=options.max_concurrent_rpcs,
        tokenizer_loader=lambda: openai_http.load_tokenizer(config),
        api_key=security.token, ssl_context=openai_http.ssl_context(security) if security.tls else None,
        budget=budget,
    )
    await server.start()
    return server


async def _wait_for_model(replicas: ReplicaSet, config: ProcessorConfig) -> types.ModelInfo:
    """The first compatible replica's profile; logs every 10 s why there is none yet."""
    check = _files_check(config)
    waiter = asyncio.ensure_future(replicas.wait_for(lambda info: check(info) is None))
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=10.0)
            if done:
                return waiter.result()
            why = "; ".join(f"{s.address}: {s.state.value} ({s.reason})" for s in replicas.statuses())
            log.warning("waiting for a model replica of %s: %s", config.model, why or "none resolved")
    finally:
        waiter.cancel()
