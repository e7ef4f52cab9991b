"""What the two gRPC fronts share: lenient request parsing, handler registration, and one way
to answer a call through the data plane."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
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
R = TypeVar("R")
STREAM_WINDOW = 64  # messages of one bidirectional stream read ahead of the replies written


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


async def windowed(
    requests: AsyncIterator[R], reply: Callable[[R], Awaitable[T]]
) -> AsyncIterator[T]:
    """The replies to a bidirectional stream (ClassifyStream, ModelStreamInfer), each made by
    `reply(request)`, which answers errors in-stream and never raises.

    Messages are answered concurrently so one stream can fill a batch; replies go out in
    completion order (each carries its request's id). At most STREAM_WINDOW messages are read
    ahead of the replies written: a caller that stops reading replies stops the reading of its
    requests (and HTTP/2 flow control then stops its sending) instead of growing the server's
    memory. Use it inside `contextlib.aclosing`, so a stream the caller ends stops reading."""
    replies: asyncio.Queue[T | None] = asyncio.Queue()
    window = asyncio.Semaphore(STREAM_WINDOW)

    async def answer(request: R) -> None:
        replies.put_nowait(await reply(request))

    async def read_all() -> None:
        in_flight: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                await window.acquire()
                task = asyncio.create_task(answer(request))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            await asyncio.gather(*in_flight)
        finally:
            replies.put_nowait(None)

    reader = asyncio.create_task(read_all())
    try:
        while (item := await replies.get()) is not None:
            yield item  # returns once gRPC has taken the reply for writing
            window.release()
        await reader  # surfaces a broken request stream
    finally:
        reader.cancel()
