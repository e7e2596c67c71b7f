"""Every RPC handler of a server wrapped once, when it is registered, with its metrics and the status mapping.

grpc.aio runs server interceptors on every call: a coroutine per interceptor that looks the handler up again, even
when the interceptor only ever returns the same wrapped handler. On a batch-1 inference that machinery cost more
than ModelForge's own work, so the two things every call needs, its metrics and the mapping of escaping exceptions
to statuses, are applied here instead, by :class:`Registrar`: it stands in for the server in the generated
``add_*_to_server`` functions and registers each method's handler already wrapped, with the labelled metric
children looked up once. A call then runs one wrapper frame and no interceptor at all (the OpenTelemetry server
interceptor is added only while tracing is on).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, NoReturn

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from grpc._cython.cygrpc import ExecuteBatchError  # what a failed send raises; grpc.aio has no public name for it

from modelforge_server import telemetry
from modelforge_server.errors import InvalidArgument, Unavailable
from modelforge_server.metrics import Metrics
from modelforge_server.status import abort

Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]

# How long a refused client-streaming call keeps reading what the client still sends (see _drain).
_DRAIN_SECONDS = 2.0
# How long a stream whose write failed waits for gRPC to cancel it, as it does once it hears the client left.
_CANCELLATION_SECONDS = 2.0

_FACTORIES: dict[str, Callable[..., grpc.RpcMethodHandler]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


# What grpc.aio logs, as an ERROR with a traceback, when the answer of a unary call cannot be sent (see Unsent).
_UNSENT_PREFIX = "ExecuteBatchError raised in core by servicer method"
_GRPC_LOGGER = "grpc._cython.cygrpc"


class Unsent(logging.Filter):
    """Turns grpc.aio's ERROR for an answer it could not send into the INFO line it is. The send of a unary call's
    answer fails when the call ended meanwhile: its client cancelled it or its deadline passed as the handler
    returned (a job cancelled while a worker's call for its batch ran, for one). gRPC logs that as an ERROR with a
    traceback unless it had already heard that the client left, which is a race the server cannot win every time.
    Nothing failed on the server, and the client got its status from its own side."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not isinstance(record.msg, str):
            return True
        if not record.msg.startswith(_UNSENT_PREFIX):
            return True
        method = record.getMessage().removeprefix(_UNSENT_PREFIX).strip(" []") or "a call"
        record.msg = (
            "the answer of %s was not sent: the call had ended (its client cancelled it or its deadline passed)"
        )
        record.args = (method,)
        record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


_UNSENT = Unsent()


def quiet_unsent_answers() -> None:
    """Adds `Unsent` to gRPC's logger; a filter already there is not added again."""
    logging.getLogger(_GRPC_LOGGER).addFilter(_UNSENT)


class RefusedRequest(InvalidArgument):
    """A request refused as it is decoded, before its handler runs."""


class UndecodableRequest(RefusedRequest):
    """A request's bytes do not parse as the method's request message (or a string field in it is not UTF-8)."""

    reason = "UNDECODABLE_REQUEST"

    def __init__(self, method: str, exc: Exception) -> None:
        super().__init__(f"the request to {method} is not a valid protobuf message of its request type: {exc}")


class NulInText(RefusedRequest):
    """A string field of a request holds a NUL character, which PostgreSQL's text cannot store."""

    reason = "NUL_IN_TEXT"

    def __init__(self, field: str) -> None:
        super().__init__(
            f"{field} contains a NUL character (U+0000), which no name, label or text here may hold: remove it",
            field=field,
        )


def nul_field(message: Message, prefix: str = "") -> str | None:
    """The path of the first string in `message` (nested messages, lists and map keys and values included) that
    holds a NUL character, such as ``model.labels['team']``; None when there is none."""
    for field, value in message.ListFields():
        path = prefix + field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                where = f"{path}[{key!r}]"
                if (isinstance(key, str) and "\0" in key) or (isinstance(item, str) and "\0" in item):
                    return where
                if isinstance(item, Message) and (inner := nul_field(item, where + ".")) is not None:
                    return inner
        elif field.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
            for index, item in enumerate(value if field.is_repeated else (value,)):
                where = f"{path}[{index}]" if field.is_repeated else path
                if isinstance(item, str):
                    if "\0" in item:
                        return where
                elif (inner := nul_field(item, where + ".")) is not None:
                    return inner
    return None


def _decoding(
    method: str, deserializer: Callable[[bytes], Any] | None, streaming: bool, *, text_checked: bool = False
) -> Callable[[bytes], Any] | None:
    """`deserializer`, with a request that does not parse refused as UndecodableRequest, never left to gRPC,
    which would log a traceback and answer UNKNOWN; with `text_checked`, a request with a NUL in a string is
    refused as NulInText.

    A streamed request's error is raised where the handler reads it, so the handler's mapping answers it; a unary
    request is parsed before the handler runs, so its error is handed to the handler as the request, which raises
    it (see `_unary`).
    """
    if deserializer is None:  # the handler takes the bytes as they came
        return None
    parse = deserializer

    def decode(data: bytes) -> Any:
        try:
            request = parse(data)
        except DecodeError as exc:
            error: RefusedRequest = UndecodableRequest(method, exc)
        else:
            if not text_checked or (field := nul_field(request)) is None:
                return request
            error = NulInText(field)
        if streaming:
            raise error from None
        return error

    return decode


class ServerStopping(Unavailable):
    """A call that reached a stopping server: refused before its handler runs, so that its client retries it."""

    reason = "REPLICA_STOPPING"

    def __init__(self) -> None:
        super().__init__(
            "this server is shutting down and takes no new calls; retry (another replica, or this one once it is "
            "back, will answer)"
        )


class Gate:
    """Whether the mapped services' handlers take new calls; closed once, as the server stops (see Server.stop).

    gRPC itself ends the calls it holds but has not handed to a handler yet with a bare CANCELLED when the server
    stops, which no client retries. Closed first, the gate has each of them answered UNAVAILABLE instead.
    """

    __slots__ = ("closed", "refused")

    def __init__(self) -> None:
        self.closed = False
        self.refused = 0  # calls refused since it closed

    def refuse(self) -> ServerStopping:
        self.refused += 1
        return ServerStopping()


class Registrar:
    """What the generated ``add_*_to_server`` functions call instead of the server: wraps, then registers.

    Methods of the services named in `mapped` get the status mapping (errors of `domain`); every method, health
    and reflection included, gets the RPC metrics, and has a request that does not parse refused with
    INVALID_ARGUMENT. `text_checked`: the mapped services' requests with a NUL character in a string are refused
    too (services that store text in PostgreSQL). `intercepted`: the server runs interceptors, which take
    streaming handlers to be async generators (OpenTelemetry's does).
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        metrics: Metrics,
        *,
        domain: str,
        mapped: Iterable[str],
        text_checked: bool = False,
        intercepted: bool = False,
    ) -> None:
        self._server = server
        self._stream = _stream_yielding if intercepted else _stream
        self._metrics = metrics
        self._domain = domain
        self._mapped = frozenset(mapped)
        self._text_checked = text_checked
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}  # "/service/Method" -> its wrapped handler
        self.gate = Gate()
        quiet_unsent_answers()

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: self._wrap(f"/{service}/{name}", handler) for name, handler in handlers.items()}
        )

    def add_generic_rpc_handlers(self, generic_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(tuple(_Generic(handler, self) for handler in generic_handlers))

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The wrapped handler of `method`, built once however often it is looked up."""
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            wrapped = self._wrapped[method] = self._build(method, handler)
        return wrapped

    def _build(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        service, _, name = method.lstrip("/").partition("/")
        children = _MethodMetrics(self._metrics, service, name)
        mapped = service in self._mapped
        drain = _DRAIN_SECONDS if handler.request_streaming else 0.0
        shape = f"{'stream' if handler.request_streaming else 'unary'}_"
        shape += "stream" if handler.response_streaming else "unary"
        behavior = getattr(handler, shape)
        streams = handler.response_streaming and inspect.isasyncgenfunction(behavior)
        wrap = self._stream if streams else _unary  # a streaming method may also be a coroutine writing with write()
        return _FACTORIES[shape](
            wrap(behavior, children, self._domain, mapped, drain, self.gate if mapped else None),
            request_deserializer=_decoding(
                method,
                handler.request_deserializer,
                handler.request_streaming,
                text_checked=self._text_checked and mapped,
            ),
            response_serializer=handler.response_serializer,
        )


class _Generic(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc has no type stubs
    """A generic handler whose answers are the registrar's wrapped handlers."""

    def __init__(self, inner: grpc.GenericRpcHandler, registrar: Registrar) -> None:
        self._inner = inner
        self._registrar = registrar

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        return self._registrar._wrap(handler_call_details.method, handler)


class _MethodMetrics:
    """The labelled children of one method, looked up once: `labels()` takes a lock and hashes every call."""

    __slots__ = ("_metrics", "_method", "_requests", "_service", "duration", "in_flight", "rpc")

    def __init__(self, metrics: Metrics, service: str, method: str) -> None:
        self._metrics, self._service, self._method = metrics, service, method
        self.rpc = f"/{service}/{method}"
        """The method's full name, for log lines about its calls."""
        self.in_flight = metrics.rpc_in_flight.labels(service, method)
        self.duration = metrics.rpc_duration.labels(service, method)
        self._requests: dict[grpc.StatusCode, Any] = {}

    def end(self, code: grpc.StatusCode, started: float) -> None:
        self.in_flight.dec()
        self.duration.observe(time.perf_counter() - started)
        child = self._requests.get(code)
        if child is None:
            child = self._requests[code] = self._metrics.rpc_requests.labels(self._service, self._method, code.name)
        child.inc()


def _unary(
    behavior: Behavior, children: _MethodMetrics, domain: str, mapped: bool, drain: float, gate: Gate | None
) -> Behavior:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        children.in_flight.inc()
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            if isinstance(request, RefusedRequest):
                raise request
            if gate is not None and gate.closed:
                raise gate.refuse()
            response = await behavior(request, context)
            code = _final_code(context, grpc.StatusCode.OK)
            return response
        except grpc.aio.AbortError:
            code = _final_code(context, grpc.StatusCode.UNKNOWN)
            raise
        except asyncio.CancelledError:
            code = _cancelled(context)
            raise
        except Exception as exc:
            if not (mapped or isinstance(exc, RefusedRequest)):
                raise
            try:
                await _refuse(request, context, exc, domain, drain, children.rpc)
            finally:
                code = _final_code(context, grpc.StatusCode.UNKNOWN)
        finally:
            children.end(code, started)

    return call


def _stream(
    behavior: Behavior, children: _MethodMetrics, domain: str, mapped: bool, drain: float, gate: Gate | None
) -> Behavior:
    """A streaming method's async generator, run by a coroutine that writes its answers itself (see `_write`)."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> None:
        async with (
            _streaming(children, request, context, domain, mapped, drain, gate),
            contextlib.aclosing(behavior(request, context)) as responses,
        ):
            async for response in responses:
                await _write(context, response)

    return call


def _stream_yielding(
    behavior: Behavior, children: _MethodMetrics, domain: str, mapped: bool, drain: float, gate: Gate | None
) -> Behavior:
    """`_stream` for a server with interceptors: OpenTelemetry's iterates a streaming handler's answers itself."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _streaming(children, request, context, domain, mapped, drain, gate):
            async for response in behavior(request, context):
                yield response

    return call


@contextlib.asynccontextmanager
async def _streaming(
    children: _MethodMetrics,
    request: Any,
    context: grpc.aio.ServicerContext,
    domain: str,
    mapped: bool,
    drain: float,
    gate: Gate | None,
) -> AsyncIterator[None]:
    """A streaming call's metrics and status mapping, as `_unary` applies them (inline there: it runs per request)."""
    children.in_flight.inc()
    started = time.perf_counter()
    code = grpc.StatusCode.UNKNOWN
    try:
        if isinstance(request, RefusedRequest):  # a unary request refused as it was decoded (see _decoding)
            raise request
        if gate is not None and gate.closed:
            raise gate.refuse()
        yield
        code = _final_code(context, grpc.StatusCode.OK)
    except grpc.aio.AbortError:
        code = _final_code(context, grpc.StatusCode.UNKNOWN)
        raise
    except (asyncio.CancelledError, GeneratorExit):
        code = _cancelled(context)
        raise
    except ExecuteBatchError:
        raise  # the transport failed under a client still there: gRPC's to report
    except Exception as exc:
        if not (mapped or isinstance(exc, RefusedRequest)):
            raise
        try:
            await _refuse(request, context, exc, domain, drain, children.rpc)
        finally:
            code = _final_code(context, grpc.StatusCode.UNKNOWN)
    finally:
        children.end(code, started)


async def _write(context: grpc.aio.ServicerContext, response: Any) -> None:
    """Sends one answer of a stream.

    When the client has gone, the write fails, often before gRPC has heard that the client cancelled; raised then,
    gRPC would log the failure as an error with a traceback. The write waits for the cancellation instead (gRPC
    cancels the call's task as soon as it hears it), so that a client leaving is the CANCELLED it is.
    """
    try:
        await context.write(response)
    except ExecuteBatchError:
        await asyncio.sleep(_CANCELLATION_SECONDS)
        raise


async def _refuse(
    request: Any, context: grpc.aio.ServicerContext, exc: Exception, domain: str, drain: float, rpc: str
) -> NoReturn:
    """Ends a call of method `rpc` that raised with the status `exc` maps to; a client-streaming one after draining
    it."""
    if drain:
        await _drain(context, drain)
    await abort(context, exc, domain, rpc)


async def _drain(context: grpc.aio.ServicerContext, seconds: float) -> None:
    """Reads and drops what a client is still sending, for at most `seconds`, before a refusal is answered.

    A grpc.aio client whose call ends while it is still writing reports INTERNAL ("Internal error from Core")
    instead of the server's status (grpc/grpc#36066). An upload refused early (over the size limit, a bad header,
    a message that does not parse) is therefore answered once the client has sent its last message, or after
    `seconds`: the client sees the real code and reason, and nothing it sent is kept. It reads from the call
    itself: the handler's request iterator ends at a message that does not parse.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                try:
                    if await context.read() is grpc.aio.EOF:
                        return
                except RefusedRequest:
                    continue  # dropped like the rest
                except Exception:  # the call has ended (the client cancelled it, or it was aborted)
                    return


def _cancelled(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The code of a call gRPC cancelled: DEADLINE_EXCEEDED when its deadline has passed, else CANCELLED (the
    client went away); put on the call's span too, which the tracing interceptor would leave OK."""
    remaining = context.time_remaining()
    code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    telemetry.end_current_span(code)
    return code


def _final_code(context: grpc.aio.ServicerContext, default: grpc.StatusCode) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some grpc versions hand back the integer value
        return next((c for c in grpc.StatusCode if c.value[0] == code), default)
    return default
