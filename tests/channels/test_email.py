"""EmailChannel against a real aiosmtpd server on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from channels.base import (
    CONFIGURATION_RETRY_AFTER_S,
    Accepted,
    EmailAddress,
    FcmToken,
    Message,
    PermanentFailure,
    SendResult,
    TransientFailure,
)
from channels.email import EmailChannel
from channels.email_message import message_id
from channels.errors import ChannelConfigError
from tests.channels.smtp_fakes import RecordingSmtp
from tests.channels.tls_certs import SelfSigned, make_self_signed


@pytest.fixture
async def smtp() -> AsyncIterator[RecordingSmtp]:
    server = await RecordingSmtp().start()
    yield server
    await server.stop()


@pytest.fixture
def certs(tmp_path: Path) -> SelfSigned:
    return make_self_signed(tmp_path)


def channel_for(port: int, **extra: str) -> EmailChannel:
    options = {
        "host": "127.0.0.1",
        "port": str(port),
        "from": "notices@relais.example",
        "tls": "none",
        "timeout_s": "5",
    }
    return EmailChannel.from_options(options | extra)


def mail(key: str = "n1:1:email", to: str = "ada@example.com", **fields: str) -> Message:
    return Message(
        idempotency_key=key,
        to=EmailAddress(to, fields.pop("name", "Ada Lovelace")),
        subject=fields.pop("subject", "Your parcel arrives Tuesday"),
        text=fields.pop("text", "Between 14:00 and 16:00."),
        html=fields.pop("html", "<p>Between <b>14:00</b> and <b>16:00</b>.</p>"),
        locale=fields.pop("locale", "de-CH"),
    )


async def send(channel: EmailChannel, *messages: Message) -> list[SendResult]:
    try:
        return await channel.send(messages)
    finally:
        await channel.aclose()


async def test_sends_multipart_alternative_with_stable_message_id(smtp: RecordingSmtp) -> None:
    [result] = await send(channel_for(smtp.port), mail())

    assert result == Accepted(provider_message_id=message_id("n1:1:email", "relais.example"))
    [received] = smtp.received
    assert received.rcpt_tos == ["ada@example.com"]
    assert received.mail_from == "notices@relais.example"
    msg = received.message
    assert msg["Message-ID"] == message_id("n1:1:email", "relais.example")
    assert msg["Content-Language"] == "de-CH"
    assert msg["To"] == "Ada Lovelace <ada@example.com>"
    assert msg.get_content_type() == "multipart/alternative"
    parts = {part.get_content_type(): part.get_content().strip() for part in msg.iter_parts()}
    assert parts == {
        "text/plain": "Between 14:00 and 16:00.",
        "text/html": "<p>Between <b>14:00</b> and <b>16:00</b>.</p>",
    }


async def test_an_idn_domain_goes_out_in_the_form_preferences_store(smtp: RecordingSmtp) -> None:
    # Preferences store anna@straße.de with its domain in IDNA 2008 A-labels: envelope and To carry
    # that ASCII form unchanged, so no server needs SMTPUTF8 and the mail goes to straße.de itself.
    address = "anna@xn--strae-oqa.de"
    [result] = await send(channel_for(smtp.port), mail(to=address))

    assert isinstance(result, Accepted)
    [received] = smtp.received
    assert received.rcpt_tos == [address]
    assert received.message["To"] == f"Ada Lovelace <{address}>"


def test_message_id_is_derived_from_the_idempotency_key() -> None:
    assert message_id("k", "d.example") == message_id("k", "d.example")
    assert message_id("k", "d.example") != message_id("k2", "d.example")
    assert message_id("k", "d.example").endswith("@d.example>")


async def test_text_only_message_is_not_multipart(smtp: RecordingSmtp) -> None:
    await send(channel_for(smtp.port), mail(html=""))
    assert smtp.received[0].message.get_content_type() == "text/plain"


async def test_connections_are_reused_and_bounded(smtp: RecordingSmtp) -> None:
    channel = channel_for(smtp.port, pool_size="2")
    try:
        first = await channel.send([mail(f"n{i}:1:email") for i in range(10)])
        second = await channel.send([mail(f"m{i}:1:email") for i in range(10)])
    finally:
        await channel.aclose()

    assert all(isinstance(result, Accepted) for result in first + second)
    assert len(smtp.received) == 20
    assert smtp.connections == 2


async def test_reconnects_after_the_server_drops_the_connection(smtp: RecordingSmtp) -> None:
    channel = channel_for(smtp.port, pool_size="1")
    try:
        assert isinstance((await channel.send([mail("a")]))[0], Accepted)
        smtp.drop_connections()
        await asyncio.sleep(0)  # let the close reach the client's transport
        assert isinstance((await channel.send([mail("b")]))[0], Accepted)
    finally:
        await channel.aclose()
    assert len(smtp.received) == 2
    assert smtp.connections == 2


async def test_crlf_in_subject_or_name_never_creates_a_header(smtp: RecordingSmtp) -> None:
    attack = mail(
        subject="Hello\r\nBcc: victim@evil.example\r\n\r\nbody",
        name="Eve\r\nBcc: other@evil.example",
    )
    [result] = await send(channel_for(smtp.port), attack)

    assert isinstance(result, Accepted)
    [received] = smtp.received
    assert received.rcpt_tos == ["ada@example.com"]
    msg = received.message
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Hello Bcc: victim@evil.example body"
    assert msg["To"].addresses[0].addr_spec == "ada@example.com"
    assert b"\r\nBcc:" not in received.raw


async def test_smtp_replies_are_mapped(smtp: RecordingSmtp) -> None:
    smtp.refuse = {
        "gone@example.com": "550 5.1.1 <gone@example.com>: Recipient address rejected",
        "full@example.com": "552 5.2.2 Mailbox full",
        "grey@example.com": "451 4.7.1 Greylisted, try again",
    }
    results = await send(
        channel_for(smtp.port, pool_size="1"),
        mail("1", to="gone@example.com"),
        mail("2", to="full@example.com"),
        mail("3", to="grey@example.com"),
        mail("4", to="ada@example.com"),
    )

    assert results[0] == PermanentFailure("email: SMTP 550 5.1.1 on RCPT", destination_invalid=True)
    # RFC 5321 §4.5.3.1.10: 552 on RCPT (mailbox full) is temporary.
    assert results[1] == TransientFailure("email: SMTP 552 5.2.2 on RCPT")
    assert results[2] == TransientFailure("email: SMTP 451 4.7.1 on RCPT")
    assert isinstance(results[3], Accepted)
    # The refusals reset the envelope and kept the one connection usable.
    assert smtp.connections == 1
    assert [r.rcpt_tos for r in smtp.received] == [["ada@example.com"]]
    # Nothing personal in a reason: the server's reply text (which echoes the address) is dropped.
    assert all("example.com" not in getattr(r, "reason", "") for r in results)


@pytest.mark.parametrize(
    ("reply", "dead"),
    [
        ("550 5.1.1 <x@example.com>: Recipient address rejected: User unknown", True),
        ("550 5.1.2 Host unknown", True),
        ("553 5.1.3 Bad recipient address syntax", True),
        ("551 5.1.6 Mailbox has moved", True),
        ("550 5.1.10 Recipient domain accepts no mail (null MX)", True),
        # No enhanced code: 550 may be a policy refusal (RFC 5321 §4.2.2), so the address stays.
        ("550 Requested action not taken: mailbox unavailable", False),
        ("553 Mailbox name not allowed", False),
        ("554 5.2.1 Mailbox disabled", False),
    ],
)
async def test_only_address_status_codes_condemn_the_address(
    smtp: RecordingSmtp, reply: str, dead: bool
) -> None:
    smtp.refuse = {"x@example.com": reply}
    [result] = await send(channel_for(smtp.port), mail(to="x@example.com"))

    assert isinstance(result, PermanentFailure)
    assert result.destination_invalid is dead
    assert "example.com" not in result.reason


async def test_policy_refusals_wait_for_the_operator_and_keep_the_address(smtp: RecordingSmtp) -> None:
    # A relay that will not relay for an unauthenticated client refuses every outside recipient with
    # 554 5.7.1; a provider may say 550 5.7.1 for the same thing.
    smtp.relay_domains = frozenset({"relais.example"})
    smtp.refuse = {"bob@example.org": "550 5.7.1 Relaying denied"}
    results = await send(
        channel_for(smtp.port, pool_size="1"),
        mail("1", to="ada@example.com"),
        mail("2", to="bob@example.org"),
        mail("3", to="ops@relais.example"),
    )

    assert results[0] == TransientFailure(
        "email: SMTP 554 5.7.1 on RCPT: a policy refusal of the sender (relay, SPF/DKIM/DMARC)",
        retry_after_s=CONFIGURATION_RETRY_AFTER_S,
    )
    assert results[1] == TransientFailure(
        "email: SMTP 550 5.7.1 on RCPT: a policy refusal of the sender (relay, SPF/DKIM/DMARC)",
        retry_after_s=CONFIGURATION_RETRY_AFTER_S,
    )
    assert isinstance(results[2], Accepted)
    assert [r.rcpt_tos for r in smtp.received] == [["ops@relais.example"]]


async def test_dmarc_rejection_after_data_waits_for_the_operator(smtp: RecordingSmtp) -> None:
    smtp.data_reply = "550 5.7.26 Unauthenticated email from relais.example is not accepted (DMARC)"
    [result] = await send(channel_for(smtp.port), mail())

    assert result == TransientFailure(
        "email: SMTP 550 5.7.26 on DATA: a policy refusal of the sender (relay, SPF/DKIM/DMARC)",
        retry_after_s=CONFIGURATION_RETRY_AFTER_S,
    )
    assert smtp.received == []


async def test_invalid_destination_fails_without_connecting(smtp: RecordingSmtp) -> None:
    bad = Message("k", EmailAddress("not-an-address"), "s", "t")
    wrong_kind = Message("k", FcmToken("abc"), "s", "t")
    results = await send(channel_for(smtp.port), bad, wrong_kind)

    assert results[0] == PermanentFailure("email: not a mailbox", destination_invalid=True)
    assert isinstance(results[1], PermanentFailure)
    assert not results[1].destination_invalid
    assert smtp.connections == 0


async def test_a_message_whose_send_raises_fails_alone(smtp: RecordingSmtp) -> None:
    # A lone surrogate cannot be encoded: an error no branch of the channel expects.
    results = await send(channel_for(smtp.port), mail("n1:1:email", text="\ud800"), mail("n2:1:email"))

    assert results[0] == TransientFailure("email: UnicodeEncodeError")
    assert isinstance(results[1], Accepted)
    assert len(smtp.received) == 1


async def test_unreachable_server_is_transient(smtp: RecordingSmtp) -> None:
    port = smtp.port
    await smtp.stop()
    [result] = await send(channel_for(port, timeout_s="2"), mail())
    assert isinstance(result, TransientFailure)


async def test_starttls_verified_against_ca_file_with_auth(certs: SelfSigned) -> None:
    server = RecordingSmtp(
        tls_context=certs.server_context(), require_starttls=True, credentials=("relais", "s3cret")
    )
    await server.start()
    try:
        channel = channel_for(
            server.port,
            tls="starttls",
            ca_file=str(certs.cert_file),
            username="relais",
            password="s3cret",
        )
        [result] = await send(channel, mail())
    finally:
        await server.stop()

    assert isinstance(result, Accepted)
    [received] = server.received
    assert received.tls
    assert received.authenticated


async def test_wrong_password_waits_for_the_operator(certs: SelfSigned) -> None:
    server = RecordingSmtp(tls_context=certs.server_context(), credentials=("relais", "s3cret"))
    await server.start()
    try:
        channel = channel_for(
            server.port, tls="starttls", ca_file=str(certs.cert_file), username="relais", password="nope"
        )
        [result] = await send(channel, mail())
    finally:
        await server.stop()
    # Not the recipient's fault: falling back would move everyone to the next channel.
    assert result == TransientFailure(
        "email: SMTP 535 5.7.8 on AUTH: the server refused the configured username/password",
        retry_after_s=CONFIGURATION_RETRY_AFTER_S,
    )
    assert server.received == []


async def test_untrusted_certificate_sends_nothing(certs: SelfSigned) -> None:
    server = RecordingSmtp(tls_context=certs.server_context())
    await server.start()
    try:
        # No ca_file: the self-signed certificate is not in the default trust store.
        [result] = await send(channel_for(server.port, tls="starttls"), mail())
    finally:
        await server.stop()
    assert isinstance(result, TransientFailure)
    assert server.received == []


async def test_required_starttls_never_falls_back_to_clear_text(smtp: RecordingSmtp) -> None:
    # The server offers no STARTTLS at all.
    [result] = await send(channel_for(smtp.port, tls="starttls"), mail())
    assert isinstance(result, TransientFailure)
    assert smtp.received == []


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"from": "a@b.example"}, "'host'"),
        ({"host": "h", "from": "a@b.example", "port": "x"}, "'port'"),
        ({"host": "h", "from": "nobody"}, "'from'"),
        ({"host": "h", "from": "a@b.example", "tls": "maybe"}, "'tls'"),
        ({"host": "h", "from": "a@b.example", "username": "u"}, "'password'"),
        ({"host": "h", "from": "a@b.example", "prot": "25"}, "prot"),
        ({"host": "h", "from": "a@b.example", "ca_file": "/nonexistent/ca.pem"}, "'ca_file'"),
        # RFC 4616 §6: AUTH PLAIN must not cross a network without TLS.
        ({"host": "h", "from": "a@b.example", "username": "u", "password": "p", "tls": "none"}, "'tls'"),
        (
            {"host": "h", "from": "a@b.example", "username": "u", "password": "p", "tls": "opportunistic"},
            "'tls'",
        ),
    ],
)
def test_bad_options_name_the_option(options: dict[str, str], named: str) -> None:
    with pytest.raises(ChannelConfigError, match=named):
        EmailChannel.from_options(options)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_credentials_without_tls_only_to_loopback(host: str) -> None:
    options = {"host": host, "from": "a@b.example", "username": "u", "password": "p", "tls": "none"}
    assert EmailChannel.from_options(options).config.username == "u"
