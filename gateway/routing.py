"""Which channels a notice may take, in which order, to which addresses. Pure: no IO, no clock.

The order is the recipient's (default push, email, SMS). A channel is skipped when the recipient has
no address for it, when it already rejected the recipient for good (``Notice.failed_channels``), or,
for SMS, unless the recipient opted in, the notice is worth a text (declared value at or above the
threshold, or a slot notice for today in the recipient's zone) and the merchant's monthly budget is
not spent. In quiet hours (only reached for a notice that cannot wait past its deadline) email comes
first: it does not ring.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeAlias

from relais.v1 import notice_pb2, preferences_pb2, types_pb2

from channels.base import (
    ApnsToken,
    Destination,
    EmailAddress,
    FcmToken,
    PhoneNumber,
    WebPushSubscription,
)
from common.quiet_hours import zone

ChannelKind: TypeAlias = types_pb2.Channel.ValueType

PUSH = types_pb2.CHANNEL_PUSH
EMAIL = types_pb2.CHANNEL_EMAIL
SMS = types_pb2.CHANNEL_SMS
DEFAULT_ORDER: tuple[ChannelKind, ...] = (PUSH, EMAIL, SMS)
SLOT_KINDS = frozenset({types_pb2.NOTICE_KIND_SLOT_ANNOUNCED, types_pb2.NOTICE_KIND_SLOT_CORRECTED})
# Providers that accept any destination (local sinks, benchmarks): used for a kind with no provider
# of its own name.
CATCH_ALL = ("file", "null")
PROVIDER_KINDS = ("email", "sms", "fcm", "webpush", "apns")


@dataclass(frozen=True, slots=True)
class Target:
    """One message to send: through which provider, to which address."""

    provider: str
    to: Destination


@dataclass(frozen=True, slots=True)
class Route:
    """One channel with every address it reaches (push: each device), in the recipient's order."""

    channel: ChannelKind
    targets: tuple[Target, ...]
    # True when the route depends on the recipient and the notice's failed channels alone: no SMS
    # decision (the notice's worth, the budget) came before it. The gateway reuses such a route for
    # the recipient's other notices in a batch.
    general: bool = field(default=True, compare=False)


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    # Provider name per provider kind (email, sms, fcm, webpush, apns); a kind absent is unreachable.
    providers: Mapping[str, str]
    sms_value_threshold_minor: int
    sms_monthly_budget_segments: int

    @classmethod
    def for_providers(
        cls, names: Iterable[str], *, sms_value_threshold_minor: int, sms_monthly_budget_segments: int
    ) -> RoutingPolicy:
        """Map each provider kind to the configured channel of that name, else to a catch-all sink.
        APNs needs its own ``apns`` channel: Apple tokens mean nothing to another provider."""
        configured = set(names)
        catch_all = next((name for name in CATCH_ALL if name in configured), None)
        providers: dict[str, str] = {}
        for kind in PROVIDER_KINDS:
            if kind in configured:
                providers[kind] = kind
            elif catch_all is not None and kind != "apns":
                providers[kind] = catch_all
        return cls(providers, sms_value_threshold_minor, sms_monthly_budget_segments)


def channel_order(prefs: preferences_pb2.RecipientPreferences, *, quiet: bool) -> Sequence[ChannelKind]:
    if not quiet and not prefs.channel_order:
        return DEFAULT_ORDER
    order: list[ChannelKind] = []
    for channel in prefs.channel_order or DEFAULT_ORDER:
        if channel in DEFAULT_ORDER and channel not in order:
            order.append(channel)
    if quiet and EMAIL in order:
        order.remove(EMAIL)
        order.insert(0, EMAIL)
    return order


def sms_worth_it(
    notice: notice_pb2.Notice, prefs: preferences_pb2.RecipientPreferences, policy: RoutingPolicy, now_ms: int
) -> bool:
    """A text costs money: only for a valuable parcel, or for a slot on the day it is sent."""
    if notice.declared_value.amount_minor >= policy.sms_value_threshold_minor:
        return True
    if notice.kind not in SLOT_KINDS or not notice.HasField("slot"):
        return False
    tz = zone(prefs.time_zone)
    slot_day = notice.slot.start.ToDatetime(tzinfo=tz).date()
    return slot_day == datetime.fromtimestamp(now_ms / 1000, tz).date()


def push_destination(target: preferences_pb2.PushTarget) -> tuple[str, Destination] | None:
    """The provider kind (fcm, webpush, apns) and address of a stored push target; None when it names
    no service or has no address."""
    which = target.WhichOneof("target")
    if which == "fcm" and target.fcm.token:
        return "fcm", FcmToken(target.fcm.token)
    if which == "web_push" and target.web_push.endpoint:
        w = target.web_push
        return "webpush", WebPushSubscription(w.endpoint, w.p256dh, w.auth)
    if which == "apns" and target.apns.device_token:
        a = target.apns
        return "apns", ApnsToken(a.device_token, a.bundle_id, a.sandbox)
    return None


def _push_targets(prefs: preferences_pb2.RecipientPreferences, policy: RoutingPolicy) -> tuple[Target, ...]:
    targets: list[Target] = []
    for push in prefs.push_targets:
        found = push_destination(push)
        if found is not None and found[0] in policy.providers:
            targets.append(Target(policy.providers[found[0]], found[1]))
    return tuple(targets)


def _targets(
    channel: ChannelKind,
    notice: notice_pb2.Notice,
    prefs: preferences_pb2.RecipientPreferences,
    policy: RoutingPolicy,
    *,
    now_ms: int,
    sms_spent_segments: int,
) -> tuple[Target, ...]:
    if channel == PUSH:
        return _push_targets(prefs, policy)
    if channel == EMAIL:
        if prefs.email and "email" in policy.providers:
            return (Target(policy.providers["email"], EmailAddress(prefs.email)),)
        return ()
    sms_allowed = (
        prefs.phone
        and prefs.sms_opt_in
        and "sms" in policy.providers
        and sms_spent_segments < policy.sms_monthly_budget_segments
        and sms_worth_it(notice, prefs, policy, now_ms)
    )
    return (Target(policy.providers["sms"], PhoneNumber(prefs.phone)),) if sms_allowed else ()


def plan(
    notice: notice_pb2.Notice,
    prefs: preferences_pb2.RecipientPreferences,
    policy: RoutingPolicy,
    *,
    now_ms: int,
    quiet: bool = False,
    sms_spent_segments: int = 0,
    first_only: bool = False,
) -> list[Route]:
    """The routes to try, best first (only the best with ``first_only``); empty when no channel can
    reach the recipient."""
    # A tuple, checked once per channel: upb's repeated field would be iterated by index to an
    # IndexError at every check.
    failed_channels = notice.failed_channels
    failed: Sequence[ChannelKind] = tuple(failed_channels) if failed_channels else ()
    general = True
    routes: list[Route] = []
    for channel in channel_order(prefs, quiet=quiet):
        if channel in failed:
            continue
        general = general and channel != SMS
        targets = _targets(
            channel, notice, prefs, policy, now_ms=now_ms, sms_spent_segments=sms_spent_segments
        )
        if targets:
            routes.append(Route(channel, targets, general))
            if first_only:
                break
    return routes


def single_address(channel: ChannelKind) -> bool:
    """Email and SMS reach one address; push reaches each of the recipient's devices."""
    return channel != PUSH
