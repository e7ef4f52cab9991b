"""What the two gRPC fronts share: lenient request parsing, handler registration, and one way
to answer a call through the data plane."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status

from digit_recognizer.server.dataplane import CallFailed, DataPlane
from digit_recognizer.server.errors import InvalidInput

M = TypeVar("M", bound=Message)
T = TypeVar("T")


@dataclass(frozen=True)
class MalformedMessage:
    """Stands in for a request whose bytes are not a valid protobuf message of its type."""

    type_name: str
    reason: str

    def error(self) -> InvalidInput:
        return InvalidInput(f"the request is not a valid {self.type_name} message ({self.reason})")


def parsed(request: M | MalformedMessage) -> M:
    """The request, or the INVALID_ARGUMENT that a malformed one deserves."""
    if isinstance(request, MalformedMessage):
        raise request.error()
    return request


def _lenient(message_type: type[Message]) -> Callable[[bytes], Message | MalformedMessage]:
    # gRPC turns a deserializer exception into UNKNOWN naming a Python class; a malformed
    # message is the caller's mistake, so it reaches the handler and becomes INVALID_ARGUMENT.
    def parse(data: bytes) -> Message | MalformedMessage:
        try:
            return message_type.FromString(data)
        except DecodeError as exc:
            return MalformedMessage(message_type.DESCRIPTOR.full_name, str(exc) or "cannot parse")

    return parse


def add_service(servicer: object, service: ServiceDescriptor, server: grpc.aio.Server) -> None:
    """Like the generated add_*Servicer_to_server, with lenient request parsing."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in service.methods:
        make = kinds[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_lenient(message_factory.GetMessageClass(method.input_type)),
            response_serializer=message_factory.GetMessageClass(
                method.output_type
            ).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


async def answer(
    plane: DataPlane,
    method: str,
    context: grpc.aio.ServicerContext,
    work: Callable[..., Awaitable[T]],
    *args: Any,
) -> T:
    """`work(call, *args)` as one observed call; a failure aborts with its status."""
    try:
        return await plane.observed(method, work, *args, carrier=context.invocation_metadata)
    except CallFailed as failed:
        await abort(context, failed)
        raise  # abort raised already; this keeps type checkers informed


async def abort(context: grpc.aio.ServicerContext, failed: CallFailed) -> None:
    await context.abort_with_status(rpc_status.to_status(failed.status.to_rpc_status()))
