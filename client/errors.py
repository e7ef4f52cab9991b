"""Every exception the client raises, in one hierarchy (catch `DigitClientError` for all):

    DigitClientError            anything below; `.code` is the gRPC status when there was one
    ├── InvalidInput            the images break the input contract (found here or by the server)
    │   └── ImageError          a picture cannot be read or holds no digit; names the file
    ├── Overloaded              RESOURCE_EXHAUSTED: the server's queue is full; back off
    ├── Unavailable             UNAVAILABLE: server down, starting or draining (already retried)
    ├── DeadlineExceeded        the call's timeout passed before the answer came
    ├── Unauthenticated         UNAUTHENTICATED / PERMISSION_DENIED: credentials refused
    └── ServerError             INTERNAL and anything else unexpected

gRPC errors are translated `from None`: the message is the server's own, with no gRPC
traceback attached.
"""

from __future__ import annotations

import grpc


class DigitClientError(Exception):
    code: grpc.StatusCode | None = None

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidInput(DigitClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ImageError(InvalidInput):
    pass


class BlankPicture(ImageError):
    """The picture holds no ink: blank paper, or too little contrast to tell ink from it."""


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
    return kind(details, code)
