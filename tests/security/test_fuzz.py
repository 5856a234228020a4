"""Fuzzing the contracts: random and malformed messages for every RPC the engine serves, and random
bytes as request bodies. Whatever comes in, the answer is a status that names the caller's mistake
(never UNKNOWN or INTERNAL, never a traceback) and the server stays healthy.

The server runs in the test's event loop; hypothesis drives a synchronous gRPC client in a worker
thread, so each example is one real call over loopback.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from relais.v1 import alerts_pb2, parcel_pb2, preferences_pb2, tracking_pb2

from common.clock import ManualClock
from common.settings import SecuritySettings
from engine.app import build_engine
from engine.services import SERVICE_NAMES
from tests.security.conftest import KEYS, serving, settings_with

FILES = (tracking_pb2, parcel_pb2, preferences_pb2, alerts_pb2)
MAX_DEPTH = 3
# Statuses that would mean the server, not the request, is at fault.
SERVER_FAULTS = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Values that reach real code paths (known ids, zones, locales) mixed with hostile ones: header and
# markup injection, bidi overrides, NUL, very long strings.
PLAUSIBLE = [
    "p1",
    "acme",
    "acme/r1",
    "swisspost",
    "e1",
    "fr-CH",
    "Europe/Paris",
    "+41791234567",
    "someone@example.org",
    "CH",
    "https://push.example/abc",
    "quiet_hours",
    "email,phone",
]
HOSTILE = [
    "",
    "x\r\nBcc: victim@example.org",
    "<script>alert(1)</script>{{ 7*7 }}",
    "\u202egnp.exe",
    "a\x00b",
    "../../etc/passwd",
    "Z" * 300,
    "🚚" * 40,
]
TEXT = st.one_of(st.sampled_from(PLAUSIBLE), st.sampled_from(HOSTILE), st.text(max_size=40))

_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: TEXT,
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=40),
    # proto3 enums are open: unknown numbers must be handled too.
    FieldDescriptor.TYPE_ENUM: st.one_of(st.integers(0, 12), st.integers(-(2**31), 2**31 - 1)),
}

# Timestamps: around now, far away, and out of the range datetime can hold.
_SECONDS = st.one_of(
    st.integers(1_700_000_000, 1_900_000_000), st.integers(-(2**40), 2**40), st.sampled_from([0, -1])
)


def _single(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        if field.message_type.full_name == "google.protobuf.Timestamp":
            return st.builds(
                lambda s, n: {"seconds": s, "nanos": n}, _SECONDS, st.integers(-(2**31), 2**31 - 1)
            )
        return messages(field.message_type, depth + 1)
    return _SCALARS[field.type]


def _field(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(_single(key, depth), _single(value, depth), max_size=3)
    if field.is_repeated:
        return st.lists(_single(field, depth), max_size=4)
    return _single(field, depth)


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if isinstance(value, dict) and is_map:
        for key, item in value.items():
            if isinstance(item, Message):
                target[key].CopyFrom(item)
            else:
                target[key] = item
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, Message):
                target.add().CopyFrom(item)
            elif isinstance(item, dict):
                target.add(**item)
            else:
                target.append(item)
    elif isinstance(value, Message):
        target.CopyFrom(value)
    elif isinstance(value, dict):
        for name, item in value.items():
            setattr(target, name, item)
    else:
        setattr(message, field.name, value)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type: each field set or not, with random and hostile values."""
    cls = GetMessageClass(descriptor)
    if depth >= MAX_DEPTH:
        return st.builds(cls)
    optional = {field.name: _field(field, depth) for field in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            _assign(message, descriptor.fields_by_name[name], value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)


def methods() -> Iterator[MethodDescriptor]:
    for module in FILES:
        for service in module.DESCRIPTOR.services_by_name.values():
            yield from service.methods


def call(
    channel: grpc.Channel, method: MethodDescriptor, body: Any, metadata: Any, *, raw: bool
) -> grpc.StatusCode:
    """One call and the status it got; raises AssertionError when the server answered with a fault."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    encode = None if raw else (lambda m: m.SerializeToString())
    decode = GetMessageClass(method.output_type).FromString
    streaming_in, streaming_out = method.client_streaming, method.server_streaming
    try:
        if streaming_in:
            stream = channel.stream_stream(path, request_serializer=encode, response_deserializer=decode)
            for _answer in stream(iter(body), metadata=metadata, timeout=10):
                pass
        else:
            unary = channel.unary_unary(path, request_serializer=encode, response_deserializer=decode)
            assert not streaming_out
            unary(body, metadata=metadata, timeout=10)
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
        assert code not in SERVER_FAULTS, f"{path} answered {code}: {details}"
        assert "Traceback" not in details
        return code
    return grpc.StatusCode.OK


def fuzz_method(channel: grpc.Channel, method: MethodDescriptor, seen: Counter[grpc.StatusCode]) -> None:
    """Typed random messages from each kind of caller, then random bytes as the body."""
    principals = st.sampled_from(["operator", "merchant:acme", "carrier:swisspost", "merchant:globex"])
    request = messages(method.input_type)
    raw_body: st.SearchStrategy[Any] = st.binary(max_size=64)
    if method.client_streaming:
        request, raw_body = st.lists(request, max_size=3), st.lists(raw_body, max_size=3)  # type: ignore[assignment]

    @FUZZ
    @given(body=request, who=principals)
    def typed(body: Any, who: str) -> None:
        seen[call(channel, method, body, (("authorization", f"Bearer {KEYS[who]}"),), raw=False)] += 1

    @FUZZ
    @given(body=raw_body)
    def raw(body: Any) -> None:
        seen[call(channel, method, body, (("authorization", f"Bearer {KEYS['operator']}"),), raw=True)] += 1

    typed()
    raw()


def fuzz_everything(port: int) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        for method in methods():
            seen: Counter[grpc.StatusCode] = Counter()
            fuzz_method(channel, method, seen)
            # The calls reached a servicer and it answered (not just the parser or a missing service),
            # and typed requests got through validation at least sometimes.
            assert seen[grpc.StatusCode.UNIMPLEMENTED] == 0, method.full_name
            assert seen.keys() - {grpc.StatusCode.INVALID_ARGUMENT}, (method.full_name, seen)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()


def test_every_rpc_of_the_contracts_is_fuzzed() -> None:
    fuzzed = {m.containing_service.full_name for m in methods()}
    assert fuzzed == set(SERVICE_NAMES)


async def test_random_and_malformed_requests_never_fault_the_server(
    redis: Redis, clock: ManualClock, keys_file: Path
) -> None:
    security = SecuritySettings(keys_file=keys_file, quota_carrier_rps=0, quota_merchant_rps=0)
    settings = settings_with(security)
    register = build_engine(settings, redis, clock).register
    async with serving(settings, redis, clock, register) as running:
        await asyncio.to_thread(fuzz_everything, running.port)
