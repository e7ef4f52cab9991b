"""Every exception the client raises, in one hierarchy (catch `DigitClientError` for all):

    DigitClientError            anything below; `.code` is the gRPC status when there was one
    ├── InvalidInput            the images break the input contract (found here or by the server);
    │                           `.field_violations` lists the server's (field, description) pairs
    │   └── ImageError          a picture cannot be read or holds no digit; names the file
    │       └── TooManyPieces   more pieces of ink than one read classifies (`.limit`)
    ├── Overloaded              RESOURCE_EXHAUSTED: the server's queue is full; back off
    ├── Unavailable             UNAVAILABLE: server down, starting or draining (already retried)
    ├── DeadlineExceeded        the call's timeout passed before the answer came
    ├── Unauthenticated         UNAUTHENTICATED / PERMISSION_DENIED: credentials refused
    └── ServerError             INTERNAL and anything else unexpected

gRPC errors are translated `from None`: the message is the server's own, with no gRPC
traceback attached.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import grpc


class FieldViolation(NamedTuple):
    """One broken field of a request, as the server's google.rpc.BadRequest names it: the
    field (`pixels_f32le[1570]`, `inputs[0]`) and what is wrong with it."""

    field: str
    description: str


class DigitClientError(Exception):
    code: grpc.StatusCode | None = None

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidInput(DigitClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        code: grpc.StatusCode | None = None,
        field_violations: Iterable[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message, code)
        # Empty for problems found here, before sending, and for servers that send no details.
        self.field_violations = [FieldViolation(*v) for v in field_violations]


class ImageError(InvalidInput):
    pass


class BlankPicture(ImageError):
    """The picture holds no ink: blank paper, or too little contrast to tell ink from it."""


class TooManyPieces(ImageError):
    """The picture holds more pieces of ink than one read classifies (`limit`)."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:  # pickled by worker processes: keep the limit
        return type(self), (str(self), self.limit)


class Overloaded(DigitClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(DigitClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(DigitClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(DigitClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class ServerError(DigitClientError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[DigitClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidInput,
    grpc.StatusCode.OUT_OF_RANGE: InvalidInput,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: Unauthenticated,
}


def from_rpc_error(error: grpc.RpcError, target: str) -> DigitClientError:
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or str(code)
    kind = _BY_CODE.get(code, ServerError) if code is not None else ServerError
    if kind is Unavailable:
        details = f"{target}: {details}"
    if kind is InvalidInput:
        return InvalidInput(details, code, _field_violations(error))
    return kind(details, code)


def _field_violations(error: grpc.RpcError) -> list[FieldViolation]:
    """The google.rpc.BadRequest in the call's rich status (grpc-status-details-bin), if any.
    A reply without one, or with one that does not match the status, yields none."""
    if not hasattr(error, "trailing_metadata"):
        return []
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that contradict the status line: trust neither
        return []
    violations = []
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            violations += [(v.field, v.description) for v in bad_request.field_violations]
    return [FieldViolation(*v) for v in violations]
