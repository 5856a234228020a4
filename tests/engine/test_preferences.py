"""The PreferenceService over real gRPC on loopback, against a real Redis."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from relais.v1 import preferences_pb2, preferences_pb2_grpc, types_pb2

from common import keys
from common.settings import Settings
from engine.preference_service import PreferenceServicer, add_preference_service
from engine.preferences import MAX_WATCH_ATTEMPTS, PreferenceStore
from engine.server import start_server
from engine.state import ConflictError

SHARDS = Settings().shards
Prefs = preferences_pb2.RecipientPreferences


@dataclass
class Hooks:
    """Stands in for the engine's re-planning: records whom it was asked about."""

    replanned: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    # Re-plans to fail before one succeeds, with the error the engine's re-planning raises.
    failures: list[Exception] = field(default_factory=list)

    async def replan(self, recipient_id: str) -> int:
        self.replanned.append(recipient_id)
        if self.failures:
            raise self.failures.pop(0)
        return 2

    async def cancel(self, recipient_id: str) -> int:
        self.cancelled.append(recipient_id)
        if self.failures:
            raise self.failures.pop(0)
        return 3


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
async def stub(redis: Redis, hooks: Hooks) -> AsyncIterator[preferences_pb2_grpc.PreferenceServiceAsyncStub]:
    servicer = PreferenceServicer(
        redis, SHARDS, replan_recipient=hooks.replan, cancel_recipient_notices=hooks.cancel
    )
    running = await start_server(
        Settings(listen="127.0.0.1:0"), redis, register=[add_preference_service(servicer)]
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield preferences_pb2_grpc.PreferenceServiceStub(channel)
    finally:
        await running.stop(0)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


WEB_PUSH = preferences_pb2.WebPushTarget(
    endpoint="https://push.example.net/send/abc123",
    p256dh=b64url(b"\x04" + bytes(range(64))),
    auth=b64url(bytes(16)),
)


def full_prefs(recipient_id: str = "rcp-1") -> Prefs:
    return Prefs(
        recipient_id=recipient_id,
        locale="fr-ch",
        time_zone="Europe/Zurich",
        email="Anna.Muster@Example.COM",
        phone="079 123 45 67",
        region="ch",
        push_targets=[
            preferences_pb2.PushTarget(fcm=preferences_pb2.FcmTarget(token="fcm-token-1")),
            preferences_pb2.PushTarget(web_push=WEB_PUSH),
            preferences_pb2.PushTarget(
                apns=preferences_pb2.ApnsTarget(device_token="ab" * 32, bundle_id="ch.example.app")
            ),
        ],
        channel_order=[types_pb2.CHANNEL_PUSH, types_pb2.CHANNEL_EMAIL],
        quiet_hours=preferences_pb2.QuietHours(start_minute=22 * 60, end_minute=7 * 60),
        muted_kinds=[types_pb2.NOTICE_KIND_SHIPPED],
        sms_opt_in=True,
    )


def update(prefs: Prefs, *paths: str) -> preferences_pb2.UpdatePreferencesRequest:
    return preferences_pb2.UpdatePreferencesRequest(
        preferences=prefs, update_mask=field_mask_pb2.FieldMask(paths=list(paths))
    )


def bad_request(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """Field → description, from the BadRequest detail in the grpc-status-details-bin trailer."""
    # grpc-stubs type the metadata as objects; grpc.aio hands (key, value) tuples.
    trailers: dict[str, object] = dict(cast(Any, error.trailing_metadata()))
    trailer = trailers["grpc-status-details-bin"]
    assert isinstance(trailer, bytes)
    status = status_pb2.Status.FromString(trailer)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    return {v.field: v.description for v in detail.field_violations}


async def test_update_normalises_and_get_reads_back(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub, redis: Redis, hooks: Hooks
) -> None:
    stored = await stub.UpdatePreferences(update(full_prefs()))

    assert stored.phone == "+41791234567"  # E.164, read in the recipient's region
    assert stored.region == "CH"
    assert stored.email == "Anna.Muster@example.com"  # local part kept, domain lower-cased
    assert stored.locale == "fr-CH"
    assert await stub.GetPreferences(preferences_pb2.GetPreferencesRequest(recipient_id="rcp-1")) == stored
    raw = await redis.get(keys.preferences(keys.shard_of("rcp-1", SHARDS), "rcp-1"))
    assert raw is not None
    assert Prefs.FromString(raw) == stored
    assert hooks.replanned == ["rcp-1"]

    # The same preferences again are stored as they were, and re-planned all the same (see below).
    assert await stub.UpdatePreferences(update(full_prefs())) == stored
    assert hooks.replanned == ["rcp-1", "rcp-1"]


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (ConflictError("parcels kept changing"), grpc.StatusCode.ABORTED),  # retry, not INTERNAL
        (RedisConnectionError("Redis went away"), grpc.StatusCode.UNAVAILABLE),
    ],
)
async def test_a_failed_replan_asks_for_a_retry_and_the_same_update_again_replans(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
    hooks: Hooks,
    failure: Exception,
    code: grpc.StatusCode,
) -> None:
    hooks.failures.append(failure)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdatePreferences(update(full_prefs()))
    assert caught.value.code() == code

    # The preferences were stored before the re-plan failed: the retry changes nothing in them, but
    # it must re-plan, or the pending notices would keep the old quiet hours and muted kinds.
    await stub.UpdatePreferences(update(full_prefs()))
    assert hooks.replanned == ["rcp-1", "rcp-1"]


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        # IDNA 2008: IDNA 2003 made these anna@strasse.de and anna@fass.example, other domains.
        ("anna@straße.de", "anna@xn--strae-oqa.de"),
        ("Anna@Faß.Example", "Anna@xn--fa-hia.example"),
        ("anna@例え.JP", "anna@xn--r8jz45g.jp"),
        ("anna@XN--STRAE-OQA.DE", "anna@xn--strae-oqa.de"),
    ],
)
async def test_an_email_domain_is_stored_in_idna_2008_a_labels(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub, given: str, stored: str
) -> None:
    prefs = await stub.UpdatePreferences(update(Prefs(recipient_id="r-idn", email=given)))
    assert prefs.email == stored


async def test_phone_with_country_code_needs_no_region(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
) -> None:
    stored = await stub.UpdatePreferences(update(Prefs(recipient_id="r2", phone="+33 6 12 34 56 78")))
    assert stored.phone == "+33612345678"
    assert stored.time_zone == "Europe/Paris"  # no zone given: the number's, stored explicitly


@pytest.mark.parametrize(
    ("given", "zone"),
    [
        ({"phone": "+41 79 123 45 67", "locale": "en"}, "Europe/Zurich"),
        ({"phone": "+1 310 555 0123"}, "America/Los_Angeles"),  # the area's zone, not the country's
        ({"region": "DE"}, "Europe/Berlin"),  # Berlin and Büsingen keep the same time
        ({"locale": "it-CH"}, "Europe/Zurich"),
        ({"region": "US", "locale": "en-US"}, "UTC"),  # several zones: nothing to go by
        ({"email": "a@example.org", "locale": "de"}, "UTC"),
        ({"phone": "+41791234567", "time_zone": "Asia/Tokyo"}, "Asia/Tokyo"),  # theirs is kept
    ],
)
async def test_a_missing_time_zone_comes_from_phone_region_or_locale(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub, given: dict[str, str], zone: str
) -> None:
    stored = await stub.UpdatePreferences(update(Prefs(recipient_id="r-zone", **given)))  # type: ignore[arg-type]
    assert stored.time_zone == zone


async def test_a_guessed_zone_follows_a_phone_given_later(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
) -> None:
    first = await stub.UpdatePreferences(update(Prefs(recipient_id="r-zone", locale="en")))
    assert first.time_zone == "UTC"  # nothing to go by yet
    phone = Prefs(recipient_id="r-zone", phone="+41791234567")
    assert (await stub.UpdatePreferences(update(phone, "phone"))).time_zone == "Europe/Zurich"
    await stub.UpdatePreferences(update(Prefs(recipient_id="r-zone", time_zone="Asia/Tokyo"), "time_zone"))
    phone.phone = "+33612345678"
    assert (await stub.UpdatePreferences(update(phone, "phone"))).time_zone == "Asia/Tokyo"  # theirs


@pytest.mark.parametrize(
    ("given", "change", "zone"),
    [
        # Their zone, which their old number's area also has: a New York number does not move it...
        (
            {"phone": "+1 310 555 0123", "time_zone": "America/Los_Angeles"},
            {"phone": "+1 212 555 0123"},
            "America/Los_Angeles",
        ),
        # ... and removing their number does not make it UTC.
        ({"phone": "+41 79 123 45 67", "time_zone": "Europe/Zurich"}, {}, "Europe/Zurich"),
    ],
)
async def test_a_given_zone_equal_to_the_guess_stays_when_the_mask_does_not_name_it(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
    given: dict[str, str],
    change: dict[str, str],
    zone: str,
) -> None:
    first = await stub.UpdatePreferences(update(Prefs(recipient_id="r-tz", **given)))  # type: ignore[arg-type]
    assert (first.time_zone, first.time_zone_guessed) == (zone, False)
    stored = await stub.UpdatePreferences(update(Prefs(recipient_id="r-tz", **change), "phone"))  # type: ignore[arg-type]
    assert stored.phone == ("+12125550123" if change else "")
    assert (stored.time_zone, stored.time_zone_guessed) == (zone, False)


async def test_time_zone_guessed_is_set_by_relais_and_read_back(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
) -> None:
    # What a caller sends in time_zone_guessed is ignored: a zone given is not a guess...
    given = Prefs(
        recipient_id="r-mark", phone="+41791234567", time_zone="Europe/Zurich", time_zone_guessed=True
    )
    stored = await stub.UpdatePreferences(update(given))
    assert stored.HasField("time_zone_guessed")
    assert not stored.time_zone_guessed
    read = await stub.GetPreferences(preferences_pb2.GetPreferencesRequest(recipient_id="r-mark"))
    assert read == stored
    # ... and an empty one is, once the mask names time_zone.
    cleared = Prefs(recipient_id="r-mark", time_zone_guessed=False)
    stored = await stub.UpdatePreferences(update(cleared, "time_zone", "time_zone_guessed"))
    assert (stored.time_zone, stored.time_zone_guessed) == ("Europe/Zurich", True)
    # A guess follows the phone.
    moved = await stub.UpdatePreferences(update(Prefs(recipient_id="r-mark", phone="+33612345678"), "phone"))
    assert (moved.time_zone, moved.time_zone_guessed) == ("Europe/Paris", True)
    assert await stub.GetPreferences(preferences_pb2.GetPreferencesRequest(recipient_id="r-mark")) == moved


@pytest.mark.parametrize(
    ("zone", "after", "guessed"),
    [
        ("Europe/Zurich", "Europe/Paris", True),  # the number's zone: taken for a guess, as before
        ("Asia/Tokyo", "Asia/Tokyo", False),  # another: theirs
    ],
)
async def test_preferences_stored_without_the_mark_keep_the_old_reading(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub, redis: Redis, zone: str, after: str, guessed: bool
) -> None:
    old = Prefs(recipient_id="r-old", phone="+41791234567", time_zone=zone)
    await redis.set(keys.preferences(keys.shard_of("r-old", SHARDS), "r-old"), old.SerializeToString())
    stored = await stub.UpdatePreferences(update(Prefs(recipient_id="r-old", phone="+33612345678"), "phone"))
    assert stored.time_zone == after
    assert stored.HasField("time_zone_guessed")  # stored from now on
    assert stored.time_zone_guessed is guessed


async def test_mask_changes_only_named_fields(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub, hooks: Hooks
) -> None:
    await stub.UpdatePreferences(update(full_prefs()))
    change = Prefs(
        recipient_id="rcp-1",
        email="other@example.org",  # not in the mask: ignored
        quiet_hours=preferences_pb2.QuietHours(start_minute=21 * 60, end_minute=8 * 60),
        muted_kinds=[types_pb2.NOTICE_KIND_DELAYED],
    )

    stored = await stub.UpdatePreferences(update(change, "quiet_hours", "muted_kinds"))

    assert stored.email == "Anna.Muster@example.com"
    assert (stored.quiet_hours.start_minute, stored.quiet_hours.end_minute) == (1260, 480)
    assert list(stored.muted_kinds) == [types_pb2.NOTICE_KIND_DELAYED]  # replaced, not appended
    assert stored.phone == "+41791234567"
    assert hooks.replanned == ["rcp-1", "rcp-1"]


async def test_empty_mask_replaces_everything(stub: preferences_pb2_grpc.PreferenceServiceAsyncStub) -> None:
    await stub.UpdatePreferences(update(full_prefs()))
    stored = await stub.UpdatePreferences(update(Prefs(recipient_id="rcp-1", email="a@example.org")))
    assert stored == Prefs(
        recipient_id="rcp-1", email="a@example.org", time_zone="UTC", time_zone_guessed=True
    )


async def test_unknown_mask_path_names_update_mask(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdatePreferences(update(full_prefs(), "quiet_hours", "shoe_size"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "update_mask" in (caught.value.details() or "")
    assert list(bad_request(caught.value)) == ["update_mask"]


def set_push(index: int, target: preferences_pb2.PushTarget) -> Callable[[Prefs], None]:
    def change(prefs: Prefs) -> None:
        prefs.push_targets[index].CopyFrom(target)

    return change


def set_web_push(**values: str) -> Callable[[Prefs], None]:
    target = preferences_pb2.WebPushTarget()
    target.CopyFrom(WEB_PUSH)
    for name, value in values.items():
        setattr(target, name, value)
    return set_push(1, preferences_pb2.PushTarget(web_push=target))


def assign(name: str, value: object) -> Callable[[Prefs], None]:
    return lambda prefs: setattr(prefs, name, value)


def assign_all(**values: object) -> Callable[[Prefs], None]:
    def change(prefs: Prefs) -> None:
        for name, value in values.items():
            setattr(prefs, name, value)

    return change


def replace_list(name: str, values: list[int]) -> Callable[[Prefs], None]:
    def change(prefs: Prefs) -> None:
        getattr(prefs, name)[:] = values

    return change


BAD_FIELDS: list[tuple[str, Callable[[Prefs], None], str]] = [
    ("too short", assign("phone", "12"), "preferences.phone"),
    ("not a number", assign("phone", "call me maybe"), "preferences.phone"),
    ("no region", assign_all(region="", phone="0791234567"), "preferences.phone"),
    ("bad region", assign("region", "XX"), "preferences.region"),
    ("no domain", assign("email", "anna@localhost"), "preferences.email"),
    ("header injection", assign("email", "anna@example.com\r\nBcc: x@example.com"), "preferences.email"),
    ("two ats", assign("email", "a@b@example.com"), "preferences.email"),
    # IDNA 2008 refuses a joiner here (IDNA 2003 dropped it: mail to another domain) and an empty A-label.
    ("joiner in domain", assign("email", "anna@exa\u200dmple.com"), "preferences.email"),
    ("empty A-label", assign("email", "anna@xn--.example.com"), "preferences.email"),
    # Short enough as given, too long as sent: the domain over 253 characters, the address over 254.
    (
        "domain too long encoded",
        assign("email", "anna@" + ".".join(["bücher" * 3] * 10) + ".ch"),
        "preferences.email",
    ),
    (
        "address too long encoded",
        assign("email", "a" * 60 + "@" + ".".join(["bücher" * 3] * 8) + ".ch"),
        "preferences.email",
    ),
    ("zone", assign("time_zone", "Europe/Atlantis"), "preferences.time_zone"),
    ("zone path", assign("time_zone", "../../etc/passwd"), "preferences.time_zone"),
    # Files of the host's zoneinfo directory and tzdata's placeholder: no place's zone.
    *(
        (f"zone {name}", assign("time_zone", name), "preferences.time_zone")
        for name in ("localtime", "Factory", "posixrules", "posix/Europe/Paris", "right/Europe/Paris")
    ),
    ("locale", assign("locale", "french please"), "preferences.locale"),
    (
        "quiet start",
        lambda p: p.quiet_hours.CopyFrom(preferences_pb2.QuietHours(start_minute=1440)),
        "preferences.quiet_hours.start_minute",
    ),
    (
        "fcm token",
        set_push(0, preferences_pb2.PushTarget(fcm=preferences_pb2.FcmTarget())),
        "preferences.push_targets[0].fcm.token",
    ),
    (
        "http endpoint",
        set_web_push(endpoint="http://push.example.net/x"),
        "preferences.push_targets[1].web_push.endpoint",
    ),
    # URLs no request could be sent to: each would be stored, then fail at every send.
    *(
        (f"endpoint {name}", set_web_push(endpoint=endpoint), "preferences.push_targets[1].web_push.endpoint")
        for name, endpoint in (
            ("port not a number", "https://push.example.net:abc/send/1"),
            ("port too large", "https://127.0.0.1:99999/send/1"),
            ("port zero", "https://push.example.net:0/send/1"),
            ("empty A-label", "https://xn--/send/1"),
            ("host IDNA refuses", "https://push_service.example.net/send/1"),
            ("unclosed bracket", "https://[::1/push"),
            ("name in brackets", "https://[push.example]/send/1"),
        )
    ),
    ("p256dh", set_web_push(p256dh="not base64!"), "preferences.push_targets[1].web_push.p256dh"),
    ("auth", set_web_push(auth=b64url(bytes(8))), "preferences.push_targets[1].web_push.auth"),
    (
        "apns token",
        set_push(
            2,
            preferences_pb2.PushTarget(
                apns=preferences_pb2.ApnsTarget(device_token="zz" * 32, bundle_id="a.b")
            ),
        ),
        "preferences.push_targets[2].apns.device_token",
    ),
    ("empty target", set_push(0, preferences_pb2.PushTarget()), "preferences.push_targets[0]"),
    ("duplicate channel", replace_list("channel_order", [1, 2, 1]), "preferences.channel_order"),
    ("unspecified channel", replace_list("channel_order", [0]), "preferences.channel_order"),
    ("unknown kind", replace_list("muted_kinds", [99]), "preferences.muted_kinds"),
    ("recipient id", assign("recipient_id", ""), "preferences.recipient_id"),
]


@pytest.mark.parametrize(("case", "change", "field_path"), BAD_FIELDS, ids=[c[0] for c in BAD_FIELDS])
async def test_each_bad_field_is_named(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
    hooks: Hooks,
    case: str,
    change: Callable[[Prefs], None],
    field_path: str,
) -> None:
    prefs = full_prefs()
    change(prefs)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdatePreferences(update(prefs))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(bad_request(error)) == [field_path]
    message = error.details() or ""
    assert field_path in message
    # Personal data is never echoed back.
    for value in (prefs.email, prefs.phone):
        assert value not in message
    assert hooks.replanned == []


@pytest.mark.parametrize(
    "endpoint",
    [
        "https://fcm.googleapis.com/fcm/send/dXJsLXNhZmU",
        "https://updates.push.services.mozilla.com/wpush/v2/gAAAAABk",
        "https://push.example.net:8443/send/1",
        "https://pÜsh.example/send/1",  # an IDN, kept as the browser gave it
        "https://[2001:db8::1]/send/1",
    ],
)
async def test_web_push_endpoints_a_request_can_go_to_are_kept(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub, endpoint: str
) -> None:
    prefs = full_prefs()
    set_web_push(endpoint=endpoint)(prefs)
    stored = await stub.UpdatePreferences(update(prefs))
    assert stored.push_targets[1].web_push.endpoint == endpoint


async def test_every_bad_field_is_reported_at_once(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
) -> None:
    prefs = Prefs(recipient_id="r", email="nope", time_zone="Nowhere/Else", locale="??")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdatePreferences(update(prefs))
    assert set(bad_request(caught.value)) == {
        "preferences.email",
        "preferences.time_zone",
        "preferences.locale",
    }


async def test_get_unknown_is_not_found_and_empty_id_invalid(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPreferences(preferences_pb2.GetPreferencesRequest(recipient_id="nobody"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetPreferences(preferences_pb2.GetPreferencesRequest(recipient_id=""))
    assert list(bad_request(caught.value)) == ["recipient_id"]


async def test_update_without_preferences_is_invalid(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.UpdatePreferences(preferences_pb2.UpdatePreferencesRequest())
    assert list(bad_request(caught.value)) == ["preferences"]


async def test_erase_removes_preferences_and_cancels_notices(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub, redis: Redis, hooks: Hooks
) -> None:
    await stub.UpdatePreferences(update(full_prefs()))
    key = keys.preferences(keys.shard_of("rcp-1", SHARDS), "rcp-1")
    assert await redis.exists(key)

    reply = await stub.EraseRecipient(preferences_pb2.EraseRecipientRequest(recipient_id="rcp-1"))

    assert reply == preferences_pb2.EraseRecipientResponse(preferences_erased=True, notices_cancelled=3)
    assert not await redis.exists(key)
    assert hooks.cancelled == ["rcp-1"]
    again = await stub.EraseRecipient(preferences_pb2.EraseRecipientRequest(recipient_id="rcp-1"))
    assert not again.preferences_erased


async def test_an_erasure_whose_cancelling_conflicts_asks_for_the_same_request_again(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub, hooks: Hooks
) -> None:
    """Events kept landing on the recipient's parcels: ABORTED to retry (not INTERNAL, a bug), and
    the retry cancels what the first could not."""
    await stub.UpdatePreferences(update(full_prefs()))
    hooks.failures.append(ConflictError("parcels kept changing"))
    request = preferences_pb2.EraseRecipientRequest(recipient_id="rcp-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.EraseRecipient(request)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert "send the same request again" in (caught.value.details() or "")
    again = await stub.EraseRecipient(request)
    assert again == preferences_pb2.EraseRecipientResponse(preferences_erased=False, notices_cancelled=3)
    assert hooks.cancelled == ["rcp-1", "rcp-1"]


async def test_concurrent_masked_updates_keep_each_other(
    stub: preferences_pb2_grpc.PreferenceServiceAsyncStub,
) -> None:
    await stub.UpdatePreferences(update(Prefs(recipient_id="busy")))
    emails = [update(Prefs(recipient_id="busy", email=f"a{i}@example.org"), "email") for i in range(10)]
    quiet = [
        update(
            Prefs(
                recipient_id="busy", quiet_hours=preferences_pb2.QuietHours(start_minute=i, end_minute=600)
            ),
            "quiet_hours",
        )
        for i in range(10)
    ]
    # Interleaved: each writer reads and writes its own field; none may drop the other's.
    await asyncio.gather(
        *(stub.UpdatePreferences(r) for pair in zip(emails, quiet, strict=True) for r in pair)
    )
    stored = await stub.GetPreferences(preferences_pb2.GetPreferencesRequest(recipient_id="busy"))
    assert stored.email.startswith("a")
    assert stored.quiet_hours.end_minute == 600


async def test_a_burst_of_updates_of_one_recipient_takes_turns(redis: Redis) -> None:
    """More concurrent updates of one recipient than WATCH retries: none is overtaken into ABORTED,
    and none drops another's field."""
    store = PreferenceStore(redis, SHARDS)
    burst = 3 * MAX_WATCH_ATTEMPTS
    await store.update(Prefs(recipient_id="burst"), field_mask_pb2.FieldMask())
    results = await asyncio.gather(
        *(
            store.update(
                Prefs(recipient_id="burst", email=f"b{i}@example.org")
                if i % 2
                else Prefs(
                    recipient_id="burst",
                    quiet_hours=preferences_pb2.QuietHours(start_minute=i, end_minute=600),
                ),
                field_mask_pb2.FieldMask(paths=["email" if i % 2 else "quiet_hours"]),
            )
            for i in range(burst)
        )
    )
    assert len(results) == burst
    assert all(changed for _, changed in results)
    stored = await store.get("burst")
    assert stored is not None
    assert stored.email == f"b{burst - 1}@example.org"  # turns are taken in arrival order
    assert stored.quiet_hours.start_minute == burst - 2
