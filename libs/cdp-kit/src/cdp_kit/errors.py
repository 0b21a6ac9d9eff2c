"""Domain errors that every service raises and the gRPC layer maps to status codes.

Domain code raises these (it knows nothing of gRPC); `cdp_kit.interceptors` turns them into the
matching status with google.rpc details (BadRequest field violations, RetryInfo, ErrorInfo).
"""

from __future__ import annotations

import grpc


class CdpError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgument(CdpError):
    """Bad input. Names the field, the value that failed and what would be valid."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "invalid_argument"

    def __init__(self, field: str, message: str, *, reason: str | None = None) -> None:
        super().__init__(f"{field}: {message}", reason=reason)
        self.field = field
        self.description = message


class NotFound(CdpError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "not_found"


class AlreadyExists(CdpError):
    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "already_exists"


class FailedPrecondition(CdpError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "failed_precondition"


class Conflict(CdpError):
    """A concurrent change won; re-read and retry."""

    code = grpc.StatusCode.ABORTED
    reason = "conflict"


class Unauthenticated(CdpError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "unauthenticated"


class PermissionDenied(CdpError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "permission_denied"


class Unavailable(CdpError):
    """A dependency (the bus, the store) cannot take the work now; retry after `retry_after` seconds."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, reason: str | None = None) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class ResourceExhausted(Unavailable):
    """Back-pressure: a bounded buffer is full; retry after `retry_after` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "resource_exhausted"
