"""Email over SMTP (aiosmtplib): a small pool of reused connections, STARTTLS with certificate
verification, AUTH, and SMTP replies mapped to results.

Options (``RELAIS_CHANNEL_EMAIL_<OPTION>``): ``host`` (required), ``port`` (587; 465 with
``tls=implicit``), ``from`` (required, the sender address), ``from_name``, ``username``, ``password``,
``tls`` (``starttls`` = required, the default; ``opportunistic``; ``implicit``; ``none``; a
``username`` needs ``starttls`` or ``implicit`` unless the host is loopback), ``ca_file``
(extra trusted CA bundle, PEM), ``pool_size`` (4), ``timeout_s`` (10), ``message_id_domain``
(default: the sender's domain), ``helo_name`` (default: ``message_id_domain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Self

from aiosmtplib import (
    SMTP,
    SMTPAuthenticationError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPRecipientRefused,
    SMTPRecipientsRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)

from channels.base import (
    Accepted,
    EmailAddress,
    Message,
    PermanentFailure,
    SendResult,
    TransientFailure,
    configuration_problem,
    result_of,
)
from channels.email_message import InvalidAddressError, build_email, mailbox
from channels.options import Options

# RFC 3463 enhanced codes that condemn the address itself: no such mailbox (5.1.1), no such system
# (5.1.2), bad address syntax (5.1.3), mailbox moved (5.1.6), domain accepts no mail (5.1.10, RFC 7505
# null MX). A basic code alone never does: RFC 5321 §4.2.2 lets 550 mean a policy refusal too, and
# Postfix answers RCPT with 553 for a sender the login may not use, so removing the address on 550/551/553
# would, with a relay or DMARC problem, remove every recipient's. Without an enhanced code the send
# fails for good (fall back) but the address stays; modern servers send enhanced codes (RFC 2034).
_DEAD_ADDRESS_CODES = frozenset({"5.1.1", "5.1.2", "5.1.3", "5.1.6", "5.1.10"})
# An enhanced status code at the start of a reply's text (RFC 3463 §2: class.subject.detail).
_ENHANCED_CODE = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?=\s|$)")
# 552 on RCPT is "mailbox full" (5.2.2) in practice: RFC 5321 §4.5.3.1.10 says to treat it as temporary.
_RCPT_TEMPORARY = 552
# How long aclose waits for a polite QUIT on each pooled connection.
_QUIT_TIMEOUT_S = 2.0


class Tls(enum.Enum):
    STARTTLS = "starttls"  # upgrade with STARTTLS or fail: nothing goes out in clear text
    OPPORTUNISTIC = "opportunistic"  # upgrade when the server offers it
    IMPLICIT = "implicit"  # TLS from the first byte (SMTPS, port 465)
    NONE = "none"  # clear text, for a loopback sink only


# Modes that guarantee TLS before AUTH: opportunistic gives way to a server (or an attacker) that does
# not offer STARTTLS, and AUTH PLAIN/LOGIN would then carry the password in clear (RFC 4616 §6).
_ENCRYPTED = frozenset({Tls.STARTTLS, Tls.IMPLICIT})


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine (no network between us and the server)."""
    if host.lower() == "localhost":  # RFC 6761 §6.3: always the loopback address
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class EmailConfig:
    host: str
    sender: EmailAddress
    port: int = 587
    username: str = ""
    password: str = field(default="", repr=False)
    tls: Tls = Tls.STARTTLS
    ca_file: Path | None = None
    pool_size: int = 4
    # Per SMTP step, well under the gateway's send timeout (30 s) for a chunk of messages: a relay
    # that hangs on one message fails that message, not the chunk (whose sends would all be retried).
    timeout_s: float = 10.0
    message_id_domain: str = ""
    helo_name: str = ""

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host is required")
        if not 1 <= self.pool_size <= 256:
            raise ValueError("pool_size is out of range (1 to 256)")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if bool(self.username) != bool(self.password):
            raise ValueError("username and password go together")
        if self.username and self.tls not in _ENCRYPTED and not is_loopback(self.host):
            raise ValueError("username and password need tls=starttls or tls=implicit")
        mailbox(self.sender)  # raises InvalidAddressError (a ValueError) for a malformed sender

    @property
    def id_domain(self) -> str:
        return self.message_id_domain or self.sender.address.rpartition("@")[2]


def config_from_options(options: Mapping[str, str]) -> EmailConfig:
    opts = Options("email", options)
    tls = Tls(opts.choice("tls", Tls.STARTTLS.value, tuple(t.value for t in Tls)))
    sender = EmailAddress(opts.required("from"), opts.text("from_name"))
    try:
        mailbox(sender)
    except InvalidAddressError:
        raise opts.error("from", "is not an email address") from None
    host = opts.required("host")
    username, password = opts.text("username"), opts.text("password")
    if bool(username) != bool(password):
        raise opts.error("password" if username else "username", "is required with the other AUTH option")
    if username and tls not in _ENCRYPTED and not is_loopback(host):
        raise opts.error(
            "tls",
            f"={tls.value!r} could send the 'username'/'password' in clear text; "
            "use starttls or implicit (RFC 4616 §6)",
        )
    config = EmailConfig(
        host=host,
        sender=sender,
        port=opts.integer("port", 465 if tls is Tls.IMPLICIT else 587, low=1, high=65535),
        username=username,
        password=password,
        tls=tls,
        ca_file=opts.file("ca_file"),
        pool_size=opts.integer("pool_size", 4, low=1, high=256),
        timeout_s=opts.number("timeout_s", 10.0, low=0.1, high=600.0),
        message_id_domain=opts.text("message_id_domain"),
        helo_name=opts.text("helo_name"),
    )
    opts.finish()
    return config


def enhanced_code(text: str) -> str:
    """The RFC 3463 enhanced status code that opens a reply's text, or ""."""
    match = _ENHANCED_CODE.match(text.lstrip())
    return match.group(1) if match else ""


def reply_failure(code: int, text: str, stage: str) -> SendResult:
    """Map a refusal: ``code`` and ``text`` are the reply's, ``stage`` the command refused."""
    enhanced = enhanced_code(text)
    # The rest of the text is left out on purpose: servers echo the recipient's address in it.
    reason = f"email: SMTP {code}{f' {enhanced}' if enhanced else ''} on {stage}"
    if not 500 <= code < 600 or (stage == "RCPT" and code == _RCPT_TEMPORARY):
        return TransientFailure(reason)
    if stage == "AUTH":
        return configuration_problem(f"{reason}: the server refused the configured username/password")
    if enhanced.startswith("5.7."):
        # RFC 3463 §3.8: security or policy status, i.e. a refusal of the sender (relaying denied,
        # SPF/DKIM/DMARC 5.7.23-5.7.26, a blocklisted IP), which the operator has to fix.
        return configuration_problem(f"{reason}: a policy refusal of the sender (relay, SPF/DKIM/DMARC)")
    return PermanentFailure(reason, destination_invalid=stage == "RCPT" and enhanced in _DEAD_ADDRESS_CODES)


def smtp_failure(exc: SMTPException | OSError) -> SendResult:
    """Translate aiosmtplib's exceptions (and socket/TLS errors) into a result."""
    if isinstance(exc, SMTPRecipientsRefused):
        if not exc.recipients:
            return reply_failure(550, "", "RCPT")
        exc = exc.recipients[0]
    if isinstance(exc, SMTPRecipientRefused):
        return reply_failure(exc.code, exc.message, "RCPT")
    if isinstance(exc, SMTPResponseException) and exc.code > 0:
        stages: dict[type[SMTPResponseException], str] = {
            SMTPSenderRefused: "MAIL",
            SMTPDataError: "DATA",
            SMTPAuthenticationError: "AUTH",
            SMTPHeloError: "EHLO",
        }
        return reply_failure(exc.code, exc.message, stages.get(type(exc), "connect"))
    # Disconnects, timeouts, refused connections, TLS handshake or verification failures.
    return TransientFailure(f"email: {type(exc).__name__}")


class EmailChannel:
    name = "email"

    def __init__(self, config: EmailConfig) -> None:
        self.config = config
        # Built on first connect: loading the CA store is slow and a tls=none sink never needs it.
        self._tls_context: ssl.SSLContext | None = None
        self._slots = asyncio.Semaphore(config.pool_size)
        # Connected clients not in use; at most pool_size because each comes from a held slot.
        self._idle: list[SMTP] = []

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> Self:
        return cls(config_from_options(options))

    async def send(self, messages: Sequence[Message]) -> list[SendResult]:
        return list(await asyncio.gather(*(result_of(self.name, self._send_one(m)) for m in messages)))

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            with contextlib.suppress(SMTPException, OSError):
                await client.quit(timeout=_QUIT_TIMEOUT_S)
            client.close()

    async def _send_one(self, message: Message) -> SendResult:
        if not isinstance(message.to, EmailAddress):
            return PermanentFailure(f"email: cannot reach a {type(message.to).__name__}")
        try:
            mail = build_email(message, sender=self.config.sender, message_id_domain=self.config.id_domain)
        except InvalidAddressError:
            return PermanentFailure("email: not a mailbox", destination_invalid=True)
        async with self._slots:
            try:
                await self._deliver(mail)
            except (SMTPException, OSError) as exc:
                return smtp_failure(exc)
            except ValueError:
                # aiosmtplib refuses an address it cannot encode; resending will not change that.
                return PermanentFailure("email: address not sendable", destination_invalid=True)
        return Accepted(provider_message_id=str(mail["Message-ID"]))

    async def _deliver(self, mail: EmailMessage) -> None:
        while self._idle:
            client = self._idle.pop()
            if not client.is_connected:
                continue
            try:
                await self._transact(client, mail)
            except SMTPServerDisconnected:
                # The server dropped an idle connection (its timeout, a restart): use another.
                continue
            return
        await self._transact(await self._connect(), mail)

    async def _transact(self, client: SMTP, mail: EmailMessage) -> None:
        try:
            await client.send_message(mail)
        except (SMTPResponseException, SMTPRecipientsRefused):
            # A refused envelope leaves the connection usable (aiosmtplib sent RSET).
            self._release(client)
            raise
        except BaseException:
            client.close()
            raise
        self._release(client)

    def _release(self, client: SMTP) -> None:
        if client.is_connected:
            self._idle.append(client)

    def _tls(self) -> ssl.SSLContext | None:
        if self.config.tls is Tls.NONE:
            return None
        if self._tls_context is None:
            ca_file = self.config.ca_file
            self._tls_context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        return self._tls_context

    async def _connect(self) -> SMTP:
        config = self.config
        client = SMTP(
            hostname=config.host,
            port=config.port,
            username=config.username or None,
            password=config.password or None,
            local_hostname=config.helo_name or config.id_domain,
            timeout=config.timeout_s,
            use_tls=config.tls is Tls.IMPLICIT,
            start_tls={Tls.STARTTLS: True, Tls.OPPORTUNISTIC: None}.get(config.tls, False),
            tls_context=self._tls(),
        )
        try:
            await client.connect()
        except BaseException:
            client.close()
            raise
        return client
