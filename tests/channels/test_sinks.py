"""The local sinks: the file channel, the null channel and the SMTP sink behind the email channel."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from channels.base import (
    Accepted,
    ApnsToken,
    EmailAddress,
    FcmToken,
    Message,
    PermanentFailure,
    PhoneNumber,
    WebPushSubscription,
)
from channels.email import EmailChannel
from channels.file_sink import FileChannel, file_name
from channels.null import NullChannel
from channels.smtp_sink import SmtpSink


def message(key: str, to: EmailAddress | PhoneNumber | FcmToken | ApnsToken | WebPushSubscription) -> Message:
    return Message(
        idempotency_key=key,
        to=to,
        subject="Parcel today",
        text="Zustellung heute 14\u201316 Uhr",
        html="<p>heute</p>",
        data={"deep_link": "relais://parcel/1"},
        collapse_key="parcel:1:slot",
        expires_at=datetime(2026, 3, 10, 16, 0, tzinfo=UTC),
        locale="de",
    )


def files_under(directory: Path) -> list[Path]:
    """Every file below, sorted; a leftover ``.part`` would show up here too."""
    return sorted(path for path in directory.rglob("*") if path.is_file())


async def test_file_channel_writes_what_recipients_would_receive(tmp_path: Path) -> None:
    channel = FileChannel.from_options({"dir": str(tmp_path)})
    messages = [
        message("n1:1:email", EmailAddress("ada@example.com", "Ada")),
        message("n1:1:sms", PhoneNumber("+41791234567")),
        message("n1:1:fcm", FcmToken("tok")),
        message("n1:1:apns", ApnsToken("dev", "ch.relais.app")),
        message("n1:1:webpush", WebPushSubscription("https://push.example/x", "p", "a")),
        message("n1:1:bad", EmailAddress("nobody")),
    ]
    results = await channel.send(messages)
    await channel.aclose()

    assert all(isinstance(r, Accepted) for r in results[:5])
    assert results[5] == PermanentFailure("file: not a mailbox", destination_invalid=True)
    eml = tmp_path / "email" / file_name("n1:1:email", ".eml")
    mail = message_from_bytes(eml.read_bytes(), policy=policy.default)
    assert mail["To"] == "Ada <ada@example.com>"
    assert mail["Content-Language"] == "de"
    sms = json.loads((tmp_path / "sms" / file_name("n1:1:sms", ".json")).read_text())
    assert sms == {
        "to": "+41791234567",
        "text": "Zustellung heute 14\u201316 Uhr",
        "encoding": "UCS-2",  # the en dash is not GSM-7
        "segments": 1,
        "idempotency_key": "n1:1:sms",
    }
    push = json.loads((tmp_path / "webpush" / file_name("n1:1:webpush", ".json")).read_text())
    assert push["collapse_key"] == "parcel:1:slot"
    assert push["expires_at"] == "2026-03-10T16:00:00+00:00"
    assert sorted(p.relative_to(tmp_path).parts[0] for p in files_under(tmp_path)) == [
        "apns",
        "email",
        "fcm",
        "sms",
        "webpush",
    ]


async def test_a_resend_overwrites_the_same_file(tmp_path: Path) -> None:
    channel = FileChannel(tmp_path)
    first = await channel.send([message("n2:1:sms", PhoneNumber("+41791234567"))])
    again = await channel.send([message("n2:1:sms", PhoneNumber("+41791234567"))])
    assert first == again
    assert len(files_under(tmp_path)) == 1


async def test_null_channel_accepts_everything() -> None:
    channel = NullChannel.from_options({})
    results = await channel.send([message(f"k{i}", FcmToken("t")) for i in range(3)])
    assert results == [Accepted(provider_message_id=f"null:k{i}") for i in range(3)]
    assert channel.accepted == 3


async def test_smtp_sink_keeps_each_message_as_eml(tmp_path: Path) -> None:
    outbox = tmp_path / "smtp"
    async with SmtpSink(outbox) as sink:
        channel = EmailChannel.from_options(
            {"host": sink.host, "port": str(sink.port), "from": "notices@relais.example", "tls": "none"}
        )
        try:
            results = await channel.send(
                [message(f"n{i}:1:email", EmailAddress(f"r{i}@example.com")) for i in range(3)]
            )
        finally:
            await channel.aclose()

    assert all(isinstance(r, Accepted) for r in results)
    files = files_under(outbox)
    assert all(f.suffix == ".eml" for f in files)
    assert len(files) == 3
    recipients = {message_from_bytes(f.read_bytes(), policy=policy.default)["To"] for f in files}
    assert recipients == {"r0@example.com", "r1@example.com", "r2@example.com"}


async def test_smtp_sink_counts_the_connections_a_pool_reuses(tmp_path: Path) -> None:
    async with SmtpSink(tmp_path / "smtp") as sink:
        channel = EmailChannel.from_options(
            {
                "host": sink.host,
                "port": str(sink.port),
                "from": "n@relais.example",
                "tls": "none",
                "pool_size": "2",
            }
        )
        try:
            for batch in range(3):
                await channel.send(
                    [message(f"n{batch}-{i}:1:email", EmailAddress(f"r{i}@example.com")) for i in range(4)]
                )
        finally:
            await channel.aclose()
    assert len(files_under(tmp_path / "smtp")) == 12
    assert 1 <= sink.connections_accepted <= 2


async def test_smtp_sink_logs_no_address(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Under `relais run` the sink shares the engine's log, where no personal data may go: at any
    level the engine may run at, a message sent through it leaves no recipient's address behind."""
    caplog.set_level(logging.DEBUG)
    recipient = "jeanne.secret@example.com"
    mail = EmailMessage()
    mail["From"] = "notices@relais.example"
    mail["To"] = f"Jeanne Secret <{recipient}>"
    mail["Subject"] = "Votre colis"
    mail.set_content("Bonjour")
    async with SmtpSink(tmp_path / "smtp") as sink:
        errors, _ = await aiosmtplib.send(
            mail, hostname=sink.host, port=sink.port, use_tls=False, start_tls=False
        )
    assert errors == {}
    assert len(files_under(tmp_path / "smtp")) == 1
    for record in caplog.records:
        logged = f"{record.getMessage()} {record.exc_text or ''}"
        assert "jeanne" not in logged.lower(), (record.name, logged)
