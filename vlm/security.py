"""Transport security for both services and the gateway → model hop: TLS (optionally mutual)
and a shared bearer token.

Server side (`ServerSecurity`, from `--tls-cert/--tls-key/--tls-client-ca/--auth-token-file` or
the `VLM_TLS_CERT`, `VLM_TLS_KEY`, `VLM_TLS_CLIENT_CA`, `VLM_AUTH_TOKEN` environment):

- TLS when a certificate and key are given; with a client CA, clients must present a
  certificate it signed (mTLS).
- With a token, `BearerAuthInterceptor` requires `authorization: Bearer <token>` on every RPC
  except the standard health service, which stays open for probes (metrics have their own
  port). A missing or wrong token is UNAUTHENTICATED; tokens are compared in constant time.

Client side (`ClientSecurity`): the CA to trust, an optional client certificate for mTLS, and
the token, sent as call metadata by `vlm.client`.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

#: RPCs that never need the token: probes must work without secrets.
OPEN_METHOD_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


def read_token(path: str | os.PathLike[str] | None, env: str) -> str | None:
    """The token from a file (first line) or, without one, from the environment variable."""
    if path is not None:
        token = Path(path).read_text().strip()
    else:
        token = os.environ.get(env, "").strip()
    return token or None


@dataclass(frozen=True)
class ServerSecurity:
    cert: bytes | None = None
    key: bytes | None = None
    #: CA of the client certificates to require (mTLS); None: no client certificates.
    client_ca: bytes | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both a certificate and its key")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("mTLS (a client CA) needs TLS (a certificate and key)")

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def credentials(self) -> grpc.ServerCredentials:
        assert self.cert is not None and self.key is not None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    @classmethod
    def from_files(
        cls,
        cert: str | None = None,
        key: str | None = None,
        client_ca: str | None = None,
        token_file: str | None = None,
    ) -> ServerSecurity:
        env = os.environ.get
        return cls(
            cert=_read(cert or env("VLM_TLS_CERT") or None),
            key=_read(key or env("VLM_TLS_KEY") or None),
            client_ca=_read(client_ca or env("VLM_TLS_CLIENT_CA") or None),
            token=read_token(token_file, "VLM_AUTH_TOKEN"),
        )


@dataclass(frozen=True)
class ClientSecurity:
    #: Root CA to verify the server with; None with `tls`: the system roots.
    ca: bytes | None = None
    #: Client certificate and key, for servers that require mTLS.
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None
    tls: bool = False

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(
        self, target: str, options: list[tuple[str, Any]], *, server_name: str | None = None
    ) -> grpc.aio.Channel:
        """A channel to `target`; `server_name` is the name its certificate must carry when
        `target` is an address (a replica found by DNS expansion)."""
        if not (self.tls or self.ca is not None or self.cert is not None):
            return grpc.aio.insecure_channel(target, options=options)
        creds = grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )
        if server_name:
            options = [*options, ("grpc.ssl_target_name_override", server_name)]
        return grpc.aio.secure_channel(target, creds, options=options)

    @classmethod
    def from_files(
        cls,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        token_file: str | None = None,
        *,
        env_prefix: str = "VLM",
        tls: bool = False,
    ) -> ClientSecurity:
        env = os.environ.get
        ca = ca or env(f"{env_prefix}_TLS_CA") or None
        cert = cert or env(f"{env_prefix}_TLS_CERT") or None
        return cls(
            ca=_read(ca),
            cert=_read(cert),
            key=_read(key or env(f"{env_prefix}_TLS_KEY") or None),
            token=read_token(token_file, f"{env_prefix}_AUTH_TOKEN"),
            tls=tls or ca is not None or cert is not None,
        )


NO_SECURITY = ClientSecurity()


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects RPCs without `authorization: Bearer <token>` (health excepted)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def authorized(self, header: str | None) -> bool:
        return header is not None and hmac.compare_digest(header.encode(), self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        md = dict(handler_call_details.invocation_metadata or ())
        if self.authorized(md.get("authorization")):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        why = "missing" if "authorization" not in md else "invalid"
        return rejecting(
            handler, grpc.StatusCode.UNAUTHENTICATED,
            f"{why} bearer token (send 'authorization: Bearer <token>')",
        )


def rejecting(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only aborts with `code`."""

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext):
        await context.abort(code, message)
        yield  # pragma: no cover - abort raises

    kw = dict(
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(abort, **kw)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kw)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort, **kw)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kw)
