"""Routing is pure: the recipient's channel order, addresses, SMS rules, providers per push kind."""

from __future__ import annotations

from relais.v1 import notice_pb2, preferences_pb2, types_pb2

from channels.base import ApnsToken, EmailAddress, FcmToken, PhoneNumber, WebPushSubscription
from gateway.routing import (
    EMAIL,
    PUSH,
    SMS,
    ChannelKind,
    Route,
    RoutingPolicy,
    Target,
    channel_order,
    plan,
)
from tests.conftest import T0_MS
from tests.gateway.support import make_notice

HOUR_MS = 3_600_000
ALL = RoutingPolicy.for_providers(
    ["email", "sms", "fcm", "webpush"], sms_value_threshold_minor=10_000, sms_monthly_budget_segments=100
)


def everything(**fields: object) -> preferences_pb2.RecipientPreferences:
    prefs = preferences_pb2.RecipientPreferences(
        recipient_id="r-1",
        email="a@example.ch",
        phone="+41791234567",
        sms_opt_in=True,
        time_zone="Europe/Zurich",
        push_targets=[
            preferences_pb2.PushTarget(fcm=preferences_pb2.FcmTarget(token="t1")),
            preferences_pb2.PushTarget(
                web_push=preferences_pb2.WebPushTarget(endpoint="https://p/1", p256dh="k", auth="a")
            ),
            preferences_pb2.PushTarget(apns=preferences_pb2.ApnsTarget(device_token="ab", bundle_id="app")),
        ],
    )
    for name, value in fields.items():
        if isinstance(value, list):
            prefs.ClearField(name)  # type: ignore[arg-type]
            getattr(prefs, name).extend(value)
        else:
            setattr(prefs, name, value)
    return prefs


def channels_of(routes: list[Route]) -> list[ChannelKind]:
    return [route.channel for route in routes]


def test_default_order_push_email_sms_with_every_device() -> None:
    routes = plan(make_notice("p", value_minor=50_000), everything(), ALL, now_ms=T0_MS)
    assert channels_of(routes) == [PUSH, EMAIL, SMS]
    # APNs has no provider configured: that device is skipped, the others are reached.
    assert routes[0].targets == (
        Target("fcm", FcmToken("t1")),
        Target("webpush", WebPushSubscription("https://p/1", "k", "a")),
    )
    assert routes[1].targets == (Target("email", EmailAddress("a@example.ch")),)
    assert routes[2].targets == (Target("sms", PhoneNumber("+41791234567")),)


def test_apns_device_reached_when_an_apns_channel_is_configured() -> None:
    policy = RoutingPolicy.for_providers(["apns"], sms_value_threshold_minor=0, sms_monthly_budget_segments=0)
    (route,) = plan(make_notice("p"), everything(), policy, now_ms=T0_MS)
    assert route.targets == (Target("apns", ApnsToken("ab", "app")),)


def test_recipient_order_and_failed_channels() -> None:
    prefs = everything(channel_order=[types_pb2.CHANNEL_EMAIL, types_pb2.CHANNEL_PUSH])
    notice = make_notice("p")
    assert channels_of(plan(notice, prefs, ALL, now_ms=T0_MS)) == [EMAIL, PUSH]
    notice.failed_channels.append(types_pb2.CHANNEL_EMAIL)
    assert channels_of(plan(notice, prefs, ALL, now_ms=T0_MS)) == [PUSH]


def test_channels_without_address_are_skipped() -> None:
    prefs = preferences_pb2.RecipientPreferences(recipient_id="r", email="x@example.ch")
    assert channels_of(plan(make_notice("p", value_minor=10**6), prefs, ALL, now_ms=T0_MS)) == [EMAIL]
    assert (
        plan(make_notice("p"), preferences_pb2.RecipientPreferences(recipient_id="r"), ALL, now_ms=T0_MS)
        == []
    )


def test_sms_needs_opt_in_value_or_a_slot_today_and_budget() -> None:
    prefs = everything(email="", push_targets=[])
    assert plan(make_notice("p", value_minor=9_999), prefs, ALL, now_ms=T0_MS) == []
    assert channels_of(plan(make_notice("p", value_minor=10_000), prefs, ALL, now_ms=T0_MS)) == [SMS]
    assert plan(make_notice("p", value_minor=10_000), prefs, ALL, now_ms=T0_MS, sms_spent_segments=100) == []
    assert (
        plan(
            make_notice("p", value_minor=10_000),
            everything(email="", push_targets=[], sms_opt_in=False),
            ALL,
            now_ms=T0_MS,
        )
        == []
    )
    kind = types_pb2.NOTICE_KIND_SLOT_CORRECTED
    # 23:30 UTC on 10 March is 00:30 on 11 March in Zurich: not today there.
    late = make_notice(
        "p", kind, slot_ms=(T0_MS + 14 * HOUR_MS + 1_800_000, T0_MS + 15 * HOUR_MS + 1_800_000)
    )
    today = make_notice("p", kind, slot_ms=(T0_MS + 12 * HOUR_MS, T0_MS + 13 * HOUR_MS))
    assert plan(late, prefs, ALL, now_ms=T0_MS) == []
    assert channels_of(plan(today, prefs, ALL, now_ms=T0_MS)) == [SMS]


def test_quiet_hours_put_email_first() -> None:
    assert channel_order(everything(), quiet=True) == [EMAIL, PUSH, SMS]
    assert channel_order(everything(channel_order=[types_pb2.CHANNEL_SMS]), quiet=True) == [SMS]


def test_local_sinks_take_every_kind_but_apns() -> None:
    policy = RoutingPolicy.for_providers(
        ["file"], sms_value_threshold_minor=0, sms_monthly_budget_segments=10
    )
    assert dict(policy.providers) == {"email": "file", "sms": "file", "fcm": "file", "webpush": "file"}


def test_the_first_route_says_whether_it_holds_for_the_recipients_other_notices() -> None:
    """The gateway reuses a route for a recipient's other notices only when no SMS decision (which
    weighs the notice and the budget) came before it."""
    cheap, valuable = make_notice("p", value_minor=0), make_notice("q", value_minor=50_000)

    def first(
        notice: notice_pb2.Notice, prefs: preferences_pb2.RecipientPreferences
    ) -> list[tuple[int, bool]]:
        return [(r.channel, r.general) for r in plan(notice, prefs, ALL, now_ms=T0_MS, first_only=True)]

    email_first = everything(channel_order=[EMAIL, SMS])
    assert first(cheap, email_first) == first(valuable, email_first) == [(EMAIL, True)]
    sms_first = everything(channel_order=[SMS, EMAIL])
    assert first(cheap, sms_first) == [(EMAIL, False)]
    assert first(valuable, sms_first) == [(SMS, False)]
    assert first(cheap, everything(email="", push_targets=[])) == []
