"""Digests: alerts opened since the last digest, grouped per merchant team, POSTed to a webhook on a
local HTTP server or emailed to an aiosmtpd server on loopback; a failed digest goes again. Several
senders on the same feed send each digest once and take over a dead one's entries; email digests reach
a relay with the alerts' own STARTTLS and login settings."""

from __future__ import annotations

import asyncio
import email
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from email.message import Message
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis
from relais.v1 import alerts_pb2, types_pb2

from channels.smtp_sink import SmtpSink
from common import keys
from common.clock import ManualClock
from common.errors import SettingsError
from common.redis_client import default_consumer_name
from common.settings import AlertSettings
from engine.alert_digest import DigestSender, DigestSink, EmailSink, WebhookSink
from engine.alert_monitor import AlertMonitor
from engine.alert_rules import AlertConfig, DestinationKind, parse_alert_config
from engine.alert_store import AlertStore
from tests.alerts.support import parcel_facts as parcel
from tests.channels.smtp_fakes import RecordingSmtp
from tests.channels.tls_certs import make_self_signed

S = types_pb2
A = alerts_pb2
SHARDS = 4


@dataclass
class HookServer:
    """An HTTP/1.1 endpoint on loopback that keeps what it is sent and answers ``status``."""

    status: int = 200
    # How long it takes to answer: a slow endpoint makes a round last.
    delay_s: float = 0.0
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        request_line, *header_lines = head.strip().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((request_line, headers, body))
        await asyncio.sleep(self.delay_s)
        writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        writer.close()


@pytest.fixture
async def hook() -> AsyncIterator[HookServer]:
    server = HookServer()
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    yield server
    listener.close()
    await listener.wait_closed()


@pytest.fixture
async def smtp(tmp_path: Path) -> AsyncIterator[tuple[SmtpSink, int, Path]]:
    outbox = tmp_path / "smtp"
    sink = SmtpSink(outbox)
    _, port = await sink.start()
    yield sink, port, outbox
    await sink.stop()


def received_mail(outbox: Path) -> list[Message]:
    return [email.message_from_bytes(p.read_bytes()) for p in sorted(outbox.glob("*.eml"))]


ADDRESS = {"status": S.TRACKING_STATUS_EXCEPTION, "exception_reason": S.EXCEPTION_REASON_ADDRESS_PROBLEM}


async def test_digests_group_alerts_per_team(
    redis: Redis, clock: ManualClock, hook: HookServer, smtp: tuple[SmtpSink, int, Path]
) -> None:
    _, smtp_port, outbox = smtp
    config = parse_alert_config(
        {
            "merchants": {
                "acme": {
                    "teams": {
                        "ecommerce": {"webhook": f"http://127.0.0.1:{hook.port}/relais"},
                        "customer_service": {"email": "service@acme.example"},
                    }
                },
            }
        }
    )
    monitor = AlertMonitor(AlertStore(redis, shards=SHARDS, retention_ms=10**10), config, clock)
    await monitor.check(
        [
            parcel("R1", S.TRACKING_STATUS_RETURNING_TO_SENDER),
            parcel("R2", S.TRACKING_STATUS_RETURNED_TO_SENDER),
            parcel("X1", **ADDRESS),
            parcel("X2", **ADDRESS),
            parcel("X3", **ADDRESS),
            # No destination for globex: acknowledged and dropped.
            parcel("G1", S.TRACKING_STATUS_RETURNING_TO_SENDER, merchant_id="globex"),
        ]
    )
    async with httpx.AsyncClient(timeout=5.0) as client:
        sinks: dict[DestinationKind, DigestSink] = {
            DestinationKind.WEBHOOK: WebhookSink(client),
            DestinationKind.EMAIL: EmailSink(
                AlertSettings(smtp_port=smtp_port, email_from="alerts@relais.example")
            ),
        }
        sender = DigestSender(redis, shards=SHARDS, config=config, sinks=sinks)
        outcome = await sender.run_once()
        assert (outcome.digests_sent, outcome.alerts_sent, outcome.alerts_dropped) == (2, 5, 1)

        assert len(hook.requests) == 1
        request_line, headers, body = hook.requests[0]
        assert request_line == "POST /relais HTTP/1.1"
        assert headers["content-type"] == "application/json"
        payload = json.loads(body)
        assert headers["idempotency-key"] == payload["digest_id"]
        assert (payload["merchant_id"], payload["team"], payload["count"]) == ("acme", "ECOMMERCE", 2)
        assert [(a["alert_id"], a["kind"]) for a in payload["alerts"]] == [
            ("R1:RETURNED:1", "RETURNED"),
            ("R2:RETURNED:1", "RETURNED"),
        ]
        assert payload["alerts"][0]["parcel_status"] == "RETURNING_TO_SENDER"
        assert payload["alerts"][0]["opened_at"] == "2026-03-10T09:00:00+00:00"

        (mail,) = received_mail(outbox)
        assert mail["To"] == "service@acme.example"
        assert mail["From"] == "alerts@relais.example"
        assert mail["Subject"] == "relais: 3 new alerts for customer service (acme)"
        text = mail.get_payload(decode=True).decode()  # type: ignore[union-attr]
        for pid in ("X1", "X2", "X3"):
            assert f"[{pid}:ADDRESS_PROBLEM:1]" in text

        # Nothing new: nothing sent. New alerts: only those go out.
        assert await sender.run_once() == type(outcome)()
        clock.advance_ms(60_000)
        await monitor.check([parcel("R3", S.TRACKING_STATUS_RETURNED_TO_SENDER)])
        assert (await sender.run_once()).alerts_sent == 1
        assert [a["alert_id"] for a in json.loads(hook.requests[-1][2])["alerts"]] == ["R3:RETURNED:1"]
        assert len(received_mail(outbox)) == 1


async def test_failed_digest_goes_again_next_round(
    redis: Redis, clock: ManualClock, hook: HookServer
) -> None:
    config = parse_alert_config(
        {"merchants": {"acme": {"teams": {"ecommerce": {"webhook": f"http://127.0.0.1:{hook.port}/h"}}}}}
    )
    monitor = AlertMonitor(AlertStore(redis, shards=SHARDS, retention_ms=10**10), config, clock)
    await monitor.check([parcel(f"R{i}", S.TRACKING_STATUS_RETURNING_TO_SENDER) for i in range(5)])
    async with httpx.AsyncClient(timeout=5.0) as client:
        sender = DigestSender(
            redis, shards=SHARDS, config=config, sinks={DestinationKind.WEBHOOK: WebhookSink(client)}
        )
        hook.status = 503
        failed = await sender.run_once()
        assert (failed.digests_failed, failed.digests_sent) == (1, 0)
        hook.status = 200
        again = await sender.run_once()
        assert (again.digests_sent, again.alerts_sent) == (1, 5)
        first, second = (json.loads(body) for _, _, body in hook.requests)
        # The same digest, recognisable by its idempotency key.
        assert first == second
        assert (await sender.run_once()).digests_sent == 0


async def test_unreachable_smtp_server_is_a_delivery_error(redis: Redis, clock: ManualClock) -> None:
    config = parse_alert_config(
        {"merchants": {"acme": {"teams": {"ecommerce": {"email": "shop@acme.example"}}}}}
    )
    monitor = AlertMonitor(AlertStore(redis, shards=SHARDS, retention_ms=10**10), config, clock)
    await monitor.check([parcel("R1", S.TRACKING_STATUS_RETURNING_TO_SENDER)])
    # A port nothing listens on.
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    sink = EmailSink(AlertSettings(smtp_port=port, email_from="alerts@relais.example", send_timeout_s=2.0))
    sender = DigestSender(redis, shards=SHARDS, config=config, sinks={DestinationKind.EMAIL: sink})
    assert (await sender.run_once()).digests_failed == 1


def hook_config(port: int, merchants: list[str]) -> AlertConfig:
    return parse_alert_config(
        {
            "merchants": {
                m: {"teams": {"ecommerce": {"webhook": f"http://127.0.0.1:{port}/{m}"}}} for m in merchants
            }
        }
    )


def hooked_alert_ids(hook: HookServer) -> list[str]:
    return [a["alert_id"] for _, _, body in hook.requests for a in json.loads(body)["alerts"]]


async def pending_count(redis: Redis) -> int:
    counts = [await redis.xpending(keys.alert_feed(s), keys.ALERT_FEED_GROUP) for s in range(SHARDS)]
    return sum(int(c["pending"]) for c in counts)


async def test_each_process_reads_under_its_own_name(redis: Redis, clock: ManualClock) -> None:
    config = hook_config(1, ["acme"])
    monitor = AlertMonitor(AlertStore(redis, shards=SHARDS, retention_ms=10**10), config, clock)
    await monitor.check([parcel("R1", S.TRACKING_STATUS_RETURNING_TO_SENDER)])
    sender = DigestSender(redis, shards=SHARDS, config=config, sinks={})
    assert sender.consumer == default_consumer_name()
    await sender.run_once()
    names = {
        c["name"].decode()
        for s in range(SHARDS)
        for c in await redis.xinfo_consumers(keys.alert_feed(s), keys.ALERT_FEED_GROUP)
    }
    assert names == {default_consumer_name()}


async def test_two_senders_on_one_feed_send_each_digest_once(
    redis: Redis, clock: ManualClock, hook: HookServer
) -> None:
    merchants = ["m1", "m2", "m3"]
    config = hook_config(hook.port, merchants)
    monitor = AlertMonitor(AlertStore(redis, shards=SHARDS, retention_ms=10**10), config, clock)
    await monitor.check(
        [
            parcel(f"{m}-{i}", S.TRACKING_STATUS_RETURNING_TO_SENDER, merchant_id=m)
            for m in merchants
            for i in range(4)
        ]
    )
    # Each digest takes 0.4 s: A's round (three digests) lasts longer than the 1 s after which an
    # idle entry is taken over; B's round starts within it. A renews its claim between sends, so B
    # finds nothing to take and no digest goes out twice.
    hook.delay_s = 0.4
    async with httpx.AsyncClient(timeout=5.0) as client:
        sinks: dict[DestinationKind, DigestSink] = {DestinationKind.WEBHOOK: WebhookSink(client)}
        a, b = (
            DigestSender(redis, shards=SHARDS, config=config, sinks=sinks, consumer=name, min_idle_ms=1000)
            for name in ("host-a-1", "host-b-1")
        )

        async def b_later() -> None:
            await asyncio.sleep(1.05)
            await b.run_once()

        await asyncio.gather(a.run_once(), b_later())
        # Both at once, now on new alerts: each alert goes to one of them.
        clock.advance_ms(60_000)
        await monitor.check(
            [parcel(f"{m}-new", S.TRACKING_STATUS_RETURNED_TO_SENDER, merchant_id=m) for m in merchants]
        )
        hook.delay_s = 0.0
        await asyncio.gather(a.run_once(), b.run_once())
        await asyncio.gather(a.run_once(), b.run_once())
    ids = hooked_alert_ids(hook)
    assert sorted(ids) == sorted(
        [f"{m}-{i}:RETURNED:1" for m in merchants for i in range(4)]
        + [f"{m}-new:RETURNED:1" for m in merchants]
    )
    assert await pending_count(redis) == 0


async def test_a_dead_senders_entries_are_taken_over(
    redis: Redis, clock: ManualClock, hook: HookServer
) -> None:
    config = hook_config(hook.port, ["acme"])
    monitor = AlertMonitor(AlertStore(redis, shards=SHARDS, retention_ms=10**10), config, clock)
    await monitor.check([parcel(f"R{i}", S.TRACKING_STATUS_RETURNING_TO_SENDER) for i in range(5)])
    async with httpx.AsyncClient(timeout=5.0) as client:
        sinks: dict[DestinationKind, DigestSink] = {DestinationKind.WEBHOOK: WebhookSink(client)}
        dead = DigestSender(redis, shards=SHARDS, config=config, sinks=sinks, consumer="gone-1")
        # Its digest fails, then its process dies: the entries stay pending under its name.
        hook.status = 503
        assert (await dead.run_once()).digests_failed == 1
        hook.status = 200
        assert await pending_count(redis) == 5

        peer = DigestSender(
            redis, shards=SHARDS, config=config, sinks=sinks, consumer="alive-1", min_idle_ms=300
        )
        # Not idle long enough yet: left to their owner.
        assert (await peer.run_once()).digests_sent == 0
        await asyncio.sleep(0.4)
        taken = await peer.run_once()
        assert (taken.digests_sent, taken.alerts_sent) == (1, 5)
        assert (await peer.run_once()).digests_sent == 0
    assert len(hook.requests) == 2
    first, second = (json.loads(body) for _, _, body in hook.requests)
    # The same digest the dead sender tried: the endpoint recognises it by its idempotency key.
    assert first == second
    assert await pending_count(redis) == 0


async def test_email_digest_over_required_starttls_with_a_login(
    redis: Redis, clock: ManualClock, tmp_path: Path
) -> None:
    certs = make_self_signed(tmp_path)
    server = await RecordingSmtp(
        tls_context=certs.server_context(), require_starttls=True, credentials=("relais", "s3cret")
    ).start()
    config = parse_alert_config(
        {"merchants": {"acme": {"teams": {"customer_service": {"email": "service@acme.example"}}}}}
    )
    monitor = AlertMonitor(AlertStore(redis, shards=SHARDS, retention_ms=10**10), config, clock)
    await monitor.check([parcel("X1", **ADDRESS), parcel("X2", **ADDRESS)])
    relay = AlertSettings(
        smtp_port=server.port,
        email_from="alerts@relais.example",
        smtp_tls="starttls",
        smtp_ca_file=certs.cert_file,
        smtp_username="relais",
        smtp_password="nope",
    )
    try:
        wrong = DigestSender(
            redis, shards=SHARDS, config=config, sinks={DestinationKind.EMAIL: EmailSink(relay)}
        )
        # A login the relay refuses: nothing sent, the digest waits for the next round.
        assert (await wrong.run_once()).digests_failed == 1
        assert server.received == []
        mended = EmailSink(replace(relay, smtp_password="s3cret"))
        right = DigestSender(redis, shards=SHARDS, config=config, sinks={DestinationKind.EMAIL: mended})
        outcome = await right.run_once()
        assert (outcome.digests_sent, outcome.alerts_sent) == (1, 2)
    finally:
        await server.stop()
    (mail,) = server.received
    assert (mail.tls, mail.authenticated) == (True, True)
    assert (mail.mail_from, mail.rcpt_tos) == ("alerts@relais.example", ["service@acme.example"])
    assert "[X2:ADDRESS_PROBLEM:1]" in mail.message.get_content()


async def test_required_starttls_sends_nothing_to_a_relay_without_it(
    redis: Redis, clock: ManualClock
) -> None:
    server = await RecordingSmtp().start()
    config = parse_alert_config(
        {"merchants": {"acme": {"teams": {"ecommerce": {"email": "shop@acme.example"}}}}}
    )
    monitor = AlertMonitor(AlertStore(redis, shards=SHARDS, retention_ms=10**10), config, clock)
    await monitor.check([parcel("R1", S.TRACKING_STATUS_RETURNING_TO_SENDER)])
    sink = EmailSink(
        AlertSettings(smtp_port=server.port, email_from="alerts@relais.example", smtp_tls="starttls")
    )
    try:
        sender = DigestSender(redis, shards=SHARDS, config=config, sinks={DestinationKind.EMAIL: sink})
        assert (await sender.run_once()).digests_failed == 1
    finally:
        await server.stop()
    assert server.received == []


def test_a_login_goes_encrypted_only() -> None:
    env = {"RELAIS_ALERTS_SMTP_USERNAME": "relais", "RELAIS_ALERTS_SMTP_PASSWORD": "s3cret"}
    with pytest.raises(SettingsError, match="RELAIS_ALERTS_SMTP_TLS"):
        AlertSettings.from_env(env)
    assert AlertSettings.from_env(env | {"RELAIS_ALERTS_SMTP_TLS": "starttls"}).smtp_username == "relais"
    with pytest.raises(SettingsError, match="go together"):
        AlertSettings.from_env(
            {"RELAIS_ALERTS_SMTP_USERNAME": "relais", "RELAIS_ALERTS_SMTP_TLS": "implicit"}
        )
    with pytest.raises(SettingsError, match="must be one of"):
        AlertSettings.from_env({"RELAIS_ALERTS_SMTP_TLS": "ssl"})
