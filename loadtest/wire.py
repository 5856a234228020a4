"""Fast wire encoding of event batches, so the load generator is not the bottleneck.

Building a million ``TrackingEvent`` messages field by field costs the client more CPU than the
server spends applying them. Within one batch every event of a step shares everything but its ids
and carrier (same send time, so the same timestamps and windows), so that shared part is serialized
once per batch and each event is ``<ids and carrier> + <shared part>``: protobuf allows fields in any
order, and the result parses to exactly the message ``journeys.Group.next_batch`` builds (a test
checks it). The bytes go out through a gRPC method without serializer.
"""

from __future__ import annotations

from collections.abc import Sequence

from relais.v1 import tracking_pb2

from loadtest.journeys import Group, Journey, to_event

# Field numbers of TrackingEvent and EventBatch (proto/relais/v1/tracking.proto).
_EVENT_ID, _PARCEL_ID, _CARRIER = 1, 2, 3
_BATCH_SEQ, _BATCH_EVENTS = 1, 2
_LEN = 2  # wire type of length-delimited fields


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Lengths below 128 are one byte: looked up, not computed, on the hot path.
_SMALL = [bytes((n,)) for n in range(128)]
_TAGS = {n: _varint(n << 3 | _LEN) for n in (_EVENT_ID, _PARCEL_ID, _CARRIER, _BATCH_EVENTS)}


def _len(payload: bytes) -> bytes:
    n = len(payload)
    return _SMALL[n] if n < 128 else _varint(n)


def _field(number: int, payload: bytes) -> bytes:
    return _TAGS[number] + _len(payload) + payload


def encode_stage(seq: int, journeys: Sequence[Journey], stage: int, now_ms: int) -> tuple[bytes, int]:
    """The serialized EventBatch of ``stage`` for the journeys still running, and its event count."""
    shared: dict[int, bytes] = {}
    parts = [_varint(_BATCH_SEQ << 3) + _varint(seq)] if seq else []
    count = 0
    suffix = b":" + str(stage).encode()
    for journey in journeys:
        if stage >= len(journey.steps):
            continue
        tail = shared.get(id(journey.steps[stage]))
        if tail is None:
            template = to_event(journey, stage, now_ms)
            template.ClearField("event_id")
            template.ClearField("parcel_id")
            template.ClearField("carrier")
            tail = template.SerializeToString()
            shared[id(journey.steps[stage])] = tail
        pid = journey.parcel_id.encode()
        event = b"".join(
            (
                _field(_EVENT_ID, pid + suffix),
                _field(_PARCEL_ID, pid),
                _field(_CARRIER, journey.carrier.encode()),
                tail,
            )
        )
        parts.append(_field(_BATCH_EVENTS, event))
        count += 1
    return b"".join(parts), count


def decode_ack(data: bytes) -> tracking_pb2.BatchAck:
    return tracking_pb2.BatchAck.FromString(data)


def encode_next(group: Group, seq: int, now_ms: int) -> tuple[bytes, int]:
    """``group.next_batch`` as bytes: encodes the current stage, then advances the group."""
    data, count = encode_stage(seq, group.journeys, group.stage, now_ms)
    group.stage += 1
    return data, count
