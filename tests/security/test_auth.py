"""Authentication and authorisation over real gRPC on loopback: TLS, mutual TLS, API keys, the
per-service rules, the fine rules' helpers and per-caller quotas."""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.asyncio import Redis
from relais.v1 import parcel_pb2, parcel_pb2_grpc, tracking_pb2, tracking_pb2_grpc, types_pb2

from common import keys
from common.clock import ManualClock
from common.errors import SettingsError
from common.settings import SecuritySettings, Settings
from engine.auth import (
    KeyStore,
    Principal,
    PrincipalKind,
    add_key,
    bearer_key,
    can_access_merchant,
    can_access_recipient,
    can_post_for_carrier,
    check_open_listener,
    merchant_scope,
)
from engine.server import start_server
from tests.security.conftest import KEYS, bearer, serving, settings_with
from tests.security.pki import Pki
from tests.security.probe import add_probes


def tls_channel(pki: Pki, port: int, *, client: bool = True, stranger: bool = False) -> grpc.aio.Channel:
    pem = pki.stranger if stranger else pki.client
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert_bytes(),
        private_key=pem.key_bytes() if client else None,
        certificate_chain=pem.cert_bytes() if client else None,
    )
    return grpc.aio.secure_channel(f"localhost:{port}", credentials)


async def get_parcel(channel: grpc.aio.Channel, principal: str | None, parcel_id: str = "p1") -> str:
    metadata = bearer(principal) if principal else None
    view = await parcel_pb2_grpc.ParcelServiceStub(channel).GetParcel(
        parcel_pb2.GetParcelRequest(parcel_id=parcel_id), metadata=metadata, timeout=5
    )
    return view.merchant_id


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value.code()


# --- TLS ----------------------------------------------------------------------------------------------


async def test_tls_listener_serves_keys_over_tls_and_refuses_plaintext(
    redis: Redis, clock: ManualClock, pki: Pki, keys_file: Path
) -> None:
    security = SecuritySettings(tls_cert=pki.server.cert, tls_key=pki.server.key, keys_file=keys_file)
    async with serving(settings_with(security), redis, clock, [add_probes]) as running:
        async with tls_channel(pki, running.port, client=False) as channel:
            assert await get_parcel(channel, "merchant:acme") == "merchant:acme"
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as plain:
            assert await code_of(get_parcel(plain, "merchant:acme")) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_from_the_configured_ca(
    redis: Redis, clock: ManualClock, pki: Pki, keys_file: Path
) -> None:
    security = SecuritySettings(
        tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert, keys_file=keys_file
    )
    async with serving(settings_with(security), redis, clock, [add_probes]) as running:
        async with tls_channel(pki, running.port) as channel:
            assert await get_parcel(channel, "operator") == "operator"
        async with tls_channel(pki, running.port, client=False) as anonymous:
            assert await code_of(get_parcel(anonymous, "operator")) == grpc.StatusCode.UNAVAILABLE
        async with tls_channel(pki, running.port, stranger=True) as stranger:
            assert await code_of(get_parcel(stranger, "operator")) == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_are_read_from_the_environment_and_checked(pki: Pki, keys_file: Path) -> None:
    env = {
        "RELAIS_TLS_CERT": str(pki.server.cert),
        "RELAIS_TLS_KEY": str(pki.server.key),
        "RELAIS_TLS_CLIENT_CA": str(pki.ca.cert),
        "RELAIS_KEYS_FILE": str(keys_file),
        "RELAIS_QUOTA_MERCHANT_RPS": "5",
    }
    security = Settings.from_env(env).security
    assert (security.tls_cert, security.tls_client_ca, security.keys_file) == (
        pki.server.cert,
        pki.ca.cert,
        keys_file,
    )
    assert security.quota_merchant_rps == 5.0
    with pytest.raises(SettingsError, match="RELAIS_TLS_KEY"):
        Settings.from_env({"RELAIS_TLS_CERT": str(pki.server.cert)})
    with pytest.raises(SettingsError, match="RELAIS_KEYS_FILE"):
        Settings.from_env({"RELAIS_KEYS_FILE": "/nonexistent/keys.jsonl"})


# --- keys and the coarse rules ------------------------------------------------------------------------


@pytest.fixture
async def keyed(redis: Redis, clock: ManualClock, keys_file: Path) -> AsyncIterator[grpc.aio.Channel]:
    security = SecuritySettings(keys_file=keys_file, quota_carrier_rps=0, quota_merchant_rps=0)
    async with serving(settings_with(security), redis, clock, [add_probes]) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            yield channel


async def test_calls_without_a_known_key_are_unauthenticated(keyed: grpc.aio.Channel) -> None:
    stub = parcel_pb2_grpc.ParcelServiceStub(keyed)
    request = parcel_pb2.GetParcelRequest(parcel_id="p1")
    assert await code_of(stub.GetParcel(request, timeout=5)) == grpc.StatusCode.UNAUTHENTICATED
    for metadata in ((("authorization", "Bearer nope"),), (("authorization", f"Basic {KEYS['operator']}"),)):
        call = stub.GetParcel(request, metadata=metadata, timeout=5)
        assert await code_of(call) == grpc.StatusCode.UNAUTHENTICATED
    tracking = tracking_pb2_grpc.TrackingServiceStub(keyed)

    async def batches() -> AsyncIterator[tracking_pb2.EventBatch]:
        yield tracking_pb2.EventBatch(seq=1)

    stream = tracking.StreamEvents(batches(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ack in stream:
            pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_and_reflection_stay_open(keyed: grpc.aio.Channel) -> None:
    reply = await health_pb2_grpc.HealthStub(keyed).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = []
    async for answer in reflection_pb2_grpc.ServerReflectionStub(keyed).ServerReflectionInfo(
        ask(), timeout=5
    ):
        names = [service.name for service in answer.list_services_response.service]
    assert "relais.v1.ParcelService" in names


async def test_each_principal_kind_reaches_only_its_services(keyed: grpc.aio.Channel) -> None:
    tracking = tracking_pb2_grpc.TrackingServiceStub(keyed)
    batch = tracking_pb2.EventBatch(seq=7)
    # Carriers: TrackingService only.
    ack = await tracking.RecordEvents(batch, metadata=bearer("carrier:swisspost"), timeout=5)
    assert ack.seq == 7
    assert await code_of(get_parcel(keyed, "carrier:swisspost")) == grpc.StatusCode.PERMISSION_DENIED
    # Merchants: parcels (and preferences, alerts), never tracking.
    assert await get_parcel(keyed, "merchant:acme") == "merchant:acme"
    call = tracking.RecordEvents(batch, metadata=bearer("merchant:acme"), timeout=5)
    assert await code_of(call) == grpc.StatusCode.PERMISSION_DENIED
    # Operators: everything.
    assert await get_parcel(keyed, "operator") == "operator"
    assert (await tracking.RecordEvents(batch, metadata=bearer("operator"), timeout=5)).seq == 7


async def test_a_carrier_posts_only_for_its_own_code_and_the_rest_of_the_batch_applies(
    keyed: grpc.aio.Channel,
) -> None:
    events = [
        tracking_pb2.TrackingEvent(event_id="e0", carrier="swisspost"),
        tracking_pb2.TrackingEvent(event_id="e1", carrier="dhl-de"),
        tracking_pb2.TrackingEvent(event_id="e2", carrier="swisspost"),
    ]
    ack = await tracking_pb2_grpc.TrackingServiceStub(keyed).RecordEvents(
        tracking_pb2.EventBatch(seq=1, events=events), metadata=bearer("carrier:swisspost"), timeout=5
    )
    assert ack.accepted == 2
    assert [(r.index, r.code, r.event_id) for r in ack.rejected] == [
        (1, tracking_pb2.REJECT_CODE_PERMISSION_DENIED, "e1")
    ]


async def test_another_merchants_data_is_not_found(keyed: grpc.aio.Channel) -> None:
    assert await get_parcel(keyed, "merchant:acme", "acme/p1") == "merchant:acme"
    call = get_parcel(keyed, "merchant:acme", "globex/p1")
    assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    assert await get_parcel(keyed, "operator", "globex/p1") == "operator"


# --- the fine rules and the keys file -----------------------------------------------------------------


def test_fine_rules_follow_the_principal_never_the_request() -> None:
    acme, swisspost, operator = (
        Principal.parse("merchant:acme"),
        Principal.parse("carrier:swisspost"),
        Principal.parse("operator"),
    )
    assert can_post_for_carrier("swisspost", swisspost)
    assert not can_post_for_carrier("dhl-de", swisspost)
    assert not can_post_for_carrier("swisspost", acme)
    assert can_access_merchant("acme", acme)
    assert not can_access_merchant("globex", acme)
    assert not can_access_merchant("acme", swisspost)
    assert can_access_recipient("acme/r1", acme)
    assert not can_access_recipient("globex/r1", acme)
    assert not can_access_recipient("acmecorp/r1", acme)
    assert not can_access_recipient("r1", acme)
    assert merchant_scope("", acme) == "acme"
    assert merchant_scope("acme", acme) == "acme"
    assert merchant_scope("globex", acme) is None
    assert merchant_scope("", operator) == ""
    assert merchant_scope("globex", operator) == "globex"
    # No principal bound (no keys file): the server is open, on loopback only.
    assert can_access_merchant("anyone")
    assert can_post_for_carrier("any")
    assert can_access_recipient("r")


def test_principals_parse_strictly() -> None:
    assert Principal.parse("carrier:dhl-de") == Principal(PrincipalKind.CARRIER, "dhl-de")
    assert str(Principal.parse("operator")) == "operator"
    for bad in (
        "carrier",
        "carrier:",
        "operator:x",
        "admin:x",
        "merchant:a:b",
        "merchant:a/b",
        "merchant:a b",
    ):
        with pytest.raises(ValueError, match=r"principal|is not"):
            Principal.parse(bad)


def test_keys_file_lines_are_checked_and_new_keys_are_appended_hashed(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    key = add_key(path, Principal.parse("merchant:acme"))
    second = add_key(path, Principal.parse("operator"))
    assert os.stat(path).st_mode & 0o777 == 0o600
    text = path.read_text()
    assert key not in text
    assert second not in text
    store = KeyStore.load(path)
    assert store.authenticate(key) == Principal.parse("merchant:acme")
    assert store.authenticate(second) == Principal.parse("operator")
    assert store.authenticate(key + "x") is None
    path.write_text(text + '{"sha256": "abc", "principal": "operator"}\n')
    with pytest.raises(SettingsError, match=r"keys.jsonl:3: sha256"):
        KeyStore.load(path)
    path.write_text('{"principal": "operator"}\n')
    with pytest.raises(SettingsError, match=r"keys.jsonl:1"):
        KeyStore.load(path)


def test_bearer_key_reads_only_the_authorization_header() -> None:
    assert bearer_key([("x-api-key", "k"), ("authorization", "Bearer abc ")]) == "abc"
    assert bearer_key([("authorization", "bearer abc")]) == "abc"
    assert bearer_key([("authorization", "Basic abc")]) is None
    assert bearer_key(None) is None


async def test_an_open_server_is_refused_off_loopback(redis: Redis, keys_file: Path) -> None:
    check_open_listener("127.0.0.1:50051", None)
    check_open_listener("[::1]:50051", None)
    check_open_listener("localhost:50051", None)
    check_open_listener("0.0.0.0:50051", keys_file)
    with pytest.raises(SettingsError, match="RELAIS_KEYS_FILE"):
        check_open_listener("0.0.0.0:50051", None)
    with pytest.raises(SettingsError, match="loopback"):
        await start_server(Settings(listen="0.0.0.0:0"), redis)


# --- quotas -------------------------------------------------------------------------------------------


async def test_a_tenant_over_quota_is_told_when_to_retry_and_others_are_unaffected(
    redis: Redis, clock: ManualClock, keys_file: Path
) -> None:
    security = SecuritySettings(keys_file=keys_file, quota_merchant_rps=2.0, quota_merchant_burst=3)
    async with serving(settings_with(security), redis, clock, [add_probes]) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            for _ in range(3):
                await get_parcel(channel, "merchant:acme")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await get_parcel(channel, "merchant:acme")
            error = info.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # grpc.aio gives Metadata (pairs); grpc-stubs describe the sync API's objects.
            trailers: dict[str, Any] = dict(cast(Any, error.trailing_metadata()))
            assert trailers["retry-after-ms"] == "500"
            status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
            retry = error_details_pb2.RetryInfo()
            assert status.details[0].Unpack(retry)
            assert retry.retry_delay.ToMilliseconds() == 500
            # Another merchant, and the operator (no quota by default), are not slowed down.
            assert await get_parcel(channel, "merchant:globex") == "merchant:globex"
            assert await get_parcel(channel, "operator") == "operator"
            # Half a second later one more request is allowed, and only one.
            clock.advance_ms(500)
            assert await get_parcel(channel, "merchant:acme") == "merchant:acme"
            assert await code_of(get_parcel(channel, "merchant:acme")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    quota_keys = [key async for key in redis.scan_iter(match=keys.PREFIX + "quota:*")]
    assert sorted(quota_keys) == sorted(
        keys.quota(who, Settings().shards).encode() for who in ("merchant:acme", "merchant:globex")
    )


def test_relais_keys_add_prints_a_key_once_and_stores_only_its_hash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli.main import main

    path = tmp_path / "keys.jsonl"
    assert main(["keys", "add", "--principal", "carrier:swisspost", "--file", str(path)]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("rlk_")
    assert key not in path.read_text()
    assert KeyStore.load(path).authenticate(key) == Principal.parse("carrier:swisspost")
    assert main(["keys", "add", "--principal", "admin", "--file", str(path)]) == 2
    assert "admin" in capsys.readouterr().err


async def check_parcel_rules(channel: grpc.aio.Channel) -> None:
    parcels = parcel_pb2_grpc.ParcelServiceStub(channel)
    entries = [
        parcel_pb2.ParcelRegistration(parcel_id=p, merchant_id=m, carrier="swisspost", recipient_id=r)
        for p, m, r in (("P-A", "acme", "acme/r1"), ("P-B", "acme", "globex/r1"), ("P-C", "globex", "x/r"))
    ]
    reply = await parcels.RegisterParcels(
        parcel_pb2.RegisterParcelsRequest(parcels=entries), metadata=bearer("merchant:acme"), timeout=5
    )
    assert reply.registered == 1
    assert [(r.index, r.field) for r in reply.rejected] == [(1, "recipient_id"), (2, "merchant_id")]
    request = parcel_pb2.GetParcelRequest(parcel_id="P-A")
    assert (await parcels.GetParcel(request, metadata=bearer("merchant:acme"), timeout=5)).registered
    assert (await parcels.GetParcel(request, metadata=bearer("operator"), timeout=5)).registered
    foreign = parcels.GetParcel(request, metadata=bearer("merchant:globex"), timeout=5)
    assert await code_of(foreign) == grpc.StatusCode.NOT_FOUND


async def check_tracking_rules(channel: grpc.aio.Channel, now_ms: int) -> None:
    events = []
    for i, carrier in enumerate(("swisspost", "dhl-de", "swisspost")):
        event = tracking_pb2.TrackingEvent(
            event_id=f"e{i}", parcel_id="P-A", carrier=carrier, status=types_pb2.TRACKING_STATUS_IN_TRANSIT
        )
        event.occurred_at.FromMilliseconds(now_ms - 60_000)
        events.append(event)
    ack = await tracking_pb2_grpc.TrackingServiceStub(channel).RecordEvents(
        tracking_pb2.EventBatch(seq=3, events=events), metadata=bearer("carrier:swisspost"), timeout=5
    )
    assert ack.accepted == 2
    denied = tracking_pb2.REJECT_CODE_PERMISSION_DENIED
    assert [(r.index, r.code) for r in ack.rejected] == [(1, denied)]


async def check_alert_and_preference_rules(channel: grpc.aio.Channel) -> None:
    from relais.v1 import alerts_pb2, alerts_pb2_grpc, preferences_pb2, preferences_pb2_grpc

    alerts = alerts_pb2_grpc.AlertServiceStub(channel)
    listing = alerts_pb2.ListAlertsRequest(merchant_id="acme")
    others = alerts.ListAlerts(listing, metadata=bearer("merchant:globex"), timeout=5)
    assert await code_of(others) == grpc.StatusCode.PERMISSION_DENIED
    own = await alerts.ListAlerts(listing, metadata=bearer("merchant:acme"), timeout=5)
    assert list(own.alerts) == []
    preferences = preferences_pb2_grpc.PreferenceServiceStub(channel)
    update = preferences_pb2.UpdatePreferencesRequest(
        preferences=preferences_pb2.RecipientPreferences(recipient_id="globex/r1", locale="fr")
    )
    foreign = preferences.UpdatePreferences(update, metadata=bearer("merchant:acme"), timeout=5)
    assert await code_of(foreign) == grpc.StatusCode.PERMISSION_DENIED
    update.preferences.recipient_id = "acme/r1"
    stored = await preferences.UpdatePreferences(update, metadata=bearer("merchant:acme"), timeout=5)
    assert stored.locale == "fr"


async def test_the_real_services_apply_the_fine_rules(
    redis: Redis, clock: ManualClock, keys_file: Path
) -> None:
    from engine.app import build_engine

    settings = settings_with(SecuritySettings(keys_file=keys_file))
    register = build_engine(settings, redis, clock).register
    async with serving(settings, redis, clock, register) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await check_parcel_rules(channel)
            await check_tracking_rules(channel, clock.now_ms())
            await check_alert_and_preference_rules(channel)


async def drain(stream: AsyncIterable[tracking_pb2.BatchAck], seqs: list[int]) -> None:
    async for ack in stream:
        seqs.append(ack.seq)


@pytest.mark.parametrize("services", ["probe", "engine"])
async def test_a_stream_is_charged_per_batch(
    redis: Redis, clock: ManualClock, keys_file: Path, services: str
) -> None:
    from engine.app import build_engine

    security = SecuritySettings(keys_file=keys_file, quota_carrier_rps=1.0, quota_carrier_burst=2)
    settings = settings_with(security)
    register = [add_probes] if services == "probe" else list(build_engine(settings, redis, clock).register)
    async with serving(settings, redis, clock, register) as running:  # noqa: SIM117
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            tracking = tracking_pb2_grpc.TrackingServiceStub(channel)

            async def batches(count: int) -> AsyncIterator[tracking_pb2.EventBatch]:
                for seq in range(count):
                    yield tracking_pb2.EventBatch(seq=seq)

            acked: list[int] = []
            stream = tracking.StreamEvents(batches(4), metadata=bearer("carrier:swisspost"), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await drain(stream, acked)
            assert acked == [0, 1]
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers: dict[str, Any] = dict(cast(Any, info.value.trailing_metadata()))
            assert trailers["retry-after-ms"] == "1000"
            # Another carrier streams on; a second later this one may send one more batch.
            other = tracking.StreamEvents(batches(2), metadata=bearer("carrier:dhl-de"), timeout=5)
            assert [ack.seq async for ack in other] == [0, 1]
            clock.advance_ms(1000)
            again = tracking.StreamEvents(batches(1), metadata=bearer("carrier:swisspost"), timeout=5)
            assert [ack.seq async for ack in again] == [0]
