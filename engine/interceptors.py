"""Call guards: every RPC runs inside a span, behind authentication, authorisation by service, the
caller's quota, and a net that turns bugs into a plain INTERNAL.

They wrap each method's handler once, when the services are registered (``GuardedRegistry``), rather
than as grpc interceptors, which grpc.aio runs per call: an interceptor chain, its coroutines and a
freshly wrapped handler cost 50-70 us a call, a sixth of a bare unary call's server CPU.

- ``ErrorGuard`` (outermost): a server span per call, continuing the caller's W3C trace context
  from the metadata; an unexpected exception is logged (type and stack, never its message, which may
  carry personal data) and the caller gets INTERNAL "internal error" with the trace id to quote,
  never a traceback. Expected statuses (``context.abort``) and cancellations pass untouched.
- ``AuthGuard``: ``authorization: Bearer <key>`` → principal (UNAUTHENTICATED otherwise), the
  coarse per-service rule (PERMISSION_DENIED), the quota (RESOURCE_EXHAUSTED with a retry hint), then
  binds the principal for ``engine.auth.current_principal()``. Health and reflection stay open.

Both wrap the method handler grpc found, keeping its shape (unary or streaming, coroutine or async
generator): grpc.aio picks how to drive a handler from that shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import traceback
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2  # type: ignore[import-untyped]
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from common.clock import Clock
from common.settings import Settings
from common.telemetry import Telemetry, current_trace_ids, extract_trace_context
from engine.auth import (
    OPEN_SERVICES,
    KeyStore,
    Principal,
    PrincipalKind,
    bearer_key,
    bind_principal,
    current_principal,
    unbind_principal,
)
from engine.quota import QuotaLimit, QuotaLimiter

log = logging.getLogger(__name__)

# grpc-stubs make these generic; the runtime classes are not subscriptable.
if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    # What a guard runs each call inside: ``async with call_guard(context):``.
    CallGuard = Callable[[Context], contextlib.AbstractAsyncContextManager[None]]
    RequestFilter = Callable[[AsyncIterator[Any]], AsyncIterator[Any]]
    GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:
    GenericHandler = grpc.GenericRpcHandler

RETRY_AFTER_HEADER = "retry-after-ms"


def service_of(method: str) -> str:
    """``/relais.v1.TrackingService/StreamEvents`` → ``relais.v1.TrackingService``."""
    return method.lstrip("/").partition("/")[0]


# --- wrapping handlers --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands in for a request body that does not parse, so grpc does not answer UNKNOWN with the
    parser's message: the handler turns it into INVALID_ARGUMENT."""

    type_name: str


class UndecodableRequestError(Exception):
    def __init__(self, type_name: str) -> None:
        super().__init__(f"the request body is not a valid {type_name}")


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None
    owner = getattr(deserialize, "__self__", None)
    type_name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request message")

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError:
            return Undecodable(type_name)

    return decode


def _check(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise UndecodableRequestError(request.type_name)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _check(request)


def _requests(request: Any, streamed: bool, each: RequestFilter | None) -> Any:
    if not streamed:
        return _check(request)
    requests = _checked_stream(request)
    return requests if each is None else each(requests)


def _unary_response(
    behavior: Callable[..., Any], guard: CallGuard, streamed: bool, each: RequestFilter | None
) -> Callable[..., Any]:
    async def handle(request: Any, context: Context) -> Any:
        async with guard(context):
            result = behavior(_requests(request, streamed, each), context)
            if inspect.isawaitable(result):
                result = await result
            return result

    return handle


def _stream_response(
    behavior: Callable[..., Any], guard: CallGuard, streamed: bool, each: RequestFilter | None
) -> Callable[..., Any]:
    async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
        async with guard(context):
            result = behavior(_requests(request, streamed, each), context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            elif inspect.isawaitable(result):
                # A coroutine handler that answers with context.write().
                await result
            elif result is not None:
                for item in result:
                    yield item

    return handle


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any],
    guard: CallGuard,
    *,
    safe_decoding: bool = False,
    each_request: RequestFilter | None = None,
) -> grpc.RpcMethodHandler[Any, Any]:
    """The same handler, each call run inside ``guard(context)``. With ``safe_decoding`` a body that
    does not parse reaches the handler as ``Undecodable`` (raised as ``UndecodableRequestError``);
    ``each_request`` wraps the request stream of client-streaming calls."""
    decode = handler.request_deserializer
    if safe_decoding:
        decode = _safe_deserializer(decode)
    encode = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _unary_response(handler.unary_unary, guard, False, None), decode, encode
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _unary_response(handler.stream_unary, guard, True, each_request), decode, encode
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _stream_response(handler.unary_stream, guard, False, None), decode, encode
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(
        _stream_response(handler.stream_stream, guard, True, each_request), decode, encode
    )


def _metadata(context: Context) -> dict[str, str]:
    return {name: value for name, value in context.invocation_metadata() or () if isinstance(value, str)}


# --- errors and spans ---------------------------------------------------------------------------------


class ErrorGuard:
    def __init__(self, telemetry: Telemetry) -> None:
        self._tracer = telemetry.tracer
        self._tracing = telemetry.tracer_provider is not None

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        service, _, name = method.lstrip("/").partition("/")
        tracing = self._tracing

        def server_span(context: Context) -> contextlib.AbstractContextManager[trace.Span]:
            if not tracing:
                # The no-op tracer's span costs ~6 us a call (a context attach and detach) for nothing.
                return contextlib.nullcontext(trace.INVALID_SPAN)
            # Only the traceparent/tracestate headers are read; nothing else of the metadata reaches a span.
            return self._tracer.start_as_current_span(
                method.lstrip("/"),
                context=extract_trace_context(_metadata(context)),
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
                # Exception messages may carry personal data: never recorded on a span.
                record_exception=False,
                set_status_on_exception=False,
            )

        @contextlib.asynccontextmanager
        async def guard(context: Context) -> AsyncIterator[None]:
            with server_span(context) as span:
                try:
                    yield
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    _record_status(span, context)
                    raise
                except UndecodableRequestError as exc:
                    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.INVALID_ARGUMENT.value[0])
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    # Redis away is an outage, not a bug: the caller should retry, with backoff.
                    log.warning("%s in %s: storage unavailable", type(exc).__name__, method)
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.UNAVAILABLE.value[0])
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "storage unavailable; retry later")
                except Exception as exc:
                    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                    span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.INTERNAL.value[0])
                    await context.abort(grpc.StatusCode.INTERNAL, _internal_error(method, exc))
                else:
                    _record_status(span, context)

        return wrap_handler(handler, guard, safe_decoding=True)


# Server-side statuses that mean a fault of the server, not of the request.
_SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


def _record_status(span: trace.Span, context: Context) -> None:
    """The call's status code on its span; ``code()`` is None when the handler set none (OK)."""
    code = context.code()
    if code is None:
        code = grpc.StatusCode.OK
    if isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, code.name))


def _internal_error(method: str, exc: BaseException) -> str:
    """Log the bug without its message (it may quote personal data); tell the caller only where to look."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unexpected %s in %s\n%s", type(exc).__name__, method, stack)
    ids = current_trace_ids()
    return f"internal error (trace {ids[0]})" if ids else "internal error"


# --- authentication, authorisation, quota -------------------------------------------------------------


class AuthGuard:
    def __init__(self, keys: KeyStore, quota: QuotaLimiter | None = None) -> None:
        self._keys = keys
        self._quota = quota

    def wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        service = service_of(method)
        if service in OPEN_SERVICES:
            return handler
        # A stream is charged per message (a carrier's batches), a unary call once.
        streaming = handler.stream_unary is not None or handler.stream_stream is not None

        @contextlib.asynccontextmanager
        async def guard(context: Context) -> AsyncIterator[None]:
            key = bearer_key(context.invocation_metadata())
            principal = self._keys.authenticate(key) if key else None
            if principal is None:
                what = "an unknown API key" if key else "no API key (authorization: Bearer <key>)"
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, what)
            if not principal.may_call(service):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{principal.kind.value} callers may not call {service}",
                )
            if not streaming:
                wait_ms = await self._charge(principal)
                if wait_ms:
                    await _refuse(principal, wait_ms, context)
            token = bind_principal(principal)
            try:
                yield
            except QuotaExceededError as exc:
                await _refuse(principal, exc.retry_after_ms, context)
            finally:
                # A generator closed from another context cannot reset; the call's context dies anyway.
                with contextlib.suppress(ValueError):
                    unbind_principal(token)

        def charged(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            principal = current_principal()  # bound by the guard, which the stream runs inside
            assert principal is not None
            return self._charged(principal, requests)

        return wrap_handler(handler, guard, each_request=charged if self._quota else None)

    async def _charged(self, principal: Principal, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            wait_ms = await self._charge(principal)
            if wait_ms:
                raise QuotaExceededError(wait_ms)
            yield request

    async def _charge(self, principal: Principal) -> int:
        """Charge one request: 0 when allowed, else the milliseconds to wait."""
        if self._quota is None:
            return 0
        return (await self._quota.check(principal)).retry_after_ms


class QuotaExceededError(Exception):
    """Raised from a request stream over quota; the call ends RESOURCE_EXHAUSTED."""

    def __init__(self, retry_after_ms: int) -> None:
        super().__init__(f"retry in {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


async def _refuse(principal: Principal, retry_after_ms: int, context: Context) -> None:
    message = f"request quota of {principal} exceeded; retry in {retry_after_ms} ms"
    await context.abort(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        message,
        trailing_metadata=_retry_metadata(message, retry_after_ms),
    )


def _retry_metadata(message: str, retry_after_ms: int) -> tuple[tuple[str, str | bytes], ...]:
    """A plain ``retry-after-ms`` header, and the standard google.rpc.RetryInfo in the status details."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(retry_after_ms)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    return (
        (RETRY_AFTER_HEADER, str(retry_after_ms)),
        ("grpc-status-details-bin", status.SerializeToString()),
    )


# --- composition --------------------------------------------------------------------------------------


def quota_limits(settings: Settings) -> dict[PrincipalKind, QuotaLimit]:
    security = settings.security
    return {
        PrincipalKind.CARRIER: QuotaLimit(security.quota_carrier_rps, security.quota_carrier_burst),
        PrincipalKind.MERCHANT: QuotaLimit(security.quota_merchant_rps, security.quota_merchant_burst),
        PrincipalKind.OPERATOR: QuotaLimit(security.quota_operator_rps, security.quota_operator_burst),
    }


class Guard(Protocol):
    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]: ...


def build_guards(settings: Settings, redis: Redis, clock: Clock, telemetry: Telemetry) -> list[Guard]:
    """The guards, outermost first: errors and spans always; authentication and quotas when a keys
    file is configured."""
    guards: list[Guard] = [ErrorGuard(telemetry)]
    if settings.security.keys_file is not None:
        store = KeyStore.load(settings.security.keys_file)
        quota = QuotaLimiter(redis, clock, quota_limits(settings), shards=settings.shards)
        guards.append(AuthGuard(store, quota))
    return guards


class _GuardedGenericHandler(GenericHandler):
    """A service's generic handler whose method handlers come out guarded, each wrapped once."""

    def __init__(self, inner: GenericHandler, wrap: Callable[[str, Any], Any]) -> None:
        self._inner = inner
        self._wrap = wrap
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = self._inner.service(handler_call_details)
            if handler is None:
                # Not remembered: callers choose the method names, and unknown ones are unbounded.
                return None
            wrapped = self._wrapped[method] = self._wrap(method, handler)
        return wrapped


class GuardedRegistry(grpc.aio.Server):
    """Stands for the server where services register (``add_*Servicer_to_server``, health,
    reflection): every handler they add reaches the server wrapped in the guards, outermost first.
    It is a ``grpc.aio.Server`` because registration helpers choose their asyncio flavour by type
    (reflection does); everything else goes to the real server."""

    def __init__(self, server: grpc.aio.Server, guards: Sequence[Guard]) -> None:
        self._server = server
        self._guards = guards

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        for guard in reversed(self._guards):
            handler = guard.wrap(method, handler)
        return handler

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[GenericHandler]) -> None:
        guarded = [_GuardedGenericHandler(h, self._wrap) for h in generic_rpc_handlers]
        self._server.add_generic_rpc_handlers(guarded)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {name: self._wrap(f"/{service_name}/{name}", h) for name, h in method_handlers.items()}
        server: Any = self._server  # grpc-stubs predate registered methods (grpcio 1.63)
        server.add_registered_method_handlers(service_name, wrapped)

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None = None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - grpc's signature
        return await self._server.wait_for_termination(timeout)
