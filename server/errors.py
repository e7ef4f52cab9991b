"""The server's exceptions and their gRPC status codes: the one place where they meet.

Domain code (validation, batcher, inference) raises these; the servicer turns them into a
status with `to_status`. Anything else reaching a handler is a bug and becomes INTERNAL with
a fixed message: details of bugs go to the log, never to callers.

Messages quote what callers sent (model names, tensor names), so they are bounded: `cut` a
name where it is quoted, and `to_status` keeps every message within MAX_MESSAGE_BYTES
whatever was quoted (a 1 MB model name once made a 1 MB NOT_FOUND message, which gRPC
clients refuse past 16 KB of trailers and report as RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


class ServingError(Exception):
    """Base of everything the server reports to callers on purpose."""

    code = grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class Violation:
    field: str
    description: str


class InvalidInput(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, violations: list[Violation] | None = None) -> None:
        super().__init__(message)
        self.violations = violations or [Violation("request", message)]


class ModelNotFound(ServingError):
    """No such model or version is served; the message lists what is."""

    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServingError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Expired(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotServing(ServingError):
    """Not ready yet, or draining for shutdown."""

    code = grpc.StatusCode.UNAVAILABLE


class BatchFailed(ServingError):
    """The model run that held these images failed; the server itself goes on."""

    code = grpc.StatusCode.INTERNAL


class ModelError(Exception):
    """A model file cannot be served (missing, corrupt, wrong shape, no card): the server
    refuses to start with it, or the repository refuses that version and serves the rest."""


class StartupError(Exception):
    """The server cannot start (port taken, default model not served); one line for the
    operator."""


@dataclass(frozen=True)
class Status:
    code: grpc.StatusCode
    message: str
    details: list[any_pb2.Any] = field(default_factory=list)

    def to_rpc_status(self) -> status_pb2.Status:
        """For grpcio-status: `context.abort_with_status(rpc_status.to_status(...))`."""
        return status_pb2.Status(
            code=getattr(code_pb2, self.code.name), message=self.message, details=self.details
        )


INTERNAL_MESSAGE = "internal error while classifying; the server logged the details"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one short line for a message or a log: never a traceback."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


# A caller's name (model, version, tensor, parameter) as messages and logs quote it.
MAX_NAME_CHARS = 256
# A message as callers get it. gRPC sends it percent-encoded (up to 3 bytes a byte) in a
# trailer, and again inside grpc-status-details-bin (with a BadRequest's description: base64,
# 4/3): about 6 KB in all at this size, within the 8 KB that clients take without question.
MAX_MESSAGE_BYTES = 1024


def cut(text: str, limit: int = MAX_NAME_CHARS) -> str:
    """Caller-supplied text as a message or a log line quotes it: at most `limit` characters,
    then an ellipsis and the length it had."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[{len(text):,} characters in all]"


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`message` within `limit` bytes of UTF-8: its start and its end around an ellipsis that
    says how much was left out (what a message says last, "this server serves ...", stays)."""
    encoded = message.encode("utf-8", "surrogatepass")
    if len(encoded) <= limit:
        return message
    room = limit - 50  # the marker
    head = encoded[: room * 2 // 3].decode("utf-8", "ignore")
    tail = encoded[len(encoded) - room // 3 :].decode("utf-8", "ignore")
    return f"{head}…[{len(message) - len(head) - len(tail):,} characters left out]…{tail}"


def _printable(text: str) -> str:
    """Messages may quote caller input; a lone surrogate in it must not break protobuf."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def to_status(error: BaseException) -> Status:
    if isinstance(error, InvalidInput):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_printable(cut(v.field)), description=bounded(_printable(v.description))
                )
                for v in error.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        return Status(error.code, bounded(_printable(str(error))), [detail])
    if isinstance(error, ServingError):
        return Status(error.code, bounded(_printable(str(error))))
    return Status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
