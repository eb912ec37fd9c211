"""One exception hierarchy for both services; each class carries its gRPC status code.

Domain code raises these; `vlm.server.ErrorMappingInterceptor` maps them to a status at the edge,
with a machine-readable `ErrorDetail` in trailing metadata. The OpenAI HTTP front door maps the
same classes to `http_status`. Third-party errors (PIL, torch, vLLM) are translated into these
once, where they are caught.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

#: Trailing-metadata keys carrying the machine-readable error.
REASON_KEY = "vlm-error-reason"
DETAIL_KEY = "vlm-error-detail-bin"


class VlmError(Exception):
    """Base class. `field` names the request field at fault (dotted path), when there is one."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __reduce__(self):  # noqa: ANN204 - pickles (across process pools) with every attribute
        return _rebuild, (type(self), self.message, dict(self.__dict__))

    def details(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message

    @property
    def http_status(self) -> int:
        """The HTTP status for the same error (OpenAI-compatible front door); a size or item
        limit, here or upstream, is 413."""
        if self.reason == LimitExceeded.reason:
            return 413
        return HTTP_STATUS.get(self.code, 500)


class InvalidArgument(VlmError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class InvalidMedia(InvalidArgument):
    """Corrupt, truncated, empty, oversized or unsupported media."""

    reason = "INVALID_MEDIA"


class PromptTooLong(InvalidArgument):
    reason = "PROMPT_TOO_LONG"


class LimitExceeded(InvalidArgument):
    """More items of a modality than the per-prompt limit, or a size limit."""

    reason = "LIMIT_EXCEEDED"


class FailedPrecondition(VlmError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class ModelMismatch(FailedPrecondition):
    """The prompt was prepared for another model or another field layout."""

    reason = "MODEL_MISMATCH"


class MissingFeatures(FailedPrecondition):
    """Hash-only items whose features the receiver does not hold; resend them with fields."""

    reason = "MISSING_FEATURES"

    def __init__(self, hashes: Sequence[str], *, field: str | None = None) -> None:
        self.missing_hashes = tuple(hashes)
        super().__init__(
            f"features not held for {len(self.missing_hashes)} item(s); resend them with fields: "
            + ", ".join(self.missing_hashes),
            field=field,
        )


class NotFound(VlmError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class ModelNotFound(NotFound):
    """A request names a model this service does not serve (OpenAI's `model` field)."""

    reason = "MODEL_NOT_FOUND"


class Unauthenticated(VlmError):
    """No valid credentials (the bearer token)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class AlreadyExists(VlmError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "ALREADY_EXISTS"


class ResourceExhausted(VlmError):
    """A bounded queue is full; retry later or elsewhere."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "QUEUE_FULL"


class Unavailable(VlmError):
    """The service cannot serve now (engine dead, shutting down, upstream down)."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class DeadlineExceeded(VlmError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class Internal(VlmError):
    code = grpc.StatusCode.INTERNAL
    reason = "INTERNAL"


class UpstreamError(VlmError):
    """An error status returned by another service, passed through with its code and reason."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "UPSTREAM",
        field: str | None = None,
        missing_hashes: Sequence[str] = (),
    ) -> None:
        super().__init__(message, field=None)
        self.code = code
        self.reason = reason
        self.upstream_field = field
        self.missing_hashes = tuple(missing_hashes)


#: gRPC status → HTTP status, for errors that leave through the HTTP front door.
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _rebuild(cls: type[VlmError], message: str, state: dict) -> VlmError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err
