"""Every Redis key relais uses, built in one place, each with the reason it exists.

All keys of one parcel, its pending notices, its shard's due set and outbox stream carry the same
hash tag ``{s}`` with ``s = crc32(parcel_id) % shards``, so one Lua script can touch them atomically
on a single Redis and, unchanged, on a Redis Cluster. Recipient keys use the same tag space, keyed by
the recipient id. Sections belong to the component that writes the keys; readers import them from
here.
"""

from __future__ import annotations

import functools
import zlib

from relais.v1 import types_pb2

PREFIX = "relais:"


def shard_of(ident: str, shards: int) -> int:
    """The shard tag of a parcel (or a recipient): stable across processes and languages."""
    return zlib.crc32(ident.encode()) % shards


@functools.cache  # a few shards, built for every key of every parcel
def tag(shard: int) -> str:
    return "{" + str(shard) + "}"


# --- engine: parcels and their notices -------------------------------------------------------------


def parcel(shard: int, parcel_id: str) -> str:
    """Hash of one parcel: its state (protobuf), version for optimistic checks, and its notices.

    Fields (written by ``common/lua/apply.lua``; the engine's ``engine/state.py`` names them):
    ``v`` version (integer string, bumped by every engine write), ``s`` the ``ParcelState`` protobuf,
    ``q`` the notice kinds the engine scheduled (comma-separated, to check the due set in one read),
    ``n:<KIND>`` the ``Notice`` body that should go out, ``nv:<KIND>`` its version, ``ns:<KIND>`` set
    to ``CANCELLED`` / ``SUPPRESSED`` when the notice was withdrawn (its body is then removed), and
    ``a:<KIND>`` the gateway's delivery attempts. Finished parcels carry a TTL of the retention.
    """
    return f"{PREFIX}p:{tag(shard)}:{parcel_id}"


_KIND_NAMES = {value: name.removeprefix("NOTICE_KIND_") for name, value in types_pb2.NoticeKind.items()}
_CHANNEL_NAMES = {value: name.removeprefix("CHANNEL_").lower() for name, value in types_pb2.Channel.items()}


def kind_name(kind: types_pb2.NoticeKind.ValueType) -> str:
    """``NOTICE_KIND_SLOT_ANNOUNCED`` → ``SLOT_ANNOUNCED``: the KIND of notice ids, parcel hash fields
    and counter labels."""
    name = _KIND_NAMES.get(kind)
    return name if name is not None else types_pb2.NoticeKind.Name(kind)  # unknown: ValueError


def channel_name(channel: types_pb2.Channel.ValueType) -> str:
    """``CHANNEL_EMAIL`` → ``email``: the channel in idempotency keys, counter labels and logs."""
    name = _CHANNEL_NAMES.get(channel)
    return name if name is not None else types_pb2.Channel.Name(channel)  # unknown: ValueError


def notice_id(parcel_id: str, kind_name: str) -> str:
    """Member of ``due`` and ``Notice.notice_id``: ``<parcel_id>:<KIND>`` (split at the LAST ':').

    Internal timers use the same form with a kind that is not a NoticeKind (e.g. ``CHECK_DELAYED``):
    they carry no ``n:<KIND>`` body, so the scheduler's claim skips them and their owner acts on them.
    """
    return f"{parcel_id}:{kind_name}"


def due(shard: int) -> str:
    """Sorted set of pending notices of a shard: score = due time (unix ms), member = notice id."""
    return f"{PREFIX}due:{tag(shard)}"


def outbox(shard: int) -> str:
    """Stream of notices that are due, read by the gateways' consumer group."""
    return f"{PREFIX}outbox:{tag(shard)}"


# Pub/sub channel: a write that adds to a due set publishes the earliest due time (unix ms, decimal)
# it added. The scheduler runs in one engine worker while every worker ingests, so a notice due now
# must wake it across processes, or it would wait out the dispatcher's sleep. Not a key, so no shard
# tag: a lost message (no subscriber, a reconnect) costs latency only, the dispatcher still polls.
SCHEDULER_WAKE_CHANNEL = f"{PREFIX}due-wake"
OUTBOX_GROUP = "gateway"
# The parcel hash's state field (``ParcelState``), which the gateway reads for a late slot notice.
PARCEL_STATE_FIELD = "s"


# --- engine: recipients ----------------------------------------------------------------------------


def preferences(shard: int, recipient_id: str) -> str:
    """A recipient's preferences (protobuf RecipientPreferences). Personal data: erased on request."""
    return f"{PREFIX}rcp:{tag(shard)}:{recipient_id}"


def recipient_parcels(shard: int, recipient_id: str) -> str:
    """Hash of a recipient's parcel ids -> when each was indexed (``engine.recipient_index``): to
    re-plan on a preference change and to erase."""
    return f"{PREFIX}rcp-parcels:{tag(shard)}:{recipient_id}"


# --- gateway ---------------------------------------------------------------------------------------


def dead_letters(shard: int) -> str:
    """Stream of notices out of retries, for an operator to list and replay."""
    return f"{PREFIX}dlq:{tag(shard)}"


def idempotency(shard: int, idempotency_key: str) -> str:
    """Claim of one send (notice id + version + channel): at most one send per key."""
    return f"{PREFIX}idem:{tag(shard)}:{idempotency_key}"


# One GCRA script call evaluates a whole batch's limits atomically (all of an entry's keys or none), so
# every limiter key shares this one tag. Each is a single small string; a batch costs one call.
LIMITS_TAG = "{limits}"


def rate_limit(scope: str, ident: str) -> str:
    """GCRA state (theoretical arrival time, ms) of one limit: scope ``provider``, ``recipient`` or
    ``merchant``."""
    return f"{PREFIX}rl:{LIMITS_TAG}:{scope}:{ident}"


def sms_budget(merchant_id: str, month: str, shards: int) -> str:
    """SMS segments a merchant spent in a calendar month (``YYYY-MM``, UTC), against its budget."""
    return f"{PREFIX}sms:{tag(shard_of(merchant_id, shards))}:{merchant_id}:{month}"


# --- engine: alerts and counters -------------------------------------------------------------------


def alerts(shard: int, parcel_id: str) -> str:
    """Hash of a parcel's alerts: alert id -> Alert (protobuf), ``cur:<KIND>`` -> latest n, ``v``
    version for the compare-and-set script, ``t`` the scheduled check time (ms)."""
    return f"{PREFIX}al:{tag(shard)}:{parcel_id}"


def alert_index(shard: int, merchant_id: str, kind: str, state: str) -> str:
    """Sorted set (all scores 0, members ``<inverted opened ms>|<alert id>``) of one merchant's alerts
    of one rule and state on this shard: lexicographic order is newest first, exact for paging."""
    return f"{PREFIX}al-idx:{tag(shard)}:{merchant_id}:{kind}:{state}"


def alert_feed(shard: int) -> str:
    """Stream of alerts as they open, read by the digest sender's consumer group."""
    return f"{PREFIX}al-feed:{tag(shard)}"


ALERT_FEED_GROUP = "digest"


def stats(shard: int, merchant_id: str, day: str) -> str:
    """Hash of one merchant's counters for one UTC day (``YYYYMMDD``) on this shard; merchant ``*``
    adds all merchants up. Sharded like the parcel that caused the count, so it is incremented in the
    same script or pipeline as the change."""
    return f"{PREFIX}st:{tag(shard)}:{merchant_id}:{day}"


def stats_total(shard: int) -> str:
    """Hash of all-time counters of this shard: the monotonic totals exported as metrics."""
    return f"{PREFIX}st-total:{tag(shard)}"


# --- security: per-caller request quotas -----------------------------------------------------------


def quota(principal: str, shards: int) -> str:
    """GCRA state (theoretical arrival time, ms) of one caller's request quota (``merchant:acme``)."""
    return f"{PREFIX}quota:{tag(shard_of(principal, shards))}:{principal}"
